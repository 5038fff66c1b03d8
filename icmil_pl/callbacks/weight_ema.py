"""An exponential moving average of the weights, the stabiliser the end-to-end MIL literature uses (ABMILX)."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EMAWeightAveraging
from pytorch_lightning.trainer.states import TrainerFn

__all__ = ["WeightEMA"]


class WeightEMA(EMAWeightAveraging):
    """Lightning's EMA callback (validation and checkpoints see the averaged weights; `decay` per optimizer step,
    manual optimization included), scored on the weights it validated.

    Lightning's callback, when a checkpoint is loaded to validate, test or predict after `fit` (as `results.json`'s
    best-checkpoint scores are), restores the raw training weights it keeps beside the averaged ones, so the test
    would score weights other than those selected as best. Outside `fit` this keeps the checkpoint's averaged
    `state_dict`; resuming a fit restores both, as Lightning does.
    """

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
