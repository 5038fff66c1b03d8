"""Where a Trainer's outputs go: one answer for every callback, model and command that writes files."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl

__all__ = ["output_dir"]


def output_dir(trainer: pl.Trainer) -> Path:
    """The logger's version folder (`lightning_logs/version_<k>`, an ICMIL phase's own folder), else the Trainer's
    `default_root_dir`. A collective under DDP: call it on every process, not on rank 0 only."""
    return Path(trainer.log_dir or trainer.default_root_dir)
