"""The bag classifier: an aggregator trained on cached features (two-stage MIL, and ICMIL's bag phase)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .aggregators import Aggregator, MILOutput
from .callbacks.figure_writer import FigureWriter
from .slide_task import ClassNames, Scheduler, SlideTask
from .tasks import Task

__all__ = ["BagClassifier"]


class BagClassifier(SlideTask):
    """Aggregator + optimiser settings (ICMIL's defaults: Adam, lr 2e-4, weight decay 1e-4, gradient norm clipped at 5,
    here or as the trainer's `gradient_clip_val`).

    A batch is one bag: `{"features": (N, D), "label": target, "slide_id": str}`. With `standardize`, features are
    centred and scaled per dimension by statistics of the training split (stored in the checkpoint): raw features of
    different embedders, or of one embedder across ICMIL iterations, differ in scale by orders of magnitude.
    `bags_per_step` bags make one optimizer step (the mean of their losses; a Cox survival loss compares them).
    """

    def __init__(
        self,
        aggregator: Aggregator,
        lr: float = 2e-4,
        weight_decay: float = 1e-4,
        scheduler: Scheduler = "none",
        standardize: bool = True,
        aux_loss_weight: float = 1.0,
        class_names: ClassNames = None,
        figures: FigureWriter | bool = True,
        task: Task | None = None,
        bags_per_step: int = 1,
        gradient_clip_val: float | None = None,
    ) -> None:
        super().__init__(aggregator, aux_loss_weight, class_names, figures, task, gradient_clip_val)
        self.save_hyperparameters(ignore=["aggregator", "figures", "task"])
        if bags_per_step < 1 or (self.task.needs_several_bags and bags_per_step < 2):
            need = (
                "an int >= 2 (a Cox loss compares the bags of a step)"
                if self.task.needs_several_bags
                else "an int >= 1"
            )
            raise ValueError(f"bags_per_step: expected {need}, got {bags_per_step}")
        # settings live in plain attributes: LightningCLI rewrites the hparams of modules nested in another module
        self.cfg = SimpleNamespace(
            lr=lr, weight_decay=weight_decay, scheduler=scheduler, standardize=standardize, bags_per_step=bags_per_step
        )
        self._step_bags: list[tuple[MILOutput, torch.Tensor]] = []  # the bags of the optimizer step under way
        self.register_buffer("feature_mean", torch.zeros(aggregator.in_dim))
        self.register_buffer("feature_std", torch.ones(aggregator.in_dim))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dim = getattr(self.trainer.datamodule, "feature_dim", None) if self.trainer is not None else None
        if dim is not None and dim != self.aggregator.in_dim:
            raise ValueError(f"model aggregator in_dim={self.aggregator.in_dim}, but the features are {dim}-d")
        if stage == "fit" and self.cfg.standardize and hasattr(self.trainer.datamodule, "feature_stats"):
            mean, std = self.trainer.datamodule.feature_stats("train")
            self.feature_mean.copy_(mean)
            self.feature_std.copy_(std)

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        """Standardised float32 features (caches may store float16; converting on the device is free)."""
        return (features.float() - self.feature_mean) / self.feature_std

    def instances(self, batch: dict) -> torch.Tensor:
        return self.normalize(batch["features"])

    def instance_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The bag head on each instance, standardization included: ICMIL's instance-level teacher."""
        return self.aggregator.instance_logits(self.normalize(features))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        """One bag; every `bags_per_step`-th (and the epoch's last) steps the optimizer on the loss of the step's bags
        and returns it, the others wait with their graphs and return None."""
        self._step_bags.append((self.bag_output(batch), batch["label"]))
        if len(self._step_bags) < self.cfg.bags_per_step and not self.trainer.is_last_batch:
            return None
        outs, targets = zip(*self._step_bags, strict=True)
        self._step_bags = []
        if self.task.needs_several_bags and len(outs) < 2:
            return None  # an epoch's odd bag out: nothing to compare it with
        loss = self.task.loss_of_bags(list(outs), list(targets), self.aux_loss_weight)
        optimizer = self.optimizers()
        self.manual_backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.epoch_means.add("train/loss", loss, len(outs))
        return loss.detach()

    def configure_optimizers(self):
        cfg = self.cfg
        return self.adam(self.parameters(), cfg.lr, cfg.weight_decay, cfg.scheduler)
