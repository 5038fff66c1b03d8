"""Where a Trainer's outputs go (one answer for every callback, model and command that writes files), and the one
way a run reports the slides it left out."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl

__all__ = ["output_dir", "report_skipped"]


def output_dir(trainer: pl.Trainer) -> Path:
    """The logger's version folder (`lightning_logs/version_<k>`, an ICMIL phase's own folder), else the Trainer's
    `default_root_dir`. A collective under DDP: call it on every process, not on rank 0 only."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def report_skipped(skipped: dict[str, str]) -> None:
    """Print the slides a run left out because they could not be read (on_slide_error: skip), with why."""
    if skipped:
        print(f"skipped {len(skipped)} slide(s) that could not be read (on_slide_error: skip):")
        for slide_id, error in sorted(skipped.items()):
            print(f"  {slide_id}: {' '.join(error.split())}")
