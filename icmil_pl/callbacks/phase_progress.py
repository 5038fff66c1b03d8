"""Progress that says where a long run is: ICMIL runs many Trainers, and "Epoch 3" alone does not say whose. A bar
for terminals, printed lines where the bar is off."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar

__all__ = ["PhaseProgressBar", "ProgressLog"]


class PhaseProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with every description prefixed, e.g. `iter1/bag epoch 3`, `iter1/embed predicting`."""

    def __init__(self, prefix: str, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.prefix = prefix

    @property
    def train_description(self) -> str:
        return f"{self.prefix} training"

    @property
    def validation_description(self) -> str:
        return f"{self.prefix} validating"

    @property
    def test_description(self) -> str:
        return f"{self.prefix} testing"

    @property
    def predict_description(self) -> str:
        return f"{self.prefix} predicting"

    @property
    def sanity_check_description(self) -> str:
        return f"{self.prefix} sanity check"

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"{self.prefix} {_epoch(trainer)}")


class ProgressLog(pl.Callback):
    """Progress as printed lines, for runs without a progress bar (logs of batch jobs, `enable_progress_bar: false`):
    at most one line per `every_s` seconds per stage (within an epoch too: one SSL epoch can take minutes), and a
    closing line for a stage that took longer, so a long predict or training phase is never silent."""

    def __init__(self, prefix: str, every_s: float = 30.0) -> None:
        self.prefix = prefix
        self.every_s = every_s
        self._start = self._last = 0.0

    def _begin(self) -> None:
        self._start = self._last = time.monotonic()

    def _report(self, trainer: pl.Trainer, what: str, force: bool = False) -> None:
        now = time.monotonic()
        if trainer.is_global_zero and (force or now - self._last >= self.every_s):
            self._last = now
            print(f"{self.prefix} {what} ({_duration(now - self._start)})", flush=True)

    def _end(self, trainer: pl.Trainer, stage: str) -> None:
        if time.monotonic() - self._start >= self.every_s:
            self._report(trainer, f"{stage}: done", force=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._report(trainer, f"training: {_epoch(trainer)}, {_batch(batch_idx, trainer.num_training_batches)}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, f"training: {_epoch(trainer)}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, "training")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._report(trainer, f"testing: {_batch(batch_idx, trainer.num_test_batches[dataloader_idx])}")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, "testing")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._report(trainer, f"predicting: {_batch(batch_idx, trainer.num_predict_batches[dataloader_idx])}")

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, "predicting")


def _epoch(trainer: pl.Trainer) -> str:
    """`epoch k/n`, the running epoch (1-based) of the trainer's budget, or `epoch k` without one."""
    epochs = "" if trainer.max_epochs in (None, -1) else f"/{trainer.max_epochs}"
    return f"epoch {trainer.current_epoch + 1}{epochs}"


def _batch(batch_idx: int, total: int | float) -> str:
    """`batch k/n`, or `batch k` where the loader's length is unknown."""
    of = "" if total in (float("inf"), 0) else f"/{int(total)}"
    return f"batch {batch_idx + 1}{of}"


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
