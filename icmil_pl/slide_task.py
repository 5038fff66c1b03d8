"""What every slide-level model shares: MIL loss, metrics per stage, checkpoint selection, the callbacks that write
predictions and figures.

Subclasses say how a batch (one bag) becomes the instances the aggregator sees (`instances`) and how they train.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint

from data_modules.bag_base import BagDataModule
from data_modules.cohort import name_classes
from data_modules.slides import SlideError
from data_modules.splits import save_splits

from .aggregators import Aggregator, MILOutput
from .callbacks.figure_writer import FigureWriter, resolve_figures
from .callbacks.outputs import output_dir
from .callbacks.prediction_writer import PredictionWriter
from .metrics import slide_metrics

__all__ = ["ClassNames", "SlideTask"]

Scheduler = Literal["none", "cosine"]
ClassNames = dict[str, str] | list[str] | None  # {label value: name}, or names in the order of the sorted label values


class SlideTask(pl.LightningModule):
    """Base LightningModule for slide classification from one bag per batch.

    Validation AUROC selects the checkpoint; `test` and `predict` write `predictions.csv` (one row per slide) and,
    with `figures` (a `FigureWriter`, `True` for the default one, `False` for none), ROC, confusion, heatmap and patch
    figures into the run directory, beside the data module's `splits.json`. Metrics are logged per stage
    under `val/...` and `test/...` with `batch_size=1`.
    """

    def __init__(
        self,
        aggregator: Aggregator,
        aux_loss_weight: float = 1.0,
        class_names: ClassNames = None,
        figures: FigureWriter | bool = True,
    ) -> None:
        super().__init__()
        self.aggregator = aggregator
        self.num_classes = aggregator.num_classes
        self.aux_loss_weight = aux_loss_weight
        self.class_names = class_names
        self.figures = figures
        self.checkpoint_dir: str | None = None  # None: Lightning's default, <run dir>/checkpoints
        self.metrics = torch.nn.ModuleDict(
            {stage: slide_metrics(self.num_classes).clone(prefix=f"{stage}/") for stage in ("val", "test")}
        )

    @abstractmethod
    def instances(self, batch: dict) -> torch.Tensor:
        """(N, in_dim): what the aggregator sees of one bag (evaluation: no graph bookkeeping)."""

    def bag_output(self, batch: dict) -> MILOutput:
        """The aggregator output for one bag (evaluation)."""
        return self.aggregator(self.instances(batch))

    @property
    def class_labels(self) -> list[str]:
        """What outputs call the classes: `class_names` (resolved against the data's label values in `setup`, or
        restored from a checkpoint), else the class indices."""
        if isinstance(self.class_names, list):
            return self.class_names
        return [str(c) for c in range(self.num_classes)]

    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule if self.trainer is not None else None
        classes = getattr(data, "num_classes", None)
        if classes is not None and classes != self.num_classes:
            raise ValueError(f"model aggregator num_classes={self.num_classes}, but the labels have {classes} classes")
        if getattr(data, "classes", None):
            self.class_names = name_classes(self.class_names, [str(c) for c in data.classes])
        if isinstance(data, BagDataModule) and data.splits is not None:  # the slides of each split, beside the run
            folder = output_dir(self.trainer)  # a collective: every process asks
            if self.trainer.is_global_zero:
                save_splits(data.splits, folder)

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
        with self.unless_unreadable(batch):
            self._evaluate("val", batch)

    def test_step(self, batch: dict, batch_idx: int) -> dict | None:
        with self.unless_unreadable(batch):
            probs, _ = self._evaluate("test", batch)
            return {"slide_id": batch["slide_id"], "label": int(batch["label"]), "probs": probs}
        return None

    def predict_step(self, batch: dict, batch_idx: int) -> dict | None:
        """The slide's probabilities, its attention, and every patch's class probabilities on its own (the bag head
        applied to one instance: ICMIL's instance teacher), for heatmaps and the QuPath export."""
        out = None
        with self.unless_unreadable(batch):
            h = self.instances(batch)
            out = self.aggregator(h)
            instance_probs = self.aggregator.instance_logits(h).float().softmax(-1).cpu()
        if out is None:
            return None
        return {
            "slide_id": batch["slide_id"],
            "label": int(batch["label"]) if "label" in batch else None,
            "probs": out.logits.float().softmax(-1).cpu(),
            "attention": None if out.attention is None else out.attention.float().cpu(),
            "instance_probs": instance_probs,
        }

    @contextlib.contextmanager
    def unless_unreadable(self, batch: dict):
        """Run the body; a slide whose patches cannot be read (a broken tile) stops the run, or, where the data says
        `on_slide_error: skip`, is recorded in the data's `skipped` and the body is left (whatever it would have
        returned stays unset)."""
        try:
            yield
        except SlideError as error:
            data = self.trainer.datamodule if self.trainer is not None else None
            if getattr(data, "on_slide_error", "raise") != "skip":
                raise
            data.skipped[batch["slide_id"]] = str(error)

    def configure_callbacks(self) -> list[pl.Callback]:
        """Keep the best model by validation AUROC (ties: the earlier epoch), and the last for resuming; write
        predictions.csv and the figures, unless the Trainer has its own writer of the kind."""
        callbacks: list[pl.Callback] = [
            ModelCheckpoint(
                dirpath=self.checkpoint_dir, monitor="val/auroc", mode="max", save_last=True, filename="best-{epoch}"
            )
        ]
        for writer in (PredictionWriter(), resolve_figures(self.figures)):
            if writer is not None and not any(isinstance(c, type(writer)) for c in self.trainer.callbacks):
                callbacks.append(writer)
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
