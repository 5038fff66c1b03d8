"""The patch embedder: a foundation-model preset, a timm or hub backbone (CNNs optionally truncated), as a
LightningModule whose `predict` is extraction."""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import nn
from torch.utils.data import DataLoader, Subset

from data_modules.datasets.patches import PatchDataset
from data_modules.slides.tiling import SlidePatches

from .backbones import Preprocessing, build_backbone
from .finetune import Finetune, FullFinetune
from .presets import PRESETS, EncoderPreset, Interpolation, Output, tiling_mismatch
from .weights import hub_weights, load_weights, weights_from_map

__all__ = ["FrozenBatchNorm2d", "LeNetEmbedder", "PatchEmbedder", "freeze_batchnorm", "reestimated"]

_WARNED: set[str] = set()  # tiling warnings given in this process: each once, however many phases read patches


class PatchEmbedder(pl.LightningModule):
    """uint8 patches (B, 3, H, W) of any size -> features (B, D).

    `backbone` is a preset name (`encoders.PRESETS`: uni, uni2-h, virchow2, ...), an `hf-hub:org/name` id or a timm
    name; `model_kwargs` go to `timm.create_model` (over a preset's own). Preprocessing happens here, on the device,
    so loaders ship compact uint8 tensors: the shorter side resized to `resize_size`, the centre `input_size` square
    cut, `mean` / `std` normalisation; each left `None` takes the preset's value (timm ViTs: their own input size;
    CNNs: no resize, ImageNet statistics). `output` picks the feature: `pooled` (timm's pooled output), `cls` or
    `cls+mean` (the class token ++ the mean of the patch tokens, every class and register token skipped).
    `feature_dim`, if given, is checked against the backbone's (the encoder fragments state the width they give).

    `truncate_after` cuts a CNN after a named stage and average-pools it (ResNet50 after `layer3` = the 1024-d CLAM /
    ICMIL standard). With `batchnorm="frozen"` BatchNorm layers always normalise with their running statistics, even in
    training mode (their affine weights still learn; running statistics never change): small patch batches would
    corrupt the statistics, and a chunked two-pass backward must see the same normalisation as a full-bag one. It is a
    property of the layers, not of `.train()` calls, so no trainer or mode save/restore can undo it.

    `finetune` (`finetune.Finetune`: full, LoRA, last k blocks, norms only) is what trains when a coupling or
    end-to-end training fine-tunes this embedder (`start_finetune`); `merge_finetune` folds adapters back, so the
    state dict of a fine-tuned embedder has the keys of the original. `grad_checkpointing` recomputes a ViT's block
    activations in the backward pass (timm's `set_grad_checkpointing`): less memory per chunk, one more forward.
    The recommended precision of a preset (`recommended_precision`) is the trainer's to apply (`trainer.precision`).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        truncate_after: str | None = None,
        pretrained: bool = False,
        weights: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        output: Output | None = None,
        input_size: int | None = None,
        resize_size: int | None = None,
        interpolation: Interpolation | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        feature_dim: int | None = None,
        batchnorm: Literal["frozen", "train"] = "frozen",
        drop_path_rate: float = 0.0,
        finetune: Finetune | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["finetune"])
        preset = PRESETS.get(backbone)
        if preset is not None and truncate_after is not None:
            raise ValueError(f"truncate_after={truncate_after!r}: preset {backbone!r} is a ViT without stages to cut")
        kwargs = {**(preset.model_kwargs if preset else {}), **(model_kwargs or {})}
        name = preset.architecture if preset else backbone
        from_map = weights_from_map(backbone, *([preset.hub_id] if preset else []))
        timm_pretrained = pretrained and preset is None and weights is None and from_map is None
        self.backbone = build_backbone(name, kwargs, timm_pretrained, truncate_after, drop_path_rate)
        self.finetune = finetune or FullFinetune()
        self._finetuning = False
        self.preset = backbone if preset else None
        self.recommended_precision = preset.precision if preset else None
        self.output: Output = output or (preset.output if preset else "pooled")
        if self.output != "pooled" and not getattr(self.backbone, "has_class_token", False):
            raise ValueError(f"output={self.output!r}: {backbone} has no class token; use output: pooled")
        reading = Preprocessing.resolve(
            self.backbone, backbone, preset, input_size, resize_size, interpolation, mean, std
        )
        self.input_size, self.resize_size, self.interpolation = reading.input_size, reading.resize_size, reading.mode
        mean, std = reading.mean, reading.std
        self.source = self._load(preset, pretrained, weights, from_map, truncate_after is not None)  # settings checked
        # the architecture as plain data (fingerprints, provenance): LightningCLI rewrites nested modules' hparams
        self.config = {
            "backbone": backbone,
            "model_kwargs": {k: v if isinstance(v, str | int | float | bool) else repr(v) for k, v in kwargs.items()},
            "truncate_after": truncate_after,
            "output": self.output,
            "input_size": self.input_size,
            "resize_size": self.resize_size,
            "interpolation": self.interpolation,
            "mean": list(mean),
            "std": list(std),
            "batchnorm": batchnorm,
            "drop_path_rate": drop_path_rate,
        }
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        if batchnorm == "frozen":
            freeze_batchnorm(self.backbone)
        if grad_checkpointing:
            if not hasattr(self.backbone, "set_grad_checkpointing"):
                raise ValueError(f"grad_checkpointing: {backbone} does not support it")
            self.backbone.set_grad_checkpointing(True)
        info = getattr(self.backbone, "feature_info", None)
        width = int(info.channels()[-1] if truncate_after else self.backbone.num_features)
        self.feature_dim = 2 * width if self.output == "cls+mean" else width
        if feature_dim is not None and feature_dim != self.feature_dim:
            raise ValueError(
                f"feature_dim={feature_dim}: {backbone} with output {self.output} gives {self.feature_dim}-d features"
            )

    def _load(
        self, preset: EncoderPreset | None, pretrained: bool, weights: str | None, from_map: Path | None, cut: bool
    ) -> dict[str, Any]:
        """Loads the weights a preset or a local file holds; returns where they came from (provenance)."""
        source: dict[str, Any] = {"preset": self.preset, "hub_id": preset.hub_id if preset else None}
        if weights is not None or (pretrained and from_map is not None):
            path = Path(weights) if weights is not None else from_map
            assert path is not None
            load_weights(self.backbone, path, truncated=cut)
            return source | {"weights": str(path)}
        if pretrained and preset is not None:
            path, revision = hub_weights(preset)
            load_weights(self.backbone, path)
            return source | {"weights": "hub", "hub_revision": revision}
        if pretrained:
            return source | {"weights": "timm pretrained", "hub_id": self.backbone.pretrained_cfg.get("hf_hub_id")}
        return source | {"weights": "random init"}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        if self.resize_size is not None and min(x.shape[-2:]) != self.resize_size:
            h, w = x.shape[-2:]
            scale = self.resize_size / min(h, w)
            size = (max(self.resize_size, round(h * scale)), max(self.resize_size, round(w * scale)))
            x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False, antialias=True)
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            top, left = (x.shape[-2] - self.input_size) // 2, (x.shape[-1] - self.input_size) // 2
            x = x[..., top : top + self.input_size, left : left + self.input_size]
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        if self.output != "pooled":
            tokens = self.backbone.forward_features(x)
            cls = tokens[:, 0]
            if self.output == "cls":
                return cls
            return torch.cat([cls, tokens[:, self.backbone.num_prefix_tokens :].mean(dim=1)], dim=1)
        out = self.backbone(x)
        if isinstance(out, (list, tuple)):  # features_only: the last requested stage, pooled
            out = out[-1].mean(dim=(2, 3))
        return out.flatten(1)

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self(batch["image"])

    @torch.no_grad()
    def reestimate_batchnorm(self, batches: Iterable[torch.Tensor]) -> int:
        """Re-estimate every BatchNorm's running statistics on `batches` of uint8 patches: one pass with BatchNorm
        in training mode, the statistics averaged over the batches, no weight moved. A random-init or ImageNet CNN
        normalises H&E by statistics that are not its own; this is the cheap gain any CNN gets on a cohort before
        anything learns, so a coupling must not be credited with it. Returns how many patches it saw."""
        frozen = self.config["batchnorm"] == "frozen"
        thaw_batchnorm(self.backbone)
        norms = [m for m in self.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        training, momenta = self.training, [m.momentum for m in norms]
        self.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average over the batches, not an exponential one
            norm.train()
        seen = 0
        for images in batches:
            self(images.to(self.mean.device))
            seen += len(images)
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        self.train(training)
        if frozen:
            freeze_batchnorm(self.backbone)
        return seen

    def start_finetune(self) -> PatchEmbedder:
        """Marks what trains by `finetune` (adapters injected), once; returns self."""
        if not self._finetuning:
            self.backbone = self.finetune.apply(self.backbone)
            self._finetuning = True
        return self

    def merge_finetune(self) -> PatchEmbedder:
        """Folds adapters into the backbone's weights (state-dict keys as before `start_finetune`); returns self."""
        if self._finetuning:
            self.backbone = self.finetune.merge(self.backbone)
            self._finetuning = False
        return self

    def check_tiling(self, mpp: float, patch_size: int) -> str | None:
        """Warns (once per process) where patches are cut otherwise than a preset's authors cut them, naming both;
        returns the warning, or None."""
        message = tiling_mismatch(self.preset, mpp, patch_size, self.resize_size)
        if message is not None and message not in _WARNED:
            _WARNED.add(message)
            warnings.warn(message, stacklevel=2)
        return message

    def fingerprint(self) -> str:
        """A short hash of the architecture, normalisation and current weights: feature caches are keyed by it."""
        digest = hashlib.blake2b(digest_size=8)
        digest.update(json.dumps(self.config, sort_keys=True).encode())
        digest.update(self.weights_hash().encode())
        return digest.hexdigest()

    def weights_hash(self) -> str:
        digest = hashlib.blake2b(digest_size=16)
        for name, tensor in sorted(self.backbone.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def provenance(self) -> dict[str, Any]:
        """What a feature cache records of its embedder: the model, where its weights came from, how it reads."""
        return {
            **self.source,
            "backbone": self.config["backbone"],
            "truncate_after": self.config["truncate_after"],
            "output": self.output,
            "input_size": self.input_size,
            "finetune": self.finetune.describe(),
            "weights_hash": self.weights_hash(),
            "feature_dim": self.feature_dim,
        }


def reestimated(
    embedder: PatchEmbedder,
    slides: Sequence[SlidePatches],
    max_patches: int,
    *,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> PatchEmbedder:
    """A copy of `embedder` (on the CPU) whose BatchNorm statistics are re-estimated on a seeded sample of at most
    `max_patches` patches of `slides` (`PatchEmbedder.reestimate_batchnorm`), read in batches of `batch_size`."""
    patches = PatchDataset(slides)
    sample = np.sort(np.random.default_rng(seed).permutation(len(patches))[:max_patches])
    loader = DataLoader(Subset(patches, sample.tolist()), batch_size=batch_size)
    calibrated = copy.deepcopy(embedder).to(device)
    calibrated.reestimate_batchnorm(batch["image"] for batch in loader)
    return calibrated.cpu()


class _AlwaysEval:
    """Mixin: the module reports eval mode whatever `.train()` or a trainer's mode save/restore sets."""

    @property
    def training(self) -> bool:
        return False

    @training.setter
    def training(self, value: bool) -> None:
        pass


class FrozenBatchNorm2d(_AlwaysEval, nn.BatchNorm2d):
    """BatchNorm2d normalising with its running statistics in training too; its affine weights still learn."""


class FrozenBatchNormAct2d(_AlwaysEval, BatchNormAct2d):
    """timm's fused BatchNorm + activation, frozen the same way."""


_FROZEN = {nn.BatchNorm2d: FrozenBatchNorm2d, BatchNormAct2d: FrozenBatchNormAct2d}


def freeze_batchnorm(module: nn.Module) -> None:
    """Freeze the statistics of every BatchNorm in `module`, in place (same parameters, buffers and state dict)."""
    for child in module.modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, _AlwaysEval):
            frozen = _FROZEN.get(type(child))
            if frozen is None:
                raise ValueError(f"batchnorm='frozen' does not know {type(child).__name__}; use batchnorm='train'")
            child.__class__ = frozen


def thaw_batchnorm(module: nn.Module) -> None:
    """Undo `freeze_batchnorm` in place: the layers follow `.train()` again and update their running statistics."""
    plain = {frozen: base for base, frozen in _FROZEN.items()}
    for child in module.modules():
        if type(child) in plain:
            child.__class__ = plain[type(child)]
            child.train(module.training)


class LeNetEmbedder(nn.Module):
    """The MNIST-bags feature extractor of Ilse et al. (2018): two conv/pool stages and a 500-d fc layer.

    Small, BatchNorm-free and quick to train from scratch, so chunked and full-bag training are exactly comparable
    on digit bags. Takes uint8 (B, C, 28, 28) patches (other sizes are resized), uses their channel mean.
    """

    def __init__(self, feature_dim: int = 500, image_size: int = 28) -> None:
        super().__init__()
        self.feature_dim, self.image_size = feature_dim, image_size
        self.features = nn.Sequential(
            nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2)
        )
        side = ((image_size - 4) // 2 - 4) // 2
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(50 * side * side, feature_dim), nn.ReLU())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().mean(dim=1, keepdim=True)
        x = x / 255.0 if images.dtype == torch.uint8 else x
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return self.fc(self.features(x))
