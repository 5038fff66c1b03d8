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

from data_modules.synthetic import make_cohort

CONF = Path(__file__).parent / "conf"
ROOT = Path(__file__).parent.parent


def _command(subcommand: str, cohort: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "icmil_pl", subcommand, "-c", str(CONF / "icmil.yaml"),
            f"--model.init_args.run_dir={out / 'run'}", f"--data.init_args.labels={cohort / 'labels.csv'}",
            f"--data.init_args.slides={cohort / 'slides'}", f"--data.init_args.grid_cache={out / 'grids'}",
            f"--trainer.logger.init_args.save_dir={out / 'logs'}", "--trainer.devices=2", "--trainer.strategy=ddp"]  # fmt: skip


@pytest.mark.slow
def test_icmil_fit_test_predict_with_two_processes(tmp_path):
    cohort = tmp_path / "cohort"
    make_cohort(cohort, 12, seed=2, size=(1024, 1024), mpp=0.5, tumour_contrast=1.0, tumour_area=(0.1, 0.2))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    for subcommand in ("fit", "test", "predict"):
        done = subprocess.run(_command(subcommand, cohort, tmp_path), cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=900)  # fmt: skip
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
