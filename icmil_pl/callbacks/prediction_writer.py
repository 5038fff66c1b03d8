"""`predictions.csv` of a test or predict run: one row per bag (a slide, or a patient), whichever process scored it."""

from __future__ import annotations

import csv
from typing import Any

import pytorch_lightning as pl
import torch

from .outputs import output_dir

__all__ = ["PREDICTIONS_FILE", "PredictionWriter"]

PREDICTIONS_FILE = "predictions.csv"


class PredictionWriter(pl.Callback):
    """Collects the row each test or predict step returns (`slide_id`, `label` (the target; None if unknown),
    `outputs`[, `attention`]), gathers every process's rows in dataset order at the epoch's end, and writes
    `<output dir>/predictions.csv`: `slide_id,label,predicted,<the task's outputs>` (`prob_<class>...` for
    classification and multilabel, `predicted_<target>` for regression, `risk` for survival), `label` and
    `predicted` as the task writes them (`Task.describe_target`, `describe_call`); patient bags (rows with `slides`)
    write `patient_id` as the first column. `rows` then holds all of them,
    for the callbacks that draw or log them."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    @classmethod
    def of(cls, trainer: pl.Trainer) -> PredictionWriter:
        """The trainer's prediction writer (every `SlideTask` adds one)."""
        writer = next((c for c in trainer.callbacks if isinstance(c, cls)), None)
        if writer is None:
            raise ValueError("trainer.callbacks: expected a PredictionWriter (SlideTask.configure_callbacks adds one)")
        return writer

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows = []

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows = []

    def on_test_batch_end(self, trainer, pl_module, outputs: Any, batch, batch_idx, dataloader_idx=0) -> None:
        if outputs is not None:  # None: a slide skipped as unreadable (on_slide_error: skip)
            self.rows.append(outputs)

    def on_predict_batch_end(self, trainer, pl_module, outputs: Any, batch, batch_idx, dataloader_idx=0) -> None:
        if outputs is not None:
            self.rows.append(outputs)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, pl_module)

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, pl_module)

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        folder = output_dir(trainer)
        self._gather(trainer)
        if trainer.is_global_zero and self.rows:
            self._write(folder / PREDICTIONS_FILE, pl_module.task, pl_module.class_labels)

    def _gather(self, trainer: pl.Trainer) -> None:
        """Under DDP each process saw every world_size-th slide (`UnrepeatedDistributedSampler`): interleaving the
        processes' rows restores the dataset order."""
        if trainer.world_size <= 1:
            return
        parts: list[list[dict]] = [[] for _ in range(trainer.world_size)]
        torch.distributed.all_gather_object(parts, self.rows)
        self.rows = [part[j] for j in range(max(map(len, parts))) for part in parts if j < len(part)]

    def _write(self, path, task, names: list[str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            bag = "patient_id" if "slides" in self.rows[0] else "slide_id"  # a patient bag: one row per patient
            writer.writerow([bag, "label", "predicted", *task.output_names(names)])
            for row in self.rows:
                outputs = row["outputs"]
                label, call = task.describe_target(row["label"], names), task.describe_call(outputs, names)
                writer.writerow([row["slide_id"], label, call, *[f"{v:.6f}" for v in outputs.reshape(-1).tolist()]])
