"""The bag classifier: an aggregator trained on cached features (two-stage MIL, and ICMIL's bag phase)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .aggregators import Aggregator
from .callbacks.figure_writer import FigureWriter
from .slide_task import ClassNames, Scheduler, SlideTask

__all__ = ["BagClassifier"]


class BagClassifier(SlideTask):
    """Aggregator + optimiser settings (ICMIL's defaults: Adam, lr 2e-4, weight decay 1e-4; clip 5 in the trainer).

    A batch is one bag: `{"features": (N, D), "label": int, "slide_id": str}`. With `standardize`, features are
    centred and scaled per dimension by statistics of the training split (stored in the checkpoint): raw features of
    different embedders, or of one embedder across ICMIL iterations, differ in scale by orders of magnitude.
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
    ) -> None:
        super().__init__(aggregator, aux_loss_weight, class_names, figures)
        self.save_hyperparameters(ignore=["aggregator", "figures"])
        # settings live in plain attributes: LightningCLI rewrites the hparams of modules nested in another module
        self.cfg = SimpleNamespace(lr=lr, weight_decay=weight_decay, scheduler=scheduler, standardize=standardize)
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

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(self.bag_output(batch), batch["label"])
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=1, prog_bar=True)
        return loss

    def configure_optimizers(self):
        cfg = self.cfg
        return self.adam(self.parameters(), cfg.lr, cfg.weight_decay, cfg.scheduler)
