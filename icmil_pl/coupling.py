"""ICMIL's coupling phase: fine-tune the patch embedder E_i into E_{i+1} from the frozen bag classifier.

Two swappable strategies, each run by `loop.py` as `strategy.fit(embedder, bag, train_slides, ...)` on a fresh
Trainer of its own:
- `Distillation` (the paper): the bag head applied per instance is a teacher of patch pseudo-labels; a student copy
  of embedder + head learns them on augmented patches.
- `BagGradient`: the exact slide-level gradient through the bag head, over whole slides (`chunked.bag_backward`).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from torchmetrics.classification import MulticlassAccuracy

from data_modules.bag_data import EpochShuffle
from data_modules.bags import SlideBagDataset
from data_modules.patches import PatchDataset
from data_modules.tiling import SlidePatches

from .aggregators import Aggregator, MILOutput
from .bag_classifier import BagClassifier
from .embedder import PatchEmbedder
from .end_to_end import EndToEndMIL

__all__ = [
    "BagGradient",
    "CouplingStrategy",
    "Distillation",
    "DistillationLoss",
    "StandardizedHead",
    "confidence_weights",
    "distillation_loss",
    "random_flip_resized_crop",
    "reduced_features",
]


class CouplingStrategy(ABC):
    """How ICMIL turns E_i into E_{i+1}. Strategies are configuration only: `fit` builds everything it trains."""

    @abstractmethod
    def fit(
        self,
        embedder: PatchEmbedder,
        bag: BagClassifier,
        train: Sequence[SlidePatches],
        *,
        trainer_kwargs: Mapping[str, Any],
        root: str | os.PathLike,
        seed: int,
        labels: Mapping[str, int] | None = None,
    ) -> PatchEmbedder:
        """Fine-tune a copy of `embedder` (the one passed in is never modified) on the training-split slides `train`,
        with the bag classifier frozen; select the best epoch by the strategy's own validation criterion and return
        the fine-tuned embedder with those weights. `trainer_kwargs` are `pl.Trainer` kwargs (accelerator, devices,
        precision, logger, callbacks, ...); the strategy's own `max_epochs` overrides theirs. Checkpoints go under
        `root / "checkpoints"`. `labels` (slide id -> class index) is needed by strategies that use slide labels."""


# ------------------------------------------------------------------------------------------------------ shared parts


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

    def hidden(self, h: Tensor) -> Tensor | None:
        """Each instance's reduced feature (see `reduced_features`), standardisation included."""
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


def _check(field: str, ok: bool, expected: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{field}: expected {expected}, got {value!r}")


def _check_optimizer(lr: float, weight_decay: float, max_epochs: int) -> None:
    _check("lr", lr > 0, "a float > 0", lr)
    _check("weight_decay", weight_decay >= 0, "a float >= 0", weight_decay)
    _check("max_epochs", isinstance(max_epochs, int) and max_epochs >= 1, "an int >= 1", max_epochs)


def _fit_best(
    module: pl.LightningModule,
    data: pl.LightningDataModule,
    checkpoint: ModelCheckpoint,
    trainer_kwargs: Mapping[str, Any],
    root: str | os.PathLike,
    seed: int,
    **overrides: Any,
) -> None:
    """Fits `module` on a fresh Trainer, then loads the weights `checkpoint` judged best (if it saved any).

    `root/checkpoints/last.ckpt` (full training state, every epoch) lets a killed phase continue from its last epoch.
    """
    pl.seed_everything(seed, workers=True, verbose=False)
    kwargs = {**trainer_kwargs, **overrides, "default_root_dir": str(root), "enable_checkpointing": True}
    callbacks = trainer_kwargs.get("callbacks") or []
    last = ModelCheckpoint(Path(root) / "checkpoints", "last", enable_version_counter=False)  # the latest epoch
    kwargs["callbacks"] = [*(callbacks if isinstance(callbacks, Sequence) else [callbacks]), checkpoint, last]
    resume = Path(root) / "checkpoints" / "last.ckpt"
    pl.Trainer(**kwargs).fit(module, datamodule=data, ckpt_path=str(resume) if resume.is_file() else None)
    if checkpoint.best_model_path:
        state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)


def _trainable_copy(embedder: PatchEmbedder) -> PatchEmbedder:
    return copy.deepcopy(embedder).requires_grad_(True).train()


# ------------------------------------------------------------------------------------------------------ distillation


class DistillationLoss(NamedTuple):
    total: Tensor
    instance: Tensor  # KL(teacher || student on augmented patches), confidence-weighted
    head: Tensor  # KL(teacher || student head on the teacher's features)
    feature: Tensor  # KL between the softmax of reduced features


def _kl_rows(target_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(softmax(target) || softmax(logits)) per row, in float32."""
    log_p = F.log_softmax(target_logits.float(), dim=-1)
    log_q = F.log_softmax(logits.float(), dim=-1)
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
) -> DistillationLoss:
    """ICMIL's teacher-student loss on a batch of B patches.

    With KL(p || q) = sum_c p_c (log p_c - log q_c) and the teacher's distribution p_i always the target:

        L = 1/B sum_i w_i KL(softmax(t_i) || softmax(s_i))
          + head_weight    * 1/B sum_i KL(softmax(t_i) || softmax(u_i))
          + feature_weight * 1/B sum_i KL(softmax(zt_i) || softmax(zs_i))

    t = teacher instance logits (clean patches), s = student head on student features (augmented patches), u =
    student head on the teacher's features, zt / zs = teacher / student reduced features (softmax over feature
    dimensions). Each term is `F.kl_div(log_softmax(student), log_softmax(teacher), log_target=True,
    reduction="batchmean")`; `weights` w (default 1) only scale the first term's rows. Without reduced features the
    third term is 0.
    """
    b = teacher_logits.shape[0]
    instance_kl = _kl_rows(teacher_logits, student_logits)
    if weights is not None:
        instance_kl = instance_kl * weights.to(instance_kl.dtype)
    instance = instance_kl.sum() / b
    head = _kl_rows(teacher_logits, student_head_on_teacher_logits).sum() / b
    if teacher_hidden is None or student_hidden is None:
        feature = instance.new_zeros(())
    else:
        feature = _kl_rows(teacher_hidden, student_hidden).sum() / b
    return DistillationLoss(instance + head_weight * head + feature_weight * feature, instance, head, feature)


def confidence_weights(attention: Tensor, beta: float | None) -> Tensor:
    """|2a - 1|^beta with a = `attention` min-max normalised over the batch (TMI ICMIL's confidence weighting).

    Patches the teacher attends to least or most count fully; middling ones, whose pseudo-labels are least
    trustworthy, fade out. beta None, or attention that is equal on every patch, weighs every patch 1.
    """
    attention = attention.detach().float()
    if beta is None:
        return torch.ones_like(attention)
    span = attention.max() - attention.min()
    if span <= 0:
        return torch.ones_like(attention)
    a = (attention - attention.min()) / span
    return (2 * a - 1).abs().pow(beta)


def random_flip_resized_crop(
    images: Tensor,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per patch: a random crop covering `scale` of its area at an aspect ratio in `ratio`, resized back to the patch
    size, and random horizontal and vertical flips. One `grid_sample` on the patches' device for the whole batch.

    uint8 (B, C, H, W) in, float in [0, 1] out (what `PatchEmbedder` takes). The aspect range is narrowed per patch
    so that the crop always fits (area exactly as drawn; scale 1 gives the whole patch, flipped or not). Crops are at
    least as small as the patch, so bilinear resizing only upsamples. Parameters are drawn on the CPU (from
    `generator`, else the global generator), so a seed gives the same augmentations on any device.
    """
    n, c, h, w = images.shape
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    u = torch.rand(n, 6, generator=generator, dtype=torch.float64)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    low = torch.clamp(area, min=ratio[0]).log()
    high = torch.clamp(1 / area, max=ratio[1]).log()
    r = (low + (high - low) * u[:, 1]).exp()
    fw, fh = (area * r).sqrt().clamp(max=1.0), (area / r).sqrt().clamp(max=1.0)
    cx, cy = (2 * u[:, 2] - 1) * (1 - fw), (2 * u[:, 3] - 1) * (1 - fh)
    sx = torch.where(u[:, 4] < 0.5, -fw, fw)
    sy = torch.where(u[:, 5] < 0.5, -fh, fh)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, sy, cy], 1)], 1)
    grid = F.affine_grid(theta.to(x), [n, c, h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class _DistillationModule(pl.LightningModule):
    """Teacher (frozen E_i + bag head) and student (trainable copies of both); see `Distillation`."""

    def __init__(
        self, embedder: PatchEmbedder, bag: BagClassifier, *, lr: float, weight_decay: float, head_weight: float,
        feature_weight: float, confidence_beta: float | None, crop_scale: tuple[float, float], seed: int,
    ) -> None:  # fmt: skip
        super().__init__()
        self.teacher = copy.deepcopy(embedder).requires_grad_(False).eval()
        self.teacher_head = StandardizedHead(bag, frozen=True)
        self.student = _trainable_copy(embedder)
        self.student_head = StandardizedHead(bag, frozen=False)
        self.lr, self.weight_decay = lr, weight_decay
        self.head_weight, self.feature_weight = head_weight, feature_weight
        self.confidence_beta, self.crop_scale, self.seed = confidence_beta, tuple(crop_scale), seed
        self.agreement = MulticlassAccuracy(num_classes=bag.aggregator.num_classes, average="micro")
        self._freeze_what_the_loss_cannot_reach()

    def _freeze_what_the_loss_cannot_reach(self) -> None:
        """Head parameters off the per-instance path (attention, for one) would get no gradient: freeze them, so that
        DDP, which expects a gradient for every trainable parameter, runs, and the optimiser skips them."""
        probe = torch.zeros(2, self.student_head.in_dim)
        outputs = [self.student_head.instance_logits(probe)]
        if self.feature_weight and (hidden := self.student_head.hidden(probe)) is not None:
            outputs.append(hidden)
        params = [p for p in self.student_head.parameters() if p.requires_grad]
        grads = torch.autograd.grad(sum(out.sum() for out in outputs), params, allow_unused=True)
        for param, grad in zip(params, grads):
            if grad is None:
                param.requires_grad_(False)

    def train(self, mode: bool = True) -> _DistillationModule:
        super().train(mode)
        self.teacher.eval()
        return self

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images = batch["image"]
        with torch.no_grad():
            t_features = self.teacher(images)
            t_logits = self.teacher_head.instance_logits(t_features)
            t_hidden = self.teacher_head.hidden(t_features) if self.feature_weight else None
            weights = None
            if self.confidence_beta is not None:
                weights = confidence_weights(self.teacher_head(t_features).attention, self.confidence_beta)
        s_features = self.student(random_flip_resized_crop(images, self.crop_scale))
        loss = distillation_loss(
            t_logits,
            self.student_head.instance_logits(s_features),
            self.student_head.instance_logits(t_features),
            t_hidden,
            self.student_head.hidden(s_features) if t_hidden is not None else None,
            head_weight=self.head_weight,
            feature_weight=self.feature_weight,
            weights=weights,
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
            images, self.crop_scale, generator=torch.Generator().manual_seed(self.seed * 100_003 + batch_idx)
        )
        teacher = self.teacher_head.instance_logits(self.teacher(images)).argmax(-1)
        student = self.student_head.instance_logits(self.student(view)).argmax(-1)
        self.agreement.update(student, teacher)
        self.log("val/agreement", self.agreement, on_epoch=True, batch_size=images.shape[0], prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [*self.student.parameters(), *self.student_head.parameters()]
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)


class _PatchSamples(pl.LightningDataModule):
    """Patches of the training slides: a fixed seeded held-out part validates; each epoch trains on a fresh seeded
    draw of `patches_per_epoch` of the rest (the Trainer reloads the train loader every epoch)."""

    def __init__(
        self, slides: Sequence[SlidePatches], *, patches_per_epoch: int | None, val_fraction: float, batch_size: int,
        num_workers: int, seed: int,
    ) -> None:  # fmt: skip
        super().__init__()
        self.dataset = PatchDataset(slides)
        n = len(self.dataset)
        n_val = max(1, round(val_fraction * n))
        _check("train", n - n_val >= 1, f"slides with at least 2 patches in all (val_fraction={val_fraction})", n)
        order = np.random.default_rng(seed).permutation(n)
        self.pool = order[n_val:]
        if patches_per_epoch is not None:  # validation costs what it would with full epochs: val_fraction of the work
            n_val = min(n_val, math.ceil(patches_per_epoch * val_fraction / (1 - val_fraction)))
        self.val_indices = np.sort(order[:n_val])
        self.patches_per_epoch, self.batch_size, self.num_workers, self.seed = (
            patches_per_epoch, batch_size, num_workers, seed,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        rng = np.random.default_rng([self.seed, epoch])
        k = len(self.pool) if self.patches_per_epoch is None else min(self.patches_per_epoch, len(self.pool))
        return self._loader(rng.choice(self.pool, size=k, replace=False))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_indices)

    def _loader(self, indices: np.ndarray) -> DataLoader:
        return DataLoader(
            Subset(self.dataset, indices.tolist()),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )


class Distillation(CouplingStrategy):
    """ICMIL's teacher-student coupling (Wang et al., MICCAI 2023; confidence weighting from IEEE TMI 2024).

    Teacher: frozen E_i + the frozen bag head applied per instance (`BagClassifier.instance_logits`, standardisation
    included), on clean patches. Student: trainable copies of E_i and of the head, on augmented patches (random
    flips, random resized crop with `crop_scale`). Loss: `distillation_loss`. With `confidence_beta` (6 for ABMIL,
    2 for DTFD-MIL in the paper) the first term is weighted by `confidence_weights` of the teacher's attention, taken
    by running the bag head on the batch as if it were a bag (the paper weighs by slide attention; a batch of random
    patches from many slides is what is at hand per step, and min-max normalisation makes the scale irrelevant).

    Only training-split slides are used. `val_fraction` of their patches (fixed, seeded) is held out; when
    `patches_per_epoch` bounds an epoch, a fixed part of the held-out patches as large as `val_fraction` of an epoch's
    work validates. Criterion: `val/agreement`, the fraction of those patches whose student prediction (on a fixed
    augmented view) equals the teacher's on the clean patch; the best epoch wins. BatchNorm of both stays as the
    embedder has it (frozen by default for `PatchEmbedder`); the teacher is always in eval mode.
    """

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
    ) -> None:
        _check_optimizer(lr, weight_decay, max_epochs)
        _check("batch_size", batch_size >= 1, "an int >= 1", batch_size)
        _check("patches_per_epoch", patches_per_epoch is None or patches_per_epoch >= 1, "an int >= 1 or null",
               patches_per_epoch)  # fmt: skip
        _check("val_fraction", 0 < val_fraction < 1, "a float in (0, 1)", val_fraction)
        _check("confidence_beta", confidence_beta is None or confidence_beta >= 0, "a float >= 0 or null",
               confidence_beta)  # fmt: skip
        _check("head_weight", head_weight >= 0, "a float >= 0", head_weight)
        _check("feature_weight", feature_weight >= 0, "a float >= 0", feature_weight)
        _check("crop_scale", len(crop_scale) == 2 and 0 < crop_scale[0] <= crop_scale[1] <= 1,
               "(low, high) with 0 < low <= high <= 1", crop_scale)  # fmt: skip
        _check("num_workers", num_workers >= 0, "an int >= 0", num_workers)
        self.lr, self.weight_decay, self.batch_size = lr, weight_decay, batch_size
        self.patches_per_epoch, self.val_fraction = patches_per_epoch, val_fraction
        self.confidence_beta, self.head_weight, self.feature_weight = confidence_beta, head_weight, feature_weight
        self.crop_scale, self.num_workers, self.max_epochs = tuple(crop_scale), num_workers, max_epochs

    def fit(
        self,
        embedder: PatchEmbedder,
        bag: BagClassifier,
        train: Sequence[SlidePatches],
        *,
        trainer_kwargs: Mapping[str, Any],
        root: str | os.PathLike,
        seed: int,
        labels: Mapping[str, int] | None = None,
    ) -> PatchEmbedder:
        """See `CouplingStrategy.fit`; `labels` are not used."""
        _check("train", len(train) > 0, "at least one training slide", len(train))
        module = _DistillationModule(
            embedder, bag, lr=self.lr, weight_decay=self.weight_decay, head_weight=self.head_weight,
            feature_weight=self.feature_weight, confidence_beta=self.confidence_beta, crop_scale=self.crop_scale,
            seed=seed,
        )  # fmt: skip
        self._check_head(module.teacher_head)
        data = _PatchSamples(
            train, patches_per_epoch=self.patches_per_epoch, val_fraction=self.val_fraction,
            batch_size=self.batch_size, num_workers=self.num_workers, seed=seed,
        )  # fmt: skip
        checkpoint = ModelCheckpoint(Path(root) / "checkpoints", "best-{epoch}", monitor="val/agreement", mode="max",
                                     save_weights_only=True)  # fmt: skip
        _fit_best(module, data, checkpoint, trainer_kwargs, root, seed, max_epochs=self.max_epochs,
                  reload_dataloaders_every_n_epochs=1)  # fmt: skip
        return module.student

    def _check_head(self, head: StandardizedHead) -> None:
        probe = torch.zeros(2, head.in_dim, device=head.feature_mean.device)
        with torch.no_grad():
            if self.feature_weight and head.hidden(probe) is None:
                warnings.warn(
                    f"Distillation: {type(head.head).__name__} has no per-instance reduced features (embed/reduce); "
                    "the feature term (feature_weight) is 0",
                    stacklevel=3,
                )
            if self.confidence_beta is not None and head(probe).attention is None:
                raise ValueError(
                    f"confidence_beta: needs an aggregator with attention, {type(head.head).__name__} gives none"
                )


# ------------------------------------------------------------------------------------------------------ bag gradient


class _BagGradientModule(EndToEndMIL):
    """EndToEndMIL over the (frozen) standardised bag head; checkpoint selection is `BagGradient`'s."""

    def configure_callbacks(self) -> list[pl.Callback]:
        return []


class _SlideBags(pl.LightningDataModule):
    def __init__(self, train: Sequence[SlidePatches], val: Sequence[SlidePatches], labels: Mapping[str, int],
                 threads: int, seed: int) -> None:  # fmt: skip
        super().__init__()
        self.train, self.val, self.labels, self.threads, self.seed = train, val, labels, threads, seed

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._bags(self.train), batch_size=None, sampler=EpochShuffle(len(self.train), self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._bags(self.val), batch_size=None)

    def _bags(self, slides: Sequence[SlidePatches]) -> SlideBagDataset:
        return SlideBagDataset(slides, [self.labels[s.slide_id] for s in slides], self.threads)


def _hold_out(
    slides: Sequence[SlidePatches], labels: Mapping[str, int], fraction: float, seed: int
) -> tuple[list[SlidePatches], list[SlidePatches]]:
    """(train, val): a stratified, seeded `fraction` of the slides (at least one per class), or no validation when
    there are fewer than 4 slides or a class has fewer than 2. Labels only: patient grouping is the splits' job."""
    y = np.array([labels[s.slide_id] for s in slides])
    classes, counts = np.unique(y, return_counts=True)
    if len(slides) < 4 or counts.min() < 2:
        return list(slides), []
    rng = np.random.default_rng(seed)
    n_val = min(max(len(classes), round(fraction * len(slides))), len(slides) - len(classes))
    quota = np.maximum(1, np.round(n_val * counts / counts.sum())).astype(int)  # proportional, >= 1 per class
    quota = np.minimum(quota, counts - 1)  # and >= 1 left for training
    val = {int(i) for c, q in zip(classes, quota) for i in rng.permutation(np.flatnonzero(y == c))[:q]}
    return [s for i, s in enumerate(slides) if i not in val], [s for i, s in enumerate(slides) if i in val]


class BagGradient(CouplingStrategy):
    """Couple with the exact slide-level gradient: fine-tune a copy of E_i through the frozen bag head on whole slides.

    Each step embeds every patch of a training slide (`SlideBag`, read lazily) and back-propagates the bag loss
    (cross entropy of the standardised head's bag logits against the slide label, plus its auxiliary terms as in
    `SlideTask.loss`) exactly, in `chunk_size` chunks (`EndToEndMIL` with `chunked.bag_backward`: DDP averaging and
    clipping included; `max_instances` samples patches per slide instead). `train_head` lets a copy of the head learn
    too (it is discarded: the next bag phase retrains the head on new features).

    Needs `labels` (slide id -> class index) in `fit`. Validation: a stratified, seeded `val_fraction` of the
    training slides is held out and the best epoch by `val/{select_by}` wins ("loss": the bag loss, min, smooth even
    on a few slides; "auroc": max). With fewer than 4 slides, or a class of one slide, all slides train and the
    training loss selects. A Trainer `gradient_clip_val` is applied by the manual optimisation (norm clipping).
    """

    def __init__(
        self,
        lr: float = 1e-5,
        weight_decay: float = 1e-4,
        chunk_size: int = 64,
        train_head: bool = False,
        max_instances: int | None = None,
        bags_per_step: int = 1,
        val_fraction: float = 0.1,
        select_by: Literal["loss", "auroc"] = "loss",
        read_threads: int = 4,
        max_epochs: int = 5,
    ) -> None:
        _check_optimizer(lr, weight_decay, max_epochs)
        _check("chunk_size", chunk_size >= 1, "an int >= 1", chunk_size)
        _check("max_instances", max_instances is None or max_instances >= 1, "an int >= 1 or null", max_instances)
        _check("bags_per_step", bags_per_step >= 1, "an int >= 1", bags_per_step)
        _check("val_fraction", 0 < val_fraction < 1, "a float in (0, 1)", val_fraction)
        _check("select_by", select_by in ("loss", "auroc"), "'loss' or 'auroc'", select_by)
        _check("read_threads", read_threads >= 1, "an int >= 1", read_threads)
        self.lr, self.weight_decay, self.chunk_size, self.train_head = lr, weight_decay, chunk_size, train_head
        self.max_instances, self.bags_per_step, self.val_fraction = max_instances, bags_per_step, val_fraction
        self.select_by, self.read_threads, self.max_epochs = select_by, read_threads, max_epochs

    def fit(
        self,
        embedder: PatchEmbedder,
        bag: BagClassifier,
        train: Sequence[SlidePatches],
        *,
        trainer_kwargs: Mapping[str, Any],
        root: str | os.PathLike,
        seed: int,
        labels: Mapping[str, int] | None = None,
    ) -> PatchEmbedder:
        """See `CouplingStrategy.fit`; `labels` is required."""
        _check("train", len(train) > 0, "at least one training slide", len(train))
        missing = [s.slide_id for s in train if labels is None or s.slide_id not in labels]
        _check("labels", not missing, "a class index for every training slide", f"none for {missing[:3]}")
        classes = bag.aggregator.num_classes
        bad = {k: v for k, v in labels.items() if not 0 <= int(v) < classes}
        _check("labels", not bad, f"class indices in [0, {classes})", bad)
        kwargs = dict(trainer_kwargs)
        clip = kwargs.pop("gradient_clip_val", None)
        _check("trainer_kwargs.gradient_clip_algorithm", kwargs.pop("gradient_clip_algorithm", None) in (None, "norm"),
               "'norm' (manual optimisation clips by norm)", trainer_kwargs.get("gradient_clip_algorithm"))  # fmt: skip
        _check("trainer_kwargs.accumulate_grad_batches", kwargs.pop("accumulate_grad_batches", 1) == 1,
               "1 (use bags_per_step)", trainer_kwargs.get("accumulate_grad_batches"))  # fmt: skip

        fit_slides, val_slides = _hold_out(train, labels, self.val_fraction, seed)
        module = _BagGradientModule(
            _trainable_copy(embedder), StandardizedHead(bag, frozen=not self.train_head), chunk_size=self.chunk_size,
            max_instances=self.max_instances, bags_per_step=self.bags_per_step, lr=self.lr,
            weight_decay=self.weight_decay, gradient_clip_val=clip,
        )  # fmt: skip
        overrides: dict[str, Any] = {"max_epochs": self.max_epochs}
        if val_slides:
            monitor, mode, on_train_end = f"val/{self.select_by}", "min" if self.select_by == "loss" else "max", None
        else:
            monitor, mode, on_train_end = "train/loss", "min", True
            overrides["limit_val_batches"] = 0
        checkpoint = ModelCheckpoint(Path(root) / "checkpoints", "best-{epoch}", monitor=monitor, mode=mode,
                                     save_weights_only=True, save_on_train_epoch_end=on_train_end)  # fmt: skip
        data = _SlideBags(fit_slides, val_slides, labels, self.read_threads, seed)
        _fit_best(module, data, checkpoint, kwargs, root, seed, **overrides)
        return module.embedder
