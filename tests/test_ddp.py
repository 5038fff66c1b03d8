"""ICMIL under DDP (two CPU processes, gloo): every process runs the whole command, so run-directory files must be
written once, phases must wait for each other's files, and evaluation must count each slide once.

Slow (about 3 minutes on 2 cores): the command runs as a real subprocess, as Lightning's launcher re-runs it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import icmil_args

ROOT = Path(__file__).parent.parent
DDP = ("--trainer.devices=2", "--trainer.strategy=ddp")


@pytest.mark.slow
def test_icmil_fit_test_predict_with_two_processes(icmil_cohort, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    for subcommand in ("fit", "test", "predict"):
        done = subprocess.run(
            [sys.executable, "-m", "icmil_pl", *icmil_args(icmil_cohort, tmp_path, subcommand, *DDP)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, f"{subcommand}:\n{done.stderr[-4000:]}"

    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert [r["iteration"] for r in results["iterations"]] == [0, 1]
    assert (run / "iter1" / "embedder.pt").is_file()
    assert not list(run.rglob("*.tmp"))  # no write raced another process's
    splits = json.loads((run / "splits.json").read_text())

    tested = [row["slide_id"] for row in csv.DictReader((run / "final" / "test" / "predictions.csv").open())]
    assert tested == splits["test"]  # every test slide once, in order: no padding repeats, both processes' rows
    assert {p.name for p in (run / "final" / "test" / "figures").iterdir()} == {"test_roc.png", "test_confusion.png"}

    predicted = [row["slide_id"] for row in csv.DictReader((run / "final" / "predict" / "predictions.csv").open())]
    assert predicted == [f"slide_{k:03d}" for k in range(12)]
    scores = run / "final" / "predict" / "scores.zarr"
    assert sorted(p.name for p in scores.iterdir() if p.is_dir()) == predicted
    assert len(list((run / "final" / "predict" / "figures").glob("*_heatmap.png"))) == 12
