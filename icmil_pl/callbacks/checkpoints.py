"""The checkpoints of a training phase: its best epoch by a validation metric, and its latest epoch, saved every
epoch so that a killed phase continues from where it was. Each file is written whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

__all__ = ["AtomicCheckpoint", "best_checkpoint", "latest_checkpoint"]

LAST = "last"  # the latest epoch's file name, without `.ckpt`


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


def best_checkpoint(dirpath: str | os.PathLike | None, monitor: str, mode: str, **kwargs) -> AtomicCheckpoint:
    """The best epoch by `monitor` (`best-epoch=<k>.ckpt`; ties keep the earlier epoch)."""
    return AtomicCheckpoint(dirpath, "best-{epoch}", monitor=monitor, mode=mode, **kwargs)


def latest_checkpoint(dirpath: str | os.PathLike | None) -> AtomicCheckpoint:
    """`last.ckpt`, the full training state after every epoch (a `save_last` would only write it when the best
    checkpoint is written, so a phase killed after its last improvement would go back there)."""
    return AtomicCheckpoint(dirpath, LAST, enable_version_counter=False)
