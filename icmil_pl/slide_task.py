"""What every slide-level model shares: MIL loss, metrics per stage, checkpoint selection, per-slide predictions.

Subclasses say how a batch (one bag) becomes an aggregator output (`bag_output`) and how they train.
"""

from __future__ import annotations

import csv
from abc import abstractmethod
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint

from .aggregators import Aggregator, MILOutput
from .figures import FigureWriter
from .metrics import slide_metrics

__all__ = ["SlideTask"]

Scheduler = Literal["none", "cosine"]


class SlideTask(pl.LightningModule):
    """Base LightningModule for slide classification from one bag per batch.

    Validation AUROC selects the checkpoint; `test` and `predict` write `predictions.csv` (one row per slide) into the
    run directory. Metrics are logged per stage under `val/...` and `test/...` with `batch_size=1`.
    """

    def __init__(self, aggregator: Aggregator, aux_loss_weight: float = 1.0, class_names: list[str] | None = None):
        super().__init__()
        self.aggregator = aggregator
        self.num_classes = aggregator.num_classes
        self.aux_loss_weight = aux_loss_weight
        self.class_names = class_names
        self.checkpoint_dir: str | None = None  # None: Lightning's default, <run dir>/checkpoints
        self.metrics = torch.nn.ModuleDict(
            {stage: slide_metrics(self.num_classes).clone(prefix=f"{stage}/") for stage in ("val", "test")}
        )
        self._predictions: list[dict] = []

    @abstractmethod
    def bag_output(self, batch: dict) -> MILOutput:
        """The aggregator output for one bag, without gradients bookkeeping (evaluation)."""

    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule if self.trainer is not None else None
        classes = getattr(data, "num_classes", None)
        if classes is not None and classes != self.num_classes:
            raise ValueError(f"model aggregator num_classes={self.num_classes}, but the labels have {classes} classes")
        if self.class_names is None and getattr(data, "classes", None):
            self.class_names = [str(c) for c in data.classes]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["class_names"] = self.class_names

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """The classes the model was trained on name its outputs, also on slides without labels."""
        if checkpoint.get("class_names"):
            self.class_names = list(checkpoint["class_names"])

    def loss(self, out: MILOutput, label: torch.Tensor) -> torch.Tensor:
        """Cross entropy of the bag logits, plus the aggregator's auxiliary predictions of the same bag label."""
        loss = F.cross_entropy(out.logits.float().unsqueeze(0), label.view(1))
        if out.aux_logits is not None:  # DTFD tier-1 pseudo-bags, DSMIL max instance
            aux_target = label.view(1).expand(out.aux_logits.shape[0])
            loss = loss + self.aux_loss_weight * F.cross_entropy(out.aux_logits.float(), aux_target)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate("val", batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        probs, _ = self._evaluate("test", batch)
        self._predictions.append({"slide_id": batch["slide_id"], "label": int(batch["label"]), "probs": probs})

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        out = self.bag_output(batch)
        row = {
            "slide_id": batch["slide_id"],
            "label": int(batch["label"]) if "label" in batch else None,
            "probs": out.logits.float().softmax(-1).cpu(),
            "attention": None if out.attention is None else out.attention.float().cpu(),
        }
        self._predictions.append(row)
        return row

    def on_test_epoch_start(self) -> None:
        self._predictions = []

    def on_predict_epoch_start(self) -> None:
        self._predictions = []

    def on_test_epoch_end(self) -> None:
        self._gather_predictions()
        self._write_predictions()

    def on_predict_epoch_end(self) -> None:
        self._gather_predictions()
        self._write_predictions()

    @property
    def predictions(self) -> list[dict]:
        """This test or predict epoch's rows: slide_id, label (None if unknown), probs[, attention]. During the epoch,
        this process's slides so far; from the epoch's end on, every process's, in dataset order."""
        return self._predictions

    def _gather_predictions(self) -> None:
        """Under DDP each process saw every world_size-th slide (`UnrepeatedDistributedSampler`): interleaving the
        processes' rows restores the dataset order."""
        if self.trainer.world_size <= 1:
            return
        parts: list[list[dict]] = [[] for _ in range(self.trainer.world_size)]
        torch.distributed.all_gather_object(parts, self._predictions)
        self._predictions = [part[j] for j in range(max(map(len, parts))) for part in parts if j < len(part)]

    def configure_callbacks(self) -> list[pl.Callback]:
        """Keep the best model by validation AUROC (ties: the earlier epoch), and the last for resuming; draw the
        test and predict figures (`FigureWriter`) unless the Trainer has a configured one."""
        callbacks: list[pl.Callback] = [ModelCheckpoint(dirpath=self.checkpoint_dir, monitor="val/auroc", mode="max",
                                                        save_last=True, filename="best-{epoch}")]  # fmt: skip
        if not any(isinstance(c, FigureWriter) for c in self.trainer.callbacks):
            callbacks.append(FigureWriter())
        return callbacks

    def adam(self, param_groups, lr: float, weight_decay: float, scheduler: Scheduler):
        optimizer = torch.optim.Adam(param_groups, lr=lr, weight_decay=weight_decay)
        if scheduler == "none":
            return optimizer
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.trainer.max_epochs or 1))
        return {"optimizer": optimizer, "lr_scheduler": cosine}

    def _evaluate(self, stage: str, batch: dict) -> tuple[torch.Tensor, MILOutput]:
        out = self.bag_output(batch)
        probs = out.logits.float().softmax(-1)
        self.metrics[stage].update(probs.unsqueeze(0), batch["label"].view(1))
        self.log(f"{stage}/loss", self.loss(out, batch["label"]), on_epoch=True, batch_size=1, sync_dist=True)
        self.log_dict(self.metrics[stage], on_epoch=True, batch_size=1, prog_bar=stage == "val")
        return probs.detach().cpu(), out

    def _write_predictions(self) -> None:
        """`predictions.csv` in the run directory: one row per slide, predicted class and probabilities."""
        run_dir = self.trainer.log_dir or self.trainer.default_root_dir  # a collective: every process asks
        if not self.trainer.is_global_zero or not self._predictions:
            return
        path = Path(run_dir) / "predictions.csv"
        names = self.class_names or [str(c) for c in range(self.num_classes)]
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["slide_id", "label", "predicted", *[f"prob_{n}" for n in names]])
            for row in self._predictions:
                probs = row["probs"].tolist()
                predicted = max(range(len(probs)), key=probs.__getitem__)
                label = "" if row["label"] is None else names[row["label"]]
                writer.writerow([row["slide_id"], label, names[predicted], *[f"{p:.6f}" for p in probs]])
