"""Progress bars that say where a long run is: ICMIL runs many Trainers, and "Epoch 3" alone does not say whose."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar

__all__ = ["PhaseProgressBar"]


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
        epochs = "" if trainer.max_epochs in (None, -1) else f"/{trainer.max_epochs}"
        self.train_progress_bar.set_description(f"{self.prefix} epoch {trainer.current_epoch + 1}{epochs}")
