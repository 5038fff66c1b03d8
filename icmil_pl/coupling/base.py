"""What every ICMIL coupling shares: the strategy interface (with its entry checks written once), the frozen
standardised bag head, the head's reduced features, and fitting a module to its best epoch."""

from __future__ import annotations

import copy
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor, nn

from data_modules.io import check
from data_modules.slides.tiling import SlidePatches

from ..aggregators import Aggregator, MILOutput
from ..bag_classifier import BagClassifier
from ..callbacks.checkpoints import best_checkpoint, latest_checkpoint
from ..encoders import PatchEmbedder
from ..run_dir import checkpoint_dir, resume_checkpoint
from ..tasks import Task

__all__ = [
    "CouplingRun",
    "CouplingStrategy",
    "StandardizedHead",
    "coupling_checkpoint",
    "check_optimizer",
    "fit_best",
    "reduced_features",
    "trainable_copy",
]


class CouplingStrategy(ABC):
    """How ICMIL turns E_i into E_{i+1}. Strategies are configuration only: `fit` builds everything it trains."""

    needs_labels: ClassVar[bool] = False  # whether `fit` uses the slide labels
    why_not: ClassVar[str] = ""  # why `can_couple` refuses a task, where it does

    def can_couple(self, task: Task) -> bool:
        """Whether this strategy can couple a bag classifier of `task`: any task by default."""
        return True

    def fit(
        self,
        embedder: PatchEmbedder,
        bag: BagClassifier,
        train: Sequence[SlidePatches],
        *,
        trainer_kwargs: Mapping[str, Any],
        root: str | os.PathLike,
        seed: int,
        labels: Mapping[str, Tensor] | None = None,
        val: Sequence[SlidePatches] = (),
        patients: Mapping[str, str] | None = None,
        patient_bags: bool = False,
    ) -> PatchEmbedder:
        """Fine-tune a copy of `embedder` (the one passed in is never modified) on the slides `train`, with the bag
        classifier frozen; select the best epoch by the strategy's own validation criterion and return the fine-tuned
        embedder with those weights. `trainer_kwargs` are `pl.Trainer` kwargs (accelerator, devices, precision,
        logger, callbacks, ...); the strategy's own `max_epochs` overrides theirs. Checkpoints go under
        `root / "checkpoints"`, and a killed fit continues from its last epoch. `labels` (slide id -> its encoded
        target: a class index, or the bag task's target) is needed by strategies that use slide labels
        (`needs_labels`). `val` are the bag phase's validation slides, which
        a strategy that uses no slide label may learn from too (`Distillation.patch_pool`). What trains is the
        embedder's `finetune` setting; adapters are merged into the returned embedder's weights. `patients` (slide id
        -> patient id) keeps a patient's slides on one side of any hold-out the strategy makes; `patient_bags` asks
        for a bag of a patient's slides where the strategy has bags (`BagGradient`)."""
        check("train", len(train) > 0, "at least one training slide", len(train))
        if not self.can_couple(bag.task):
            kind = bag.task.kind
            raise ValueError(f"coupling: {type(self).__name__} cannot couple a {kind} bag classifier: {self.why_not}")
        if self.needs_labels:
            missing = [s.slide_id for s in train if labels is None or s.slide_id not in labels]
            check("labels", not missing, "a target for every training slide", f"none for {missing[:3]}")
            bag.task.check_targets(labels, bag.aggregator.num_classes)
        run = CouplingRun(
            embedder,
            bag,
            list(train),
            dict(trainer_kwargs),
            Path(root),
            seed,
            labels,
            list(val),
            patients,
            patient_bags,
        )
        return self._fit(run).merge_finetune()

    @abstractmethod
    def _fit(self, run: CouplingRun) -> PatchEmbedder:
        """`fit` on its checked arguments."""


@dataclass(frozen=True)
class CouplingRun:
    """What a strategy's `_fit` receives: `CouplingStrategy.fit`'s arguments, checked (see there)."""

    embedder: PatchEmbedder
    bag: BagClassifier
    train: list[SlidePatches]
    trainer_kwargs: dict[str, Any]  # a copy: a strategy may pop what it handles itself
    root: Path
    seed: int
    labels: Mapping[str, Tensor] | None
    val: list[SlidePatches]
    patients: Mapping[str, str] | None
    patient_bags: bool


class StandardizedHead(Aggregator):
    """A copy of a bag classifier's aggregator with its feature standardisation folded in, so it takes raw features.

    `frozen` heads stay in eval mode (no dropout, DTFD's deterministic pseudo-bags) whatever `.train()` asks, and
    their parameters take no gradient; gradients still flow through them to the features.
    """

    def __init__(self, bag: BagClassifier, frozen: bool) -> None:
        head = bag.aggregator
        super().__init__(head.in_dim, head.num_classes)
        self.head = copy.deepcopy(head).requires_grad_(not frozen)
        self.frozen = frozen
        self.register_buffer("feature_mean", bag.feature_mean.detach().clone())
        self.register_buffer("feature_std", bag.feature_std.detach().clone())
        self.train(not frozen)

    def normalize(self, h: Tensor) -> Tensor:
        return (h - self.feature_mean) / self.feature_std

    def _forward(self, h: Tensor) -> MILOutput:
        return self.head(self.normalize(h))

    def _instance_logits(self, h: Tensor) -> Tensor:
        return self.head.instance_logits(self.normalize(h))

    def _attention_scores(self, h: Tensor) -> Tensor | None:
        return self.head.attention_scores(self.normalize(h))

    def reduced_features(self, h: Tensor) -> Tensor | None:
        """`reduced_features` of the head, standardisation included."""
        return reduced_features(self.head, self.normalize(self._check_bag(h)))

    def train(self, mode: bool = True) -> StandardizedHead:
        return super().train(mode and not self.frozen)


def reduced_features(aggregator: Aggregator, h: Tensor) -> Tensor | None:
    """The head's per-instance hidden representation before its classifier: `embed(h)` (ABMIL, CLAM-SB, MeanPool,
    MaxPool; for TransMIL its input embedding, before the transformer layers) or `reduce(h)` (DTFD-MIL). None for
    aggregators that have neither (DSMIL)."""
    for name in ("embed", "reduce"):
        module = getattr(aggregator, name, None)
        if isinstance(module, nn.Module):
            return module(h)
    return None


def check_optimizer(lr: float, weight_decay: float, max_epochs: int) -> None:
    check("lr", lr > 0, "a float > 0", lr)
    check("weight_decay", weight_decay >= 0, "a float >= 0", weight_decay)
    check("max_epochs", isinstance(max_epochs, int) and max_epochs >= 1, "an int >= 1", max_epochs)


def trainable_copy(embedder: PatchEmbedder) -> PatchEmbedder:
    """A copy in training mode whose `finetune` part takes gradients (adapters injected)."""
    return copy.deepcopy(embedder).train().start_finetune()


def coupling_checkpoint(root: Path, monitor: str, mode: str, **kwargs: Any) -> ModelCheckpoint:
    """The checkpoint callback that keeps a coupling's best epoch (weights only) by `monitor`."""
    return best_checkpoint(checkpoint_dir(root), monitor, mode, save_weights_only=True, **kwargs)


def fit_best(
    module: pl.LightningModule,
    data: pl.LightningDataModule,
    checkpoint: ModelCheckpoint,
    trainer_kwargs: Mapping[str, Any],
    root: Path,
    seed: int,
    **overrides: Any,
) -> None:
    """Fits `module` on a fresh Trainer, then loads the weights `checkpoint` judged best (if it saved any).

    The latest epoch is saved too (full training state), so a killed phase continues from it (`resume_checkpoint`).
    """
    pl.seed_everything(seed, workers=True, verbose=False)
    kwargs = {**trainer_kwargs, **overrides, "default_root_dir": str(root), "enable_checkpointing": True}
    callbacks = trainer_kwargs.get("callbacks") or []
    last = latest_checkpoint(checkpoint_dir(root))
    kwargs["callbacks"] = [*(callbacks if isinstance(callbacks, Sequence) else [callbacks]), checkpoint, last]
    pl.Trainer(**kwargs).fit(module, datamodule=data, ckpt_path=resume_checkpoint(root))
    if checkpoint.best_model_path:
        state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
