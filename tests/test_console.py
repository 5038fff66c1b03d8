"""What a command prints: its phases (start and end), the table and where the outputs are, within a line budget.
Lightning's device lines, product tips, callback notes, model summaries, restore lines and known-harmless warnings
stay off the console and go to the run's `logs/console.log`; `--verbose` prints them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import icmil_args

ROOT = Path(__file__).parents[1]
CHATTER = (
    "GPU available",
    "TPU available",
    "Tip:",
    "configure_callbacks",
    "┏",  # a model summary table
    "Restoring states",
    "Loaded model weights",
    "Seed set",
    "LeafSpec",
    "No negative samples",
    "No positive samples",
    "`Trainer.fit` stopped",
    "eval mode at the start of training",
    "args parameter is intended",
)
BUDGET = 30  # lines of a one-iteration ICMIL run: 3 per phase, the extraction summaries, the table, the outputs


def _fit(cohort: Path, out: Path, *extra: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "icmil_pl", *icmil_args(cohort, out, "fit", *extra)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def quiet(icmil_cohort, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("quiet")
    return _fit(icmil_cohort, out), out


def test_a_run_prints_its_phases_its_table_and_its_outputs_within_a_line_budget(quiet):
    text, _ = quiet
    assert text.count("\n") <= BUDGET, text  # lines as a terminal shows them: a progress bar redraws one with \r
    assert [c for c in CHATTER if c in text] == []
    for phase in ("iter0/embed", "iter0/bag", "iter0/couple", "iter1/embed", "iter1/bag"):
        assert text.count(f"{phase}: ") == 2 and text.count(f"{phase}: done in ") == 1, phase  # start and end
    assert "iter0/bag: done in" in text and "(val auroc" in text
    assert " iter val auroc test auroc" in text and "outputs in " in text


def test_what_the_console_leaves_out_is_in_the_runs_log(quiet):
    _, out = quiet
    log = (out / "run" / "logs" / "console.log").read_text()
    assert "GPU available" in log and "Restoring states" in log and "LeafSpec" in log


def test_verbose_prints_lightnings_own_lines(icmil_cohort, tmp_path):
    text = _fit(icmil_cohort, tmp_path, "--model.init_args.iterations=0", "--verbose")
    assert "GPU available" in text and "┏" in text and "LeafSpec" in text
