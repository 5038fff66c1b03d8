"""ICMIL's coupling as the paper writes it (Wang et al., MICCAI 2023; confidence weighting from IEEE TMI 2024): the bag
head applied per instance is a teacher of patch pseudo-labels, and a student copy of embedder + head learns them on
augmented patches."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanAbsoluteError
from torchmetrics.classification import MulticlassAccuracy, MultilabelAccuracy

from data_modules.augment import StainJitter, random_flip_resized_crop
from data_modules.checks import check
from data_modules.patches import PatchSampleDataModule
from data_modules.tiling import SlidePatches

from ..aggregators import DTFDMIL
from ..bag_classifier import BagClassifier
from ..encoders import PatchEmbedder, thaw_batchnorm
from .base import CouplingStrategy, StandardizedHead, check_optimizer, coupling_checkpoint, fit_best, trainable_copy

__all__ = [
    "Distillation",
    "DistillationLoss",
    "DistillationModule",
    "FeatureInput",
    "Outputs",
    "Reduction",
    "confidence_weights",
    "distillation_loss",
]

Reduction = Literal["batchmean", "mean"]  # per patch (ours), or per element as the authors' code (see the loss)
FeatureInput = Literal["student", "teacher"]  # whose features the student head reduces in the feature term
SelectBy = Literal["agreement", "mae"]  # the held-out criterion of the best epoch (see Distillation)
PatchPool = Literal["train", "train+val"]  # the slides whose patches distil: the bag phase's train, or train and val
StudentBatchNorm = Literal["as_embedder", "train"]  # the student's BatchNorm statistics: as E_i has them, or adapting
Outputs = Literal["softmax", "sigmoid"]  # what a head's logits mean: one class of C, or C labels each on its own


class DistillationLoss(NamedTuple):
    total: Tensor
    instance: Tensor  # KL(teacher || student on augmented patches), confidence-weighted
    head: Tensor  # KL(teacher || student head on the teacher's features)
    feature: Tensor  # KL between the softmax of teacher and student reduced features


def _kl_rows(target_logits: Tensor, logits: Tensor, outputs: Outputs = "softmax") -> Tensor:
    """KL(softmax(target) || softmax(logits)) per row, in float32; with "sigmoid", the sum over labels of the
    Bernoulli KL(sigmoid(target) || sigmoid(logits)), which is the softmax KL of each label's logits (0, x)."""
    target_logits, logits = target_logits.float(), logits.float()
    if outputs == "sigmoid":
        log_p, log_not_p = F.logsigmoid(target_logits), F.logsigmoid(-target_logits)
        log_q, log_not_q = F.logsigmoid(logits), F.logsigmoid(-logits)
        return (log_p.exp() * (log_p - log_q) + log_not_p.exp() * (log_not_p - log_not_q)).sum(-1)
    log_p = F.log_softmax(target_logits, dim=-1)
    log_q = F.log_softmax(logits, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def distillation_loss(
    teacher_logits: Tensor,
    student_logits: Tensor,
    student_head_on_teacher_logits: Tensor,
    teacher_hidden: Tensor | None = None,
    student_hidden: Tensor | None = None,
    *,
    head_weight: float = 0.5,
    feature_weight: float = 0.5,
    weights: Tensor | None = None,
    reduction: Reduction = "batchmean",
    outputs: Outputs = "softmax",
) -> DistillationLoss:
    """ICMIL's teacher-student loss on a batch of B patches.

    With KL(p || q) = sum_c p_c (log p_c - log q_c) and the teacher's distribution p_i always the target:

        L = 1/B sum_i w_i KL(softmax(t_i) || softmax(s_i))
          + head_weight    * 1/B sum_i KL(softmax(t_i) || softmax(u_i))
          + feature_weight * 1/B sum_i KL(softmax(zt_i) || softmax(zs_i))

    t = teacher instance logits (clean patches), s = student head on student features (augmented patches), u =
    student head on the teacher's features, zt / zs = teacher / student reduced features (softmax over feature
    dimensions; which features the student reduces is the caller's `FeatureInput`). `weights` w (default 1) only
    scale the first term's rows. Without reduced features the third term is 0.

    `outputs="sigmoid"` (a multi-label head) puts the Bernoulli KL of each label, summed over labels, in the two
    logit terms: each label's instance logit is a binary teacher of its own (the feature term is unchanged).

    `reduction="batchmean"` (ours) is `F.kl_div(..., reduction="batchmean")`, the KL per patch, as written above.
    `"mean"` is the authors' code, `KLDivLoss(reduction="none")(...).mean()`: the mean over every element, which
    divides the two logit terms by the number of classes C and the feature term by the feature width D, so the
    feature term weighs C/D of what it weighs under batchmean.
    """
    b = teacher_logits.shape[0]

    def per(logits: Tensor) -> int:
        return b if reduction == "batchmean" else b * logits.shape[-1]

    instance_kl = _kl_rows(teacher_logits, student_logits, outputs)
    if weights is not None:
        instance_kl = instance_kl * weights.to(instance_kl.dtype)
    instance = instance_kl.sum() / per(teacher_logits)
    head = _kl_rows(teacher_logits, student_head_on_teacher_logits, outputs).sum() / per(teacher_logits)
    if teacher_hidden is None or student_hidden is None:
        feature = instance.new_zeros(())
    else:
        feature = _kl_rows(teacher_hidden, student_hidden).sum() / per(teacher_hidden)
    return DistillationLoss(instance + head_weight * head + feature_weight * feature, instance, head, feature)


def confidence_weights(scores: Tensor, beta: float | None) -> Tensor:
    """|2a - 1|^beta per patch, TMI ICMIL's confidence weighting, from the teacher's attention `scores` of a batch's
    patches (`Aggregator.attention_scores`).

    (N,) raw scores (ABMIL, CLAM-SB; beta 6 in the paper): a = the scores min-max normalised over the batch, as the
    authors' ABMIL code (`isNorm=False`). (N, T) tiered scores (DTFD-MIL, the authors' "dual" code, beta 2): a = the
    product over tiers of each tier's softmax over the batch, min-max normalised; their DTFD script calls the
    attention with its default softmax, and min-max of a softmax is min-max of exp(score), not of the score.
    Patches the teacher scores lowest or highest count fully; middling ones, whose pseudo-labels are least
    trustworthy, fade out. beta None, or a tier equal on every patch, weigh every patch 1.
    """
    scores = scores.detach().float()
    n = scores.shape[0]
    if beta is None:
        return scores.new_ones(n)
    tiers = scores.unsqueeze(1) if scores.ndim == 1 else scores.softmax(dim=0)
    span = tiers.amax(0) - tiers.amin(0)
    if (span <= 0).any():
        return scores.new_ones(n)
    a = ((tiers - tiers.amin(0)) / span).prod(dim=1)
    return (2 * a - 1).abs().pow(beta)


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
        self.outputs: Outputs = "sigmoid" if bag.task.kind == "multilabel" else "softmax"
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


class Distillation(CouplingStrategy):
    """ICMIL's teacher-student coupling (Wang et al., MICCAI 2023; confidence weighting from IEEE TMI 2024).

    Teacher: frozen E_i + the frozen bag head applied per instance (`BagClassifier.instance_logits`, standardisation
    included), on clean patches; a multi-label head teaches each label on its own (sigmoid probabilities, the
    Bernoulli KL per label: `distillation_loss(outputs="sigmoid")`), as a two-class softmax head teaches its one
    binary choice. Student: trainable copies of E_i and of the head, on augmented patches (random
    flips, random resized crop with `crop_scale`). Loss: `distillation_loss`, with `reduction` ("mean": the authors'
    per-element mean; "batchmean": ours, per patch) and `feature_input`: the student head's reduction of the
    teacher's features in the feature term ("teacher", the authors' code: only the instance term then reaches the
    embedder), or of the student's augmented features ("student", ours: the feature term trains the embedder too).
    With `confidence_beta` (6 for ABMIL, 2 for DTFD-MIL in the TMI code) the first term is weighted by
    `confidence_weights` of the teacher's attention scores of the batch's patches (ABMIL, CLAM-SB: raw scores;
    DTFD-MIL: the "dual" product of both tiers' attentions); heads without attention scores (TransMIL, DSMIL) refuse
    it. `tier1_weight` (DTFD-MIL only; 0.3 in the TMI code, 0 in the MICCAI code) mixes the tier-1 classifier into the
    teacher's logits, in training and validation alike (the authors' DTFD script validates against tier 2 alone).

    `patch_pool` names the slides whose patches distil: "train" (ours: the bag phase's training split) or
    "train+val" (the authors' code: their whole training folder, the bag phase's validation slides included; the
    pseudo-labels use no slide label, and test slides are never used). `val_fraction` of the pool's patches (fixed,
    seeded) is held out; when
    `patches_per_epoch` bounds an epoch, a fixed part of the held-out patches as large as `val_fraction` of an epoch's
    work validates. Criterion: `val/agreement`, the fraction of those patches whose student prediction (on a fixed
    augmented view) equals the teacher's on the clean patch (multi-label: of those (patch, label) pairs whose call,
    p > 0.5, the two share), or with `select_by="mae"` (the authors' criterion) the lowest mean absolute error
    between the student's class (label) probabilities on that view and the teacher's on the clean patch; the best
    epoch wins. `head_clip_norm` clips the student head's gradients only (5 in the authors' code;
    None, ours, leaves them to the trainer's `gradient_clip_val`). The student's BatchNorm stays as the
    embedder has it (frozen by default for `PatchEmbedder`) or, with `student_batchnorm="train"` (the authors' code),
    normalises with batch statistics and updates its running statistics, which the coupled embedder keeps; the
    teacher is always in eval mode.
    """

    tasks = ("classification", "multilabel")
    why_not = (
        "its teacher is the bag head's class (softmax) or label (sigmoid) probabilities on each patch, which only a "
        "classification or multi-label head has (a survival or regression head on one patch is no pseudo-label; "
        "use BagGradient, which couples any task)"
    )

    def __init__(
        self,
        lr: float = 1e-5,
        weight_decay: float = 1e-4,
        batch_size: int = 100,
        patches_per_epoch: int | None = 20000,
        val_fraction: float = 0.1,
        confidence_beta: float | None = None,
        head_weight: float = 0.5,
        feature_weight: float = 0.5,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        num_workers: int = 2,
        max_epochs: int = 10,
        reduction: Reduction = "batchmean",
        feature_input: FeatureInput = "student",
        select_by: SelectBy = "agreement",
        head_clip_norm: float | None = None,
        student_batchnorm: StudentBatchNorm = "as_embedder",
        tier1_weight: float = 0.0,
        patch_pool: PatchPool = "train",
        stain_jitter: StainJitter | None = None,
    ) -> None:
        check_optimizer(lr, weight_decay, max_epochs)
        check("batch_size", batch_size >= 1, "an int >= 1", batch_size)
        per_epoch = patches_per_epoch
        check("patches_per_epoch", per_epoch is None or per_epoch >= 1, "an int >= 1 or null", per_epoch)
        check("val_fraction", 0 < val_fraction < 1, "a float in (0, 1)", val_fraction)
        beta = confidence_beta
        check("confidence_beta", beta is None or beta >= 0, "a float >= 0 or null", beta)
        check("head_weight", head_weight >= 0, "a float >= 0", head_weight)
        check("feature_weight", feature_weight >= 0, "a float >= 0", feature_weight)
        check(
            "crop_scale",
            len(crop_scale) == 2 and 0 < crop_scale[0] <= crop_scale[1] <= 1,
            "(low, high) with 0 < low <= high <= 1",
            crop_scale,
        )
        check("num_workers", num_workers >= 0, "an int >= 0", num_workers)
        check("reduction", reduction in ("batchmean", "mean"), "'batchmean' or 'mean'", reduction)
        check("feature_input", feature_input in ("student", "teacher"), "'student' or 'teacher'", feature_input)
        check("select_by", select_by in ("agreement", "mae"), "'agreement' or 'mae'", select_by)
        bn = student_batchnorm
        check("student_batchnorm", bn in ("as_embedder", "train"), "'as_embedder' or 'train'", bn)
        check("head_clip_norm", head_clip_norm is None or head_clip_norm > 0, "a float > 0 or null", head_clip_norm)
        check("tier1_weight", 0 <= tier1_weight <= 1, "a float in [0, 1]", tier1_weight)
        check("patch_pool", patch_pool in ("train", "train+val"), "'train' or 'train+val'", patch_pool)
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.patches_per_epoch = patches_per_epoch
        self.val_fraction = val_fraction
        self.confidence_beta = confidence_beta
        self.head_weight = head_weight
        self.feature_weight = feature_weight
        self.crop_scale = tuple(crop_scale)
        self.num_workers = num_workers
        self.max_epochs = max_epochs
        self.reduction = reduction
        self.feature_input = feature_input
        self.select_by = select_by
        self.head_clip_norm = head_clip_norm
        self.student_batchnorm = student_batchnorm
        self.tier1_weight = tier1_weight
        self.patch_pool = patch_pool
        self.stain_jitter = stain_jitter

    def _fit(
        self,
        embedder: PatchEmbedder,
        bag: BagClassifier,
        train: list[SlidePatches],
        trainer_kwargs: dict[str, Any],
        root: Path,
        seed: int,
        labels: Mapping[str, Tensor] | None,
        val: list[SlidePatches],
        patients: Mapping[str, str] | None,  # the teacher scores patches: bags, and so patients, play no part
        patient_bags: bool,
    ) -> PatchEmbedder:
        module = DistillationModule(embedder, bag, self, seed)
        self._check_head(module.teacher_head)
        data = PatchSampleDataModule(
            train + val if self.patch_pool == "train+val" else train,
            patches_per_epoch=self.patches_per_epoch,
            val_fraction=self.val_fraction,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            seed=seed,
        )
        checkpoint = coupling_checkpoint(
            root, f"val/{self.select_by}", "max" if self.select_by == "agreement" else "min"
        )
        fit_best(
            module,
            data,
            checkpoint,
            trainer_kwargs,
            root,
            seed,
            max_epochs=self.max_epochs,
            reload_dataloaders_every_n_epochs=1,
        )
        return module.student

    def _check_head(self, head: StandardizedHead) -> None:
        probe = torch.zeros(2, head.in_dim, device=head.feature_mean.device)
        with torch.no_grad():
            if self.feature_weight and head.reduced_features(probe) is None:
                warnings.warn(
                    f"Distillation: {type(head.head).__name__} has no per-instance reduced features (embed/reduce); "
                    "the feature term (feature_weight) is 0",
                    stacklevel=3,
                )
            if self.confidence_beta is not None and head.attention_scores(probe) is None:
                raise ValueError(
                    f"confidence_beta: needs an aggregator with attention scores (ABMIL, CLAMSB, DTFDMIL); "
                    f"{type(head.head).__name__} gives none"
                )
        if self.tier1_weight and not isinstance(head.head, DTFDMIL):
            raise ValueError(
                f"tier1_weight: mixes DTFD-MIL's tier-1 classifier into the teacher; {type(head.head).__name__} has "
                "no tiers (use 0)"
            )
