"""The generator's own ground truth of a synthetic slide, from its `SlideInfo`: tissue, tumour and benign-mimic masks
at any downsample, and which patches are tumour. The cohort writes the tumour as GeoJSON (`cohort.write_truth`); the
rest of the code reads it back through `data_modules.annotations`, patch for patch the same truth."""

from __future__ import annotations

import numpy as np

from ..annotations import box_fraction
from ..io import check
from .scene import SlideInfo, centres, in_regions, scene_of

__all__ = [
    "mimic_mask",
    "patch_mimic_fraction",
    "patch_tumour_fraction",
    "tissue_mask",
    "tumour_mask",
    "tumour_patches",
]


def tissue_mask(info: SlideInfo, downsample: float) -> np.ndarray:
    """Tissue ground truth on a grid `downsample` times coarser than level 0, shape (ceil(h/ds), ceil(w/ds))."""
    return scene_of(info).tissue(*centres(info.dimensions, _check_downsample(downsample)))


def tumour_mask(info: SlideInfo, downsample: float, kind: int | None = None) -> np.ndarray:
    """Tumour ground truth on a grid `downsample` times coarser than level 0, shape (ceil(h/ds), ceil(w/ds)); with
    `kind` (0: type a, 1: type b), that type's only."""
    return _mask([r for r in info.tumour_regions if kind is None or r.kind == kind], info, downsample)


def mimic_mask(info: SlideInfo, downsample: float) -> np.ndarray:
    """Where the benign mimics are (not tumour: their patches are negatives), on the `tumour_mask` grid."""
    return _mask(info.mimic_regions, info, downsample)


def _mask(regions, info: SlideInfo, downsample: float) -> np.ndarray:
    xs, ys = centres(info.dimensions, _check_downsample(downsample))
    mask = in_regions(regions, xs, ys)
    return np.zeros((len(ys), len(xs)), bool) if mask is None else mask


def patch_tumour_fraction(info: SlideInfo, coords: np.ndarray, side: float, downsample: int = 4) -> np.ndarray:
    """(N,): the fraction of each square patch (level-0 top-left `coords`, `side` level-0 pixels) inside the tumour,
    on the `tumour_mask` grid at `downsample`; at most one mask pixel of error along each edge."""
    return box_fraction(tumour_mask(info, downsample), coords, side, downsample)


def patch_mimic_fraction(info: SlideInfo, coords: np.ndarray, side: float, downsample: int = 4) -> np.ndarray:
    """(N,): as `patch_tumour_fraction`, inside the benign mimics."""
    return box_fraction(mimic_mask(info, downsample), coords, side, downsample)


def tumour_patches(info: SlideInfo, coords: np.ndarray, side: float) -> np.ndarray:
    """(N,) bool: the patches at least half inside the tumour, the patch-level truth every measurement uses."""
    return patch_tumour_fraction(info, coords, side) >= 0.5


def _check_downsample(downsample: float) -> float:
    check("downsample", downsample >= 1, ">= 1", downsample)
    return float(downsample)
