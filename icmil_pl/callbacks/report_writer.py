"""report.html of a run folder once its predictions or results are written, called by the CLI and the ICMIL loop so
that the training core never imports the HTML view (`icmil_pl.views.report`) itself."""

from __future__ import annotations

import os
from pathlib import Path

from pytorch_lightning.utilities import rank_zero_only

from ..results import RESULTS_FILE
from .prediction_writer import PREDICTIONS_FILE

__all__ = ["write_run_report"]


@rank_zero_only
def write_run_report(folder: str | os.PathLike) -> Path | None:
    """`folder`'s report.html where it holds predictions or results (said in one line), else nothing."""
    folder = Path(folder)
    if not ((folder / PREDICTIONS_FILE).is_file() or (folder / RESULTS_FILE).is_file()):
        return None
    from ..views.report import write_report  # loaded when a report is written; the view imports callbacks itself

    path = write_report(folder)
    print(f"report: {path}")
    return path
