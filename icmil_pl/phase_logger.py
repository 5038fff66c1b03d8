"""One logger run for a whole ICMIL procedure, each phase's metrics under its own prefix."""

from __future__ import annotations

import os

from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only

__all__ = ["PhaseLogger"]


class PhaseLogger(Logger):
    """One logger run for the whole procedure: metric names get `iter<i>/<phase>/`, steps continue across phases."""

    def __init__(self, logger: Logger, prefix: str, step_offset: int, root: os.PathLike) -> None:
        super().__init__()
        self.inner = logger
        self.prefix = prefix
        self.root = root
        self.offset = self.last_step = step_offset

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def version(self):
        return self.inner.version

    @property
    def save_dir(self) -> str:
        """The phase's own folder: per-phase outputs (predictions.csv) never overwrite each other."""
        return str(self.root)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.last_step = self.offset + (step or 0)
        self.inner.log_metrics({f"{self.prefix}/{k}": v for k, v in metrics.items()}, self.last_step)

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # the resolved config is logged once by the CLI (icmil_pl.tools.wandb_run, under "cli")

    @rank_zero_only
    def save(self) -> None:
        self.inner.save()
