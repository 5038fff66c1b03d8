"""The checkpoints of a training phase: its best epoch by a validation metric (ties broken on the validation loss),
and its latest epoch, saved every epoch so that a killed phase continues from where it was. Each file is written whole
or not at all."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

__all__ = ["AtomicCheckpoint", "BestCheckpoint", "best_checkpoint", "latest_checkpoint"]

LAST = "last"  # the latest epoch's file name, without `.ckpt`
TIE_BREAK = "val/loss"  # what decides between epochs of equal validation metric (lower is better)


class AtomicCheckpoint(ModelCheckpoint):
    """A `ModelCheckpoint` that writes each file beside its final name and renames it into place.

    Lightning's own write goes through a temporary file in the system's temporary folder and a copy across devices:
    a full disk left a truncated `last.ckpt` that every later resume died on, and the error named the temporary file.
    Here a failed write leaves the previous checkpoint as it was, and the error names the checkpoint."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        partial = f"{filepath}.partial"
        try:
            super()._save_checkpoint(trainer, partial)
        except OSError as error:
            if trainer.is_global_zero:
                Path(partial).unlink(missing_ok=True)
            why = f"could not write this checkpoint ({error.strerror or error}); the one before is kept"
            raise OSError(error.errno, why, filepath) from error
        if trainer.is_global_zero:
            os.replace(partial, filepath)
        trainer.strategy.barrier("AtomicCheckpoint")
        self._last_checkpoint_saved = filepath

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A run directory copied or moved elsewhere resumes as it would have in place: the files the state names
        (best, k-th best, last) are this folder's. Lightning reloaded only the best path, the original run's, and
        forgot the best score, so the next epoch became the best whatever its score."""
        before = state_dict.get("dirpath")
        if before and self.dirpath and before != self.dirpath:

            def moved(path: str | None) -> str | None:
                return os.path.join(self.dirpath, os.path.relpath(path, before)) if path else path

            paths = ("best_model_path", "kth_best_model_path", "last_model_path")
            state_dict = {
                **state_dict,
                **{key: moved(state_dict.get(key)) for key in paths},
                "dirpath": self.dirpath,
                "best_k_models": {moved(k): v for k, v in state_dict.get("best_k_models", {}).items()},
            }
        super().load_state_dict(state_dict)


class BestCheckpoint(AtomicCheckpoint):
    """The single best epoch by `monitor`; an epoch that equals the best is better if its `tie_break` is lower.

    A small validation split saturates a metric (AUROC 1.0 from epoch 0) while the model goes on learning (validation
    loss 0.169 -> 8e-5 in one such run): keeping the first epoch of the plateau kept the least trained model. Ties
    without a tie-break value (an epoch that did not log it) keep the earlier epoch, as before."""

    def __init__(self, *args: Any, tie_break: str | None = TIE_BREAK, **kwargs: Any) -> None:
        super().__init__(*args, save_top_k=1, **kwargs)
        self.tie_break = tie_break if tie_break != self.monitor else None
        self.best_tie: torch.Tensor | None = None
        self._candidates: dict[str, torch.Tensor] = {}

    def _save_monitor_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        self._candidates = monitor_candidates
        super()._save_monitor_checkpoint(trainer, monitor_candidates)

    def check_monitor_top_k(self, trainer: pl.Trainer, current: torch.Tensor | None = None) -> bool:
        if current is None or super().check_monitor_top_k(trainer, current):
            return current is not None
        tie = self._candidates.get(self.tie_break) if self.tie_break else None
        best = self.best_model_score
        ties = (
            tie is not None
            and self.best_tie is not None
            and best is not None
            and bool(torch.eq(current.cpu(), best.cpu()))
            and bool(torch.lt(tie.cpu(), self.best_tie.cpu()))
        )
        return trainer.strategy.reduce_boolean_decision(ties)

    def _update_best_and_save(
        self, current: torch.Tensor, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]
    ) -> None:
        tie = monitor_candidates.get(self.tie_break) if self.tie_break else None
        self.best_tie = tie.detach().cpu().clone() if tie is not None else None
        super()._update_best_and_save(current, trainer, monitor_candidates)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_tie": self.best_tie}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best_tie = state_dict.get("best_tie")


def best_checkpoint(dirpath: str | os.PathLike | None, monitor: str, mode: str, **kwargs) -> BestCheckpoint:
    """The best epoch by `monitor` (`best-epoch=<k>.ckpt`; ties: the lower validation loss, else the earlier epoch)."""
    return BestCheckpoint(dirpath, "best-{epoch}", monitor=monitor, mode=mode, **kwargs)


def latest_checkpoint(dirpath: str | os.PathLike | None) -> AtomicCheckpoint:
    """`last.ckpt`, the full training state after every epoch (a `save_last` would only write it when the best
    checkpoint is written, so a phase killed after its last improvement would go back there)."""
    return AtomicCheckpoint(dirpath, LAST, enable_version_counter=False)
