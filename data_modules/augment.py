"""Patch augmentations, on the patches' device, drawn reproducibly on the CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["random_flip_resized_crop"]


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
