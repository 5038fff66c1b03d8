"""Randomness that depends on where a run is, not on how it got there."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader

__all__ = ["EpochSeed"]


class EpochSeed(Callback):
    """Reseeds torch, numpy and random before every training epoch from (seed, epoch, rank); the rank left out for a
    model whose processes step through the same bags (`same_bags_on_every_process`).

    Dropout, augmentation, within-bag sampling and loader workers of epoch k then do not depend on the epochs before
    it, so a run resumed from a checkpoint mid-phase continues exactly as an uninterrupted one would (Lightning saves
    no random state in checkpoints).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._first_epoch = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._first_epoch = trainer.current_epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank = 0 if getattr(pl_module, "same_bags_on_every_process", False) else trainer.global_rank
        seed = (self.seed * 1_000_003 + trainer.current_epoch * 7919 + rank) % 2**32
        pl.seed_everything(seed, workers=True, verbose=False)
        if trainer.current_epoch > 0 and trainer.current_epoch == self._first_epoch:
            _draw_loader_seeds(trainer)


def _draw_loader_seeds(trainer: pl.Trainer) -> None:
    """A resumed run's first epoch iterates a loader made before this epoch's reseed (Lightning makes it when fit
    starts); an uninterrupted run makes epoch k's loader after it, which draws each loader's base seed from the
    global generator. Drawing the same here keeps the epoch's dropout and augmentation those of the uninterrupted
    run."""
    loaders = trainer.train_dataloader
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
        if isinstance(loader, DataLoader) and loader.generator is None:
            torch.empty((), dtype=torch.int64).random_()
