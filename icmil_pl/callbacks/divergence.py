"""A phase whose weights diverged stops there, naming itself, the epoch and the learning rate: a NaN loss used to train
on, save NaN weights as the best checkpoint and end with `Input contains NaN.`; a loss of 1e27 (lr 1e12) ended with
exit 0 and AUROC 0.5."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch

__all__ = ["DIVERGED", "DivergenceGuard"]

DIVERGED = 1e6  # a training loss this many times its first value (or 1, whichever is larger) means divergence


class DivergenceGuard(pl.Callback):
    """Stops training at the first non-finite or diverged training loss, at a non-finite logged metric, and before a
    checkpoint of non-finite weights is written: checkpoints of the epochs before stay, none after.

    `phase` names the training in the error (`iter0/bag`). The loss of the phase's first step is kept in the
    checkpoint, so a resumed phase judges its losses as an uninterrupted one would."""

    def __init__(self, phase: str = "fit") -> None:
        self.phase = phase
        self.first_loss: float | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs: Any, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):  # a step that only accumulates (bags_per_step)
            return
        value = float(loss.detach().float().mean())
        if self.first_loss is None and math.isfinite(value):
            self.first_loss = value
        if not math.isfinite(value):
            self._stop(trainer, f"the training loss is {value}")
        first = self.first_loss or 0.0
        if abs(value) > DIVERGED * max(1.0, abs(first)):
            self._stop(trainer, f"the training loss is {value:.3g}, over {DIVERGED:g} times its first, {first:.3g},")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before the checkpoint callbacks, which Lightning runs last."""
        if not trainer.sanity_checking:
            self._check_metrics(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_metrics(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        weights = checkpoint["state_dict"].items()
        bad = next((k for k, v in weights if v.is_floating_point() and not v.isfinite().all()), None)
        if bad is not None:
            self._stop(trainer, f"the weights hold non-finite values ({bad})")

    def state_dict(self) -> dict[str, Any]:
        return {"first_loss": self.first_loss}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.first_loss = state_dict.get("first_loss")

    def _check_metrics(self, trainer: pl.Trainer) -> None:
        for name, value in trainer.callback_metrics.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1 and not math.isfinite(float(value)):
                self._stop(trainer, f"{name} is {float(value)}")

    def _stop(self, trainer: pl.Trainer, what: str) -> None:
        rates = sorted({group["lr"] for optimizer in trainer.optimizers for group in optimizer.param_groups})
        lr = ", ".join(f"{rate:g}" for rate in rates) or "?"
        raise ValueError(
            f"{self.phase}: {what} at epoch {trainer.current_epoch} (learning rate {lr}): the weights diverged; "
            "lower the learning rate (or clip gradients). No checkpoint of this epoch is kept."
        )
