"""The LightningModule of one distillation phase: a frozen teacher (E_i + the bag head per instance) and a student
(trainable copies of both) learning the teacher's pseudo-labels on augmented patches."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import pytorch_lightning as pl
import torch
from torch import Tensor
from torchmetrics import MeanAbsoluteError
from torchmetrics.classification import MulticlassAccuracy, MultilabelAccuracy

from data_modules.datasets.augment import random_flip_resized_crop

from ...bag_classifier import BagClassifier
from ...encoders import PatchEmbedder, thaw_batchnorm
from ..base import StandardizedHead, trainable_copy
from .loss import Outputs, confidence_weights, distillation_loss

if TYPE_CHECKING:
    from .strategy import Distillation

__all__ = ["DistillationModule"]


class DistillationModule(pl.LightningModule):
    """Teacher (frozen E_i + bag head) and student (trainable copies of both); see `Distillation`."""

    def __init__(self, embedder: PatchEmbedder, bag: BagClassifier, cfg: Distillation, seed: int) -> None:
        super().__init__()
        self.teacher = copy.deepcopy(embedder).requires_grad_(False).eval()
        self.teacher_head = StandardizedHead(bag, frozen=True)
        self.student = trainable_copy(embedder)
        if cfg.student_batchnorm == "train":
            thaw_batchnorm(self.student)
        self.student_head = StandardizedHead(bag, frozen=False)
        self.cfg = cfg  # the strategy: its settings (lr, loss weights, crops) as plain attributes
        self.seed = seed
        n = bag.aggregator.num_classes
        self.outputs: Outputs = bag.task.probabilities  # softmax or sigmoid: Distillation.can_couple checked it
        self.probabilities = bag.task.outputs  # class (softmax) or label (sigmoid) probabilities; not a submodule
        self.agreement = (
            MultilabelAccuracy(num_labels=n, average="micro")
            if self.outputs == "sigmoid"
            else MulticlassAccuracy(num_classes=n, average="micro")
        )
        self.mae = MeanAbsoluteError()
        self._freeze_what_the_loss_cannot_reach()

    def _freeze_what_the_loss_cannot_reach(self) -> None:
        """Head parameters off the per-instance path (attention, for one) would get no gradient: freeze them, so that
        DDP, which expects a gradient for every trainable parameter, runs, and the optimiser skips them."""
        probe = torch.zeros(2, self.student_head.in_dim)
        outputs = [self.student_head.instance_logits(probe)]
        if self.cfg.feature_weight and (hidden := self.student_head.reduced_features(probe)) is not None:
            outputs.append(hidden)
        params = [p for p in self.student_head.parameters() if p.requires_grad]
        grads = torch.autograd.grad(sum(out.sum() for out in outputs), params, allow_unused=True)
        for param, grad in zip(params, grads, strict=True):
            if grad is None:
                param.requires_grad_(False)

    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        self.teacher.eval()
        return self

    def teacher_logits(self, features: Tensor) -> Tensor:
        """The frozen head per instance; for DTFD-MIL with `tier1_weight` w, (1 - w) x tier 2 + w x tier 1."""
        logits = self.teacher_head.instance_logits(features)
        w = self.cfg.tier1_weight
        if w:
            tier1 = self.teacher_head.head.tier1_instance_logits(self.teacher_head.normalize(features))
            logits = (1 - w) * logits + w * tier1
        return logits

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images = batch["image"]
        with torch.no_grad():
            t_features = self.teacher(images)
            t_logits = self.teacher_logits(t_features)
            t_hidden = self.teacher_head.reduced_features(t_features) if self.cfg.feature_weight else None
            weights = None
            if self.cfg.confidence_beta is not None:
                scores = self.teacher_head.attention_scores(t_features)
                weights = confidence_weights(scores, self.cfg.confidence_beta)
        if self.cfg.stain_jitter is not None:  # the student's view only: the teacher sees the patch as it is
            images = self.cfg.stain_jitter(images, int(torch.randint(2**62, ())))
        s_features = self.student(random_flip_resized_crop(images, self.cfg.crop_scale))
        reduced = s_features if self.cfg.feature_input == "student" else t_features
        loss = distillation_loss(
            t_logits,
            self.student_head.instance_logits(s_features),
            self.student_head.instance_logits(t_features),
            t_hidden,
            self.student_head.reduced_features(reduced) if t_hidden is not None else None,
            head_weight=self.cfg.head_weight,
            feature_weight=self.cfg.feature_weight,
            weights=weights,
            reduction=self.cfg.reduction,
            outputs=self.outputs,
        )
        n = images.shape[0]
        self.log("train/loss", loss.total, on_step=False, on_epoch=True, batch_size=n, prog_bar=True)
        for name in ("instance", "head", "feature"):
            self.log(f"train/kl_{name}", getattr(loss, name), on_step=False, on_epoch=True, batch_size=n)
        return loss.total

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Agreement of the student on a fixed augmented view of each held-out patch with the teacher on the clean
        patch: the same views every epoch (seeded by batch), so epochs are compared on the same task."""
        images = batch["image"]
        view = random_flip_resized_crop(
            images, self.cfg.crop_scale, generator=torch.Generator().manual_seed(self.seed * 100_003 + batch_idx)
        )
        teacher = self.teacher_logits(self.teacher(images)).float()
        student = self.student_head.instance_logits(self.student(view)).float()
        if self.outputs == "sigmoid":
            self.agreement.update(student.sigmoid(), (teacher > 0).int())
        else:
            self.agreement.update(student.argmax(-1), teacher.argmax(-1))
        self.mae.update(self.probabilities(student), self.probabilities(teacher))
        n = images.shape[0]
        self.log("val/agreement", self.agreement, on_epoch=True, batch_size=n, prog_bar=True)
        self.log("val/mae", self.mae, on_epoch=True, batch_size=n)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The authors clip the student head's gradients (norm 5), not the embedder's."""
        if self.cfg.head_clip_norm is not None:
            params = [p for p in self.student_head.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.head_clip_norm)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in (*self.student.parameters(), *self.student_head.parameters()) if p.requires_grad]
        return torch.optim.Adam(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
