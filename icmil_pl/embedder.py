"""The patch embedder: any timm backbone, optionally truncated, as a LightningModule whose `predict` is extraction."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn

__all__ = ["FrozenBatchNorm2d", "LeNetEmbedder", "PatchEmbedder", "freeze_batchnorm"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PatchEmbedder(pl.LightningModule):
    """uint8 patches (B, 3, H, W) -> features (B, D).

    `truncate_after` cuts a CNN after a named stage and average-pools it (ResNet50 after `layer3` = the 1024-d CLAM /
    ICMIL standard). Normalisation happens here, on the device, so loaders ship compact uint8 tensors. With
    `batchnorm="frozen"` BatchNorm layers always normalise with their running statistics, even in training mode
    (their affine weights still learn; running statistics never change): small patch batches would corrupt the
    statistics, and a chunked two-pass backward must see the same normalisation as a full-bag one. It is a property
    of the layers, not of `.train()` calls, so no trainer or mode save/restore can undo it.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        truncate_after: str | None = "layer3",
        pretrained: bool = False,
        weights: str | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        batchnorm: Literal["frozen", "train"] = "frozen",
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # the architecture as plain data (fingerprints, provenance): LightningCLI rewrites nested modules' hparams
        self.config = {
            "backbone": backbone,
            "truncate_after": truncate_after,
            "mean": list(mean),
            "std": list(std),
            "batchnorm": batchnorm,
            "drop_path_rate": drop_path_rate,
        }
        self.backbone = _build_backbone(backbone, truncate_after, pretrained, drop_path_rate)
        if weights is not None:
            _load_weights(self.backbone, Path(weights))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        if batchnorm == "frozen":
            freeze_batchnorm(self.backbone)
        info = getattr(self.backbone, "feature_info", None)
        self.feature_dim = int(info.channels()[-1] if truncate_after else self.backbone.num_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        x = (x - self.mean) / self.std
        out = self.backbone(x)
        if isinstance(out, (list, tuple)):  # features_only: the last requested stage, pooled
            out = out[-1].mean(dim=(2, 3))
        return out.flatten(1)

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self(batch["image"])

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


def _build_backbone(name: str, truncate_after: str | None, pretrained: bool, drop_path_rate: float) -> nn.Module:
    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        raise ValueError(f"embedder backbone {name!r} is not a timm model name (see timm.list_models())")
    kwargs = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
    if truncate_after is not None:
        stages = [info["module"] for info in timm.create_model(name, pretrained=False, num_classes=0).feature_info]
        if truncate_after not in stages:
            raise ValueError(f"truncate_after={truncate_after!r}: {name} has stages {stages}")
        kwargs |= {"features_only": True, "out_indices": (stages.index(truncate_after),)}
    else:
        kwargs["num_classes"] = 0
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as error:  # huggingface_hub's "not in the local cache" errors are OSErrors
        raise ValueError(
            f"embedder backbone {name!r}: pretrained weights are neither in the hub cache nor downloadable "
            f"({type(error).__name__}); offline, give a local checkpoint as `weights: <file>`, or `pretrained: false` "
            "for random initialisation"
        ) from error


def _load_weights(backbone: nn.Module, path: Path) -> None:
    """A local checkpoint: a plain state dict, a Lightning checkpoint of a PatchEmbedder, or a timm file."""
    if not path.is_file():
        raise ValueError(f"embedder weights {path}: no such file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("backbone."): v for k, v in state.items()}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"embedder weights {path}: {len(missing)} backbone tensors missing, e.g. {missing[:3]}")
    del unexpected  # heads of a full classifier (fc.*) are fine: truncation drops them


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
