"""Randomness that depends on where a run is, not on how it got there."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

__all__ = ["EpochSeed"]


class EpochSeed(Callback):
    """Reseeds torch, numpy and random before every training epoch from (seed, epoch, rank).

    Dropout, augmentation, within-bag sampling and loader workers of epoch k then do not depend on the epochs before
    it, so a run resumed from a checkpoint mid-phase continues exactly as an uninterrupted one would (Lightning saves
    no random state in checkpoints).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seed = (self.seed * 1_000_003 + trainer.current_epoch * 7919 + trainer.global_rank) % 2**32
        pl.seed_everything(seed, workers=True, verbose=False)
