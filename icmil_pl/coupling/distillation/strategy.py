"""ICMIL's coupling as the paper writes it (Wang et al., MICCAI 2023; confidence weighting from IEEE TMI 2024): the bag
head applied per instance is a teacher of patch pseudo-labels, and a student copy of embedder + head learns them on
augmented patches. The strategy and its settings; the loss maths in `loss.py`, the module in `module.py`."""

# Annotations are evaluated here (no postponed annotations): LightningCLI reads the settings from the dataclass's
# generated __init__, whose postponed annotations it cannot resolve, and would then neither validate nor document them.

import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from data_modules.datasets.augment import StainJitter
from data_modules.datasets.patches import PatchSampleDataModule
from data_modules.io import check, check_choices

from ...aggregators import DTFDMIL
from ...encoders import PatchEmbedder
from ...tasks import Task
from ..base import CouplingRun, CouplingStrategy, StandardizedHead, check_optimizer, coupling_checkpoint, fit_best
from .loss import Reduction
from .module import DistillationModule

__all__ = ["Distillation", "FeatureInput"]

FeatureInput = Literal["student", "teacher"]  # whose features the student head reduces in the feature term
SelectBy = Literal["agreement", "mae"]  # the held-out criterion of the best epoch (see Distillation)
PatchPool = Literal["train", "train+val"]  # the slides whose patches distil: the bag phase's train, or train and val
StudentBatchNorm = Literal["as_embedder", "train"]  # the student's BatchNorm statistics: as E_i has them, or adapting


@dataclass(frozen=True)
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

    why_not = (
        "its teacher is the bag head's class (softmax) or label (sigmoid) probabilities on each patch, which only a "
        "classification or multi-label head has (a survival or regression head on one patch is no pseudo-label; "
        "use BagGradient, which couples any task)"
    )

    lr: float = 1e-5
    weight_decay: float = 1e-4
    batch_size: int = 100
    patches_per_epoch: int | None = 20000
    val_fraction: float = 0.1
    confidence_beta: float | None = None
    head_weight: float = 0.5
    feature_weight: float = 0.5
    crop_scale: tuple[float, float] = (0.5, 1.0)
    num_workers: int = 2
    max_epochs: int = 10
    reduction: Reduction = "batchmean"
    feature_input: FeatureInput = "student"
    select_by: SelectBy = "agreement"
    head_clip_norm: float | None = None
    student_batchnorm: StudentBatchNorm = "as_embedder"
    tier1_weight: float = 0.0
    patch_pool: PatchPool = "train"
    stain_jitter: StainJitter | None = None

    def __post_init__(self) -> None:
        check_choices(self)
        check_optimizer(self.lr, self.weight_decay, self.max_epochs)
        check("batch_size", self.batch_size >= 1, "an int >= 1", self.batch_size)
        per_epoch = self.patches_per_epoch
        check("patches_per_epoch", per_epoch is None or per_epoch >= 1, "an int >= 1 or null", per_epoch)
        check("val_fraction", 0 < self.val_fraction < 1, "a float in (0, 1)", self.val_fraction)
        beta = self.confidence_beta
        check("confidence_beta", beta is None or beta >= 0, "a float >= 0 or null", beta)
        check("head_weight", self.head_weight >= 0, "a float >= 0", self.head_weight)
        check("feature_weight", self.feature_weight >= 0, "a float >= 0", self.feature_weight)
        check(
            "crop_scale",
            len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            "(low, high) with 0 < low <= high <= 1",
            self.crop_scale,
        )
        check("num_workers", self.num_workers >= 0, "an int >= 0", self.num_workers)
        check(
            "head_clip_norm",
            self.head_clip_norm is None or self.head_clip_norm > 0,
            "a float > 0 or null",
            self.head_clip_norm,
        )
        check("tier1_weight", 0 <= self.tier1_weight <= 1, "a float in [0, 1]", self.tier1_weight)
        object.__setattr__(self, "crop_scale", tuple(self.crop_scale))

    def can_couple(self, task: Task) -> bool:
        """A head whose outputs are class or label probabilities: only they make pseudo-labels."""
        return task.probabilities is not None

    def _fit(self, run: CouplingRun) -> PatchEmbedder:
        """The teacher scores patches: slide labels, bags and so patients play no part."""
        train, val, root, seed = run.train, run.val, run.root, run.seed
        module = DistillationModule(run.embedder, run.bag, self, seed)
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
            run.trainer_kwargs,
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
