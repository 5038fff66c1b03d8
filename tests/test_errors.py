"""Bad input from the command line ends with one line that names the file or field, never a traceback, and the
line is the project's own error, not the innermost cause it wraps (which loses the file name)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icmil_pl.__main__ import message

ROOT = Path(__file__).parents[1]
CONF = Path(__file__).parent / "conf"


def _extract(labels: Path, slides: Path, grids: Path, out: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "icmil_pl",
        "predict",
        "-c",
        str(CONF / "extract.yaml"),
        f"--trainer.callbacks.init_args.cache_root={out / 'features'}",
        f"--trainer.default_root_dir={out}",
        f"--data.init_args.labels={labels}",
        f"--data.init_args.slides={slides}",
        f"--data.init_args.grid_cache={grids}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kind", ["empty", "png"])
def test_a_file_that_is_no_slide_is_named(tmp_path, kind):
    slides = tmp_path / "slides"
    slides.mkdir()
    path = slides / "s1.svs"
    if kind == "empty":
        path.write_bytes(b"")
    else:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, format="PNG")
    (tmp_path / "labels.csv").write_text("slide_id,label\ns1,0\n")
    done = _extract(tmp_path / "labels.csv", slides, tmp_path / "grids", tmp_path / "out")
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert last.startswith(f"error: {path}: not a readable TIFF-based slide"), last


def test_an_unwritable_folder_is_one_line(tmp_path, icmil_cohort):
    blocker = tmp_path / "grids"
    blocker.write_text("a file where the grid cache folder should be")
    done = _extract(icmil_cohort / "labels.csv", icmil_cohort / "slides", blocker, tmp_path / "out")
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert last.startswith(f"error: {blocker}") and ("Not a directory" in last or "File exists" in last), last


def _raise_wrapped() -> None:
    try:
        try:
            raise OSError("not a TIFF file: header=b''")  # the decoder's own words: no file name
        except OSError as inner:
            raise ValueError("/data/s1.svs: not a readable TIFF-based slide") from inner  # ours, raised here
    except ValueError as ours:
        raise TypeError("Problem with given class_path 'SlidePatchDataModule'") from ours  # jsonargparse's wrapper


def test_the_message_is_the_outermost_project_error():
    with pytest.raises(TypeError) as error:
        _raise_wrapped()
    # raised in a test file, not in icmil_pl or data_modules: the innermost cause is shown
    assert message(error.value) == "error: not a TIFF file: header=b''"
    from data_modules.slides import open_slide

    with pytest.raises(ValueError) as ours:
        open_slide("/no/such/slide.svs")
    wrapped = TypeError("Problem with given class_path")
    wrapped.__cause__ = ours.value
    assert message(wrapped) == "error: /no/such/slide.svs: no such file"


def test_an_error_on_a_terminal_starts_on_a_fresh_line(monkeypatch):
    """A progress bar may have left the cursor mid-line: `error:` was printed onto the half-drawn bar."""
    import icmil_pl.__main__ as entry

    monkeypatch.setattr(sys, "argv", ["icmil_pl", "report", "/no/such/run"])
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with pytest.raises(SystemExit) as exit_info:
        entry.main()
    assert str(exit_info.value.code).startswith("\nerror: ")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        entry.main()
    assert str(exit_info.value.code).startswith("error: ")
