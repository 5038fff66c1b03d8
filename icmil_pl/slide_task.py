"""What every slide-level model shares: the task (loss, metrics, checkpoint selection; `icmil_pl.tasks`), metrics per
stage, the callbacks that write predictions and figures.

Subclasses say how a batch (one bag) becomes the instances the aggregator sees (`instances`) and how they train.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from typing import Literal

import pytorch_lightning as pl
import torch

from data_modules.cohort import name_classes
from data_modules.cohort.splits import save_splits
from data_modules.datasets.bag_base import BagDataModule
from data_modules.io import check
from data_modules.slides import SlideError

from .aggregators import Aggregator, MILOutput
from .callbacks.checkpoints import best_checkpoint, latest_checkpoint
from .callbacks.divergence import DivergenceGuard
from .callbacks.figure_writer import FigureWriter, resolve_figures
from .callbacks.outputs import output_dir
from .callbacks.prediction_writer import PredictionWriter
from .epoch_means import EpochMeans
from .run_record import ARCHITECTURE_KEY, RECORD_KEY, architecture, check_record, record_of
from .tasks import Classification, Task, check_data, flatten_per_label

__all__ = ["ClassNames", "SlideTask", "take_trainer_clipping"]

Scheduler = Literal["none", "cosine"]
ClassNames = dict[str, str] | list[str] | None  # {label value: name}, or names in the order of the sorted label values


class SlideTask(pl.LightningModule):
    """Base LightningModule for slide-level learning from one bag per batch.

    `task` (default `Classification`) owns the loss, the metrics and the validation metric that selects the
    checkpoint (`task.selects_by`); `test` and `predict` write `predictions.csv` (one row per slide) and, with `figures`
    (a `FigureWriter`, `True` for the default one, `False` for none), the task's test figures, heatmaps and patch
    figures into the run directory, beside the data module's `splits.json`. Metrics are logged per stage under
    `val/...` and `test/...`, computed once per epoch over all of its slides.

    Optimization is manual (subclasses step in `training_step`): Lightning's automatic loop costs about 0.3 ms a step
    in hooks and closures, a sixth of a small bag's step. `gradient_clip_val` clips by norm in
    `on_before_optimizer_step`, after the precision plugin unscaled fp16 gradients; a Trainer's `gradient_clip_val` is
    handed to it by whoever builds the Trainer (`take_trainer_clipping`). Schedulers step once per epoch.
    """

    def __init__(
        self,
        aggregator: Aggregator,
        aux_loss_weight: float = 1.0,
        class_names: ClassNames = None,
        figures: FigureWriter | bool = True,
        task: Task | None = None,
        gradient_clip_val: float | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gradient_clip_val = gradient_clip_val
        self.aggregator = aggregator
        self.task = task or Classification()
        self.num_classes = aggregator.num_classes
        self.aux_loss_weight = aux_loss_weight
        self.class_names = class_names  # as configured; `names` holds them resolved
        self.names: list[str] | None = None  # class names in index order: from `setup`, or from a checkpoint
        self.figures = figures
        self.checkpoint_dir: str | None = None  # None: Lightning's default, <run dir>/checkpoints
        self.record: dict | None = None  # what it was trained on (`run_record`), saved in its checkpoints
        placeholder = [str(k) for k in range(self.task.name_count(self.num_classes))]  # metrics need only how many
        self.metrics = torch.nn.ModuleDict(
            {stage: self.task.metrics(placeholder).clone(prefix=f"{stage}/") for stage in ("val", "test")}
        )
        self.epoch_means = EpochMeans()  # the stages' losses until their epoch ends
        self._evaluated: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"val": [], "test": []}

    @abstractmethod
    def instances(self, batch: dict) -> torch.Tensor:
        """(N, in_dim): what the aggregator sees of one bag (evaluation: no graph bookkeeping)."""

    def bag_output(self, batch: dict) -> MILOutput:
        """The aggregator output for one bag (evaluation)."""
        return self.aggregator(self.instances(batch))

    @property
    def class_labels(self) -> list[str]:
        """What outputs call the classes: `class_names` resolved against the data's label values in `setup` (or
        restored from a checkpoint), else the class indices."""
        return self.names or [str(c) for c in range(self.task.name_count(self.num_classes))]

    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule if self.trainer is not None else None
        if isinstance(data, BagDataModule):
            check_data(self.task, data.targets.task, data.classes, self.num_classes)
            if stage == "fit":  # survival bins, regression scale: from the training bags' targets
                self.task.fit_targets(torch.stack([t.float() for t in data.bag_targets("train")]))
        if getattr(data, "classes", None):
            self.names = name_classes(self.class_names, [str(c) for c in data.classes])
        if isinstance(data, BagDataModule) and data.splits is not None:  # the slides of each split, beside the run
            folder = output_dir(self.trainer)  # a collective: every process asks
            if self.trainer.is_global_zero:
                save_splits(data.splits, folder)
            if stage == "fit":
                self.record = record_of(data)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["class_names"] = self.names
        checkpoint[ARCHITECTURE_KEY] = architecture(self)
        if self.record is not None:
            checkpoint[RECORD_KEY] = self.record

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """The classes the model was trained on name its outputs, also on slides without labels; data encoded or
        embedded otherwise than its record says is refused."""
        if checkpoint.get("class_names"):
            self.names = list(checkpoint["class_names"])
        self.record = checkpoint.get(RECORD_KEY, self.record)
        data = self.trainer.datamodule if self._trainer is not None else None
        if self.record is not None and isinstance(data, BagDataModule):
            check_record(self.record, data, "the checkpoint")

    def loss(self, out: MILOutput, label: torch.Tensor) -> torch.Tensor:
        """The task's loss of the bag output, its auxiliary predictions (DTFD, DSMIL) included."""
        return self.task.loss(out, label, self.aux_loss_weight)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        with self.unless_unreadable(batch):
            self._evaluate("val", batch)

    def test_step(self, batch: dict, batch_idx: int) -> dict | None:
        with self.unless_unreadable(batch):
            outputs, _ = self._evaluate("test", batch)
            return {"slide_id": batch["slide_id"], "label": batch["label"].cpu(), "outputs": outputs, **_slides(batch)}
        return None

    def predict_step(self, batch: dict, batch_idx: int) -> dict | None:
        """The slide's outputs (class probabilities, a value, a risk: `task.outputs`), its attention, and every
        patch's outputs on its own (the bag head applied to one instance: ICMIL's instance teacher), for heatmaps and
        the QuPath export."""
        out = None
        with self.unless_unreadable(batch):
            h = self.instances(batch)
            out = self.aggregator(h)
            instance_outputs = self.task.outputs(self.aggregator.instance_logits(h)).cpu()
        if out is None:
            return None
        return {
            "slide_id": batch["slide_id"],
            "label": batch["label"].cpu() if "label" in batch else None,
            "outputs": self.task.outputs(out.logits).cpu(),
            "attention": None if out.attention is None else out.attention.float().cpu(),
            "instance_outputs": instance_outputs,
            **_slides(batch),
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
        """Keep the best model by the task's selection metric (ties: the lower validation loss), and the last for
        resuming; write predictions.csv and the figures, and stop if the weights diverge, unless the Trainer has its
        own callback of the kind (the ICMIL loop names its phases' guards)."""
        metric, mode = self.task.selects_by
        callbacks: list[pl.Callback] = [
            best_checkpoint(self.checkpoint_dir, f"val/{metric}", mode),
            latest_checkpoint(self.checkpoint_dir),
        ]
        for writer in (PredictionWriter(), resolve_figures(self.figures), DivergenceGuard()):
            if writer is not None and not any(isinstance(c, type(writer)) for c in self.trainer.callbacks):
                callbacks.append(writer)
        return callbacks

    def adam(self, param_groups, lr: float, weight_decay: float, scheduler: Scheduler):
        optimizer = torch.optim.Adam(param_groups, lr=lr, weight_decay=weight_decay)
        if scheduler == "none":
            return optimizer
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.trainer.max_epochs or 1))
        return {"optimizer": optimizer, "lr_scheduler": cosine}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")

    def on_train_epoch_end(self) -> None:
        self.epoch_means.log(self, "train/", prog_bar=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def _evaluate(self, stage: str, batch: dict) -> tuple[torch.Tensor, MILOutput]:
        """The bag's outputs, kept (with its target) for the stage's metrics at the epoch's end: one metric update per
        epoch instead of one per bag."""
        out = self.bag_output(batch)
        outputs = self.task.outputs(out.logits).detach()
        self._evaluated[stage].append((outputs, batch["label"]))
        if not self.task.needs_several_bags:  # a Cox loss has no value for one bag
            self.epoch_means.add(f"{stage}/loss", self.loss(out, batch["label"]))
        return outputs.cpu(), out

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def _log_metrics(self, stage: str) -> None:
        """The stage's loss and metrics over all of its slides (every process's, under DDP)."""
        evaluated, self._evaluated[stage] = self._evaluated[stage], []
        if not evaluated:  # nothing evaluated (no validation, all skipped)
            return
        self.epoch_means.log(self, f"{stage}/")
        outputs, targets = (torch.stack(column) for column in zip(*evaluated, strict=True))
        metrics = self.metrics[stage]
        metrics.update(*self.task.metric_input(outputs, targets))
        values = flatten_per_label(metrics.compute(), self.class_labels)
        self.log_dict(values, prog_bar=stage == "val")
        metrics.reset()


def take_trainer_clipping(module: SlideTask, trainer_kwargs: dict) -> None:
    """Move a Trainer's `gradient_clip_val` out of `trainer_kwargs` into `module`, which optimizes manually (Lightning
    refuses the setting then): one config's trainer serves every phase, and users set clipping there."""
    clip = trainer_kwargs.pop("gradient_clip_val", None)
    algorithm = trainer_kwargs.pop("gradient_clip_algorithm", None)
    check("trainer.gradient_clip_algorithm", algorithm in (None, "norm"), "'norm' (models clip by norm)", algorithm)
    accumulate = trainer_kwargs.pop("accumulate_grad_batches", 1)
    check("trainer.accumulate_grad_batches", accumulate == 1, "1 (set the model's bags_per_step)", accumulate)
    if clip is None:
        return
    if module.gradient_clip_val not in (None, clip):
        raise ValueError(f"gradient_clip_val: the trainer says {clip}, the model {module.gradient_clip_val}; set one")
    module.gradient_clip_val = clip


def _slides(batch: dict) -> dict:
    """A patient bag's (slide id, patch count) per slide (`data_modules.datasets.patient_bags`), for per-slide
    outputs."""
    return {"slides": batch["slides"]} if "slides" in batch else {}
