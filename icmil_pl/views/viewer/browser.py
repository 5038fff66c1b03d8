"""Headless Chromium through Selenium, for the viewer's browser test and the documentation's screenshots: Debian's
`chromium` and `chromium-driver`, never a downloaded browser, with the flags a machine without a network needs."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CHROMEDRIVER", "CHROMIUM", "chromium_driver", "has_chromium"]

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # else Chromium calls home, and a closed network refuses it many times over
    "--disable-component-update",
    "--disable-sync",
    "--force-device-scale-factor=1",
)


def has_chromium() -> bool:
    return CHROMIUM.is_file() and CHROMEDRIVER.is_file()


def chromium_driver(user_data_dir: str | os.PathLike, size: tuple[int, int] = (1280, 900)):
    """A Selenium Chrome driver on Debian's Chromium, with a fresh profile in `user_data_dir`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*_FLAGS, f"--window-size={size[0]},{size[1]}", f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
