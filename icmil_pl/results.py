"""`results.json`: the one place a run's validation/test metrics and phase times are written (DESIGN.md section 3)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .metrics import METRIC_NAMES

__all__ = ["read_results", "stage_metrics", "write_results"]


def stage_metrics(logged: list[dict] | dict, stage: str) -> dict[str, float]:
    """`{auroc, accuracy, f1, balanced_accuracy}` from what `trainer.validate/test` returned for `stage`."""
    values = logged[0] if isinstance(logged, list) else logged
    return {name: float(values[f"{stage}/{name}"]) for name in METRIC_NAMES if f"{stage}/{name}" in values}


def write_results(run_dir: str | os.PathLike, iterations: list[dict], **extra) -> Path:
    """`{"iterations": [{"iteration", "val", "test", "seconds"}, ...], ...}`; a single model is iteration 0."""
    path = Path(run_dir) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"iterations": iterations, **extra}, indent=1))
    os.replace(tmp, path)
    return path


def read_results(run_dir: str | os.PathLike) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())
