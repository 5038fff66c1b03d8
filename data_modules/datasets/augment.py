"""Patch augmentations, drawn reproducibly: geometric ones on the patches' device, stain ones on the CPU."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from skimage.color import hed2rgb, rgb2hed
from torch import Tensor

from ..io import check

__all__ = ["StainJitter", "StainedBag", "random_flip_resized_crop"]


@dataclass(frozen=True)
class StainJitter:
    """HED jitter (Tellez et al. 2018), the augmentation against stain and scanner differences between sites: each
    patch taken to haematoxylin, eosin and DAB amounts by scikit-image's `rgb2hed` (Ruifrok and Johnston's vectors),
    each amount scaled by U(1 - sigma, 1 + sigma) and shifted by U(-bias, bias), and taken back (`hed2rgb`).
    scikit-image's amounts are optical densities divided by ln(10^6): a `bias` of 0.005 moves an H&E patch's colour
    by about 7 grey levels on average, 0.02 by about 19 (with `sigma` 0.2: Tellez's "HED-strong" range).

    Patch i of a call with `seed` draws from `np.random.default_rng([seed, i])`: the same patch gets the same view
    however a bag is cut into chunks, so both passes of a chunked backward see what a full-bag backward sees."""

    sigma: float = 0.05
    bias: float = 0.005

    def __post_init__(self) -> None:
        check("stain_jitter.sigma", 0 <= self.sigma < 1, "a float in [0, 1)", self.sigma)
        check("stain_jitter.bias", 0 <= self.bias < 1, "a float in [0, 1)", self.bias)

    def __call__(self, images: Tensor, seed: int, first: int = 0) -> Tensor:
        """uint8 RGB patches (N, 3, H, W) -> uint8 patches, patch k drawn as patch `first + k` of `seed`."""
        pixels = images.permute(0, 2, 3, 1).cpu().numpy()
        out = np.empty_like(pixels)
        for k, patch in enumerate(pixels):
            rng = np.random.default_rng([seed, first + k])
            scale, shift = rng.uniform(1 - self.sigma, 1 + self.sigma, 3), rng.uniform(-self.bias, self.bias, 3)
            out[k] = np.clip(np.rint(hed2rgb(rgb2hed(patch) * scale + shift) * 255), 0, 255)
        return torch.from_numpy(out).permute(0, 3, 1, 2).to(images.device)


class StainedBag:
    """A lazy bag (anything with `len()` and slicing, `chunked.Bag`) whose patches come stain-jittered: `bag[a:b]`
    holds patches a..b-1 of `seed` (`StainJitter`), so pass 1 and pass 2 of a chunked backward read the same."""

    def __init__(self, bag, jitter: StainJitter, seed: int) -> None:
        self.bag, self.jitter, self.seed = bag, jitter, seed

    def __len__(self) -> int:
        return len(self.bag)

    def __getitem__(self, index: slice) -> Tensor:
        start = range(len(self.bag))[index].start if len(self.bag) else 0
        return self.jitter(self.bag[index], self.seed, start)


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
