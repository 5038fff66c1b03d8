"""The README's pictures of the run report and the zoomable viewer, taken in headless Chromium from a real run.

    make demo
    python -m icmil_pl test -c runs/demo/config.yaml && python -m icmil_pl predict -c runs/demo/config.yaml
    python docs/screenshots.py [--run runs/demo] [--slide slide_077]

Writes docs/report.png (the top of runs/demo/report.html, opened from disk) and docs/viewer.png (the slide zoomed on
its most attended patch, heatmap on, that patch clicked). Default slide: the test split's tumour slide the model calls
tumour most confidently.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By

from data_modules.io import safe_name
from icmil_pl.views.report import REPORT_FILE, write_report
from icmil_pl.views.viewer import RunViewer, ViewerServer
from icmil_pl.views.viewer.browser import chromium_driver

DOCS = Path(__file__).parent
_LOADED = (
    "(() => { const s = window.icmilViewer; const w = s && s.viewer && s.viewer.world;"
    " return s && s.heatmap && w.getItemCount() === 2 && w.getItemAt(0).getFullyLoaded()"
    " && s.heatmap.getFullyLoaded(); })()"
)


def _wait(driver, script: str, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not driver.execute_script(f"return {script};"):
        if time.monotonic() > end:
            raise TimeoutError(script)
        time.sleep(0.2)


def _default_slide(run: Path) -> str:
    test = set(json.loads((run / "splits.json").read_text())["test"])
    with (run / "final" / "predict" / "predictions.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["slide_id"] in test and r["label"] == r["predicted"]]
    tumour = [r for r in rows if r["label"] == "tumour"]
    return max(tumour or rows, key=lambda r: float(r[f"prob_{r['predicted']}"]))["slide_id"]


def report(driver, run: Path) -> None:
    path = write_report(run)
    driver.set_window_size(1280, 1500)
    driver.get(path.resolve().as_uri())
    time.sleep(1.0)
    driver.save_screenshot(str(DOCS / "report.png"))
    print(f"docs/report.png: the top of {run / REPORT_FILE}")


def viewer(driver, run: Path, slide_id: str, zoom: float) -> None:
    view = RunViewer(run)
    server = ViewerServer(view, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        name = safe_name(slide_id)
        scores = view.scores(name)
        driver.set_window_size(1400, 900)
        driver.get(f"{server.url}#slide={quote(name)}")
        _wait(driver, _LOADED)
        k = int(np.argmax(scores.scores))
        x, y = (scores.coords[k] + scores.patch_side / 2).tolist()
        driver.execute_script(
            "const s = window.icmilViewer, v = s.viewer.viewport;"
            "const p = s.viewer.world.getItemAt(0).imageToViewportCoordinates(arguments[0], arguments[1]);"
            "v.zoomTo(arguments[2] * v.getHomeZoom(), null, true); v.panTo(p, true);",
            x,
            y,
            zoom,
        )
        _wait(driver, _LOADED)
        element = driver.find_element(By.ID, "view")
        point = driver.execute_script(
            "const p = window.icmilViewer.viewer.world.getItemAt(0).imageToViewerElementCoordinates("
            "new OpenSeadragon.Point(arguments[0], arguments[1])); return [p.x, p.y];",
            x,
            y,
        )
        rect = element.rect
        ActionChains(driver).move_to_element_with_offset(
            element, point[0] - rect["width"] / 2, point[1] - rect["height"] / 2
        ).click().perform()
        _wait(driver, f"document.getElementById('info').dataset.index === '{k}'")
        time.sleep(0.5)
        driver.save_screenshot(str(DOCS / "viewer.png"))
        print(f"docs/viewer.png: {slide_id}, zoomed {zoom}x on patch {k} (its most attended), clicked")
    finally:
        server.shutdown()
        server.server_close()
        view.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--slide", default=None, help="the slide the viewer shows")
    parser.add_argument("--zoom", type=float, default=4.0, help="times the whole-slide view")
    args = parser.parse_args()
    slide_id = args.slide or _default_slide(args.run)
    with tempfile.TemporaryDirectory() as profile:
        driver = chromium_driver(profile)
        try:
            report(driver, args.run)
            viewer(driver, args.run, slide_id, args.zoom)
        finally:
            driver.quit()


if __name__ == "__main__":
    main()
