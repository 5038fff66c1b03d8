"""Patch encoders: `PatchEmbedder` (a preset, a timm name or an `hf-hub:` id, as a LightningModule whose `predict` is
extraction), the foundation-model presets, how backbones are built and read patches, where their weights come from,
and which of their parameters learn (`finetune`)."""

from .backbones import Preprocessing, build_backbone, resolve_kwargs
from .embedder import FrozenBatchNorm2d, LeNetEmbedder, PatchEmbedder, freeze_batchnorm, reestimated, thaw_batchnorm
from .finetune import Finetune, FullFinetune, LastBlocks, LoRA, NormsOnly, trainable_parameter_count
from .presets import PRESETS, EncoderPreset, Output
from .weights import WEIGHTS_MAP_ENV, hub_weights, load_weights, weights_from_map

__all__ = [
    "PRESETS",
    "WEIGHTS_MAP_ENV",
    "EncoderPreset",
    "Finetune",
    "FrozenBatchNorm2d",
    "FullFinetune",
    "LastBlocks",
    "LeNetEmbedder",
    "LoRA",
    "NormsOnly",
    "Output",
    "PatchEmbedder",
    "Preprocessing",
    "build_backbone",
    "freeze_batchnorm",
    "hub_weights",
    "load_weights",
    "reestimated",
    "resolve_kwargs",
    "thaw_batchnorm",
    "trainable_parameter_count",
    "weights_from_map",
]
