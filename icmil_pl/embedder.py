"""Alias of `icmil_pl.encoders.embedder`, where the embedder lives: configs saved before the move name
`icmil_pl.embedder.PatchEmbedder`."""

from .encoders.embedder import FrozenBatchNorm2d, LeNetEmbedder, PatchEmbedder, freeze_batchnorm, reestimated

__all__ = ["FrozenBatchNorm2d", "LeNetEmbedder", "PatchEmbedder", "freeze_batchnorm", "reestimated"]
