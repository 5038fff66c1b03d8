"""Tissue detection on a thumbnail and the patch grid at a target resolution, cached per slide.

The mask is computed at `mask_mpp` (coarse, a few thousand pixels a side at most), so tiling a 100k x 100k slide costs
one low-resolution read. Grid coordinates are level-0 pixels, the convention every reader and writer here shares.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.filters.rank import median

from ..io import atomic_path, check
from . import Slide, SlideError, file_signature, open_slide

__all__ = ["PatchGrid", "SlidePatches", "TilingConfig", "TissueParams", "patch_grid", "tissue_mask"]

_CACHE_VERSION = 2
MAX_UPSAMPLE = 4.0  # the most a tiling may enlarge a slide's pixels: beyond it the slide's resolution is wrong
MIN_GLASS = 0.15  # below this share of glass-like pixels, Otsu would split the tissue itself: the floor decides
MAX_SPECK_SHARE = 0.25  # a speck is never this share of the image or more: in a small crop, min_object_um2 is not


@dataclass(frozen=True)
class TissueParams:
    """Saturation/Otsu tissue detection; sizes in microns so they mean the same at any magnification."""

    mask_mpp: float = 8.0  # resolution of the thumbnail the mask is computed on
    min_saturation: float = 0.05  # floor under Otsu's threshold (0-1 HSV saturation): empty glass stays background
    max_value: float = 0.95  # ignore near-white pixels whatever their saturation
    median_um: float = 56.0  # median filter on saturation before thresholding (0: off)
    close_um: float = 64.0  # morphological closing radius: joins fragmented tissue
    min_object_um2: float = 50_000.0  # drop specks (dust, debris) smaller than this area
    fill_holes: bool = True

    def __post_init__(self) -> None:
        check("tiling.tissue.mask_mpp", self.mask_mpp > 0, "microns per pixel > 0", self.mask_mpp)
        check("tiling.tissue.min_saturation", 0 <= self.min_saturation <= 1, "a float in [0, 1]", self.min_saturation)
        check("tiling.tissue.max_value", 0 < self.max_value <= 1, "a float in (0, 1]", self.max_value)
        for name in ("median_um", "close_um", "min_object_um2"):
            check(f"tiling.tissue.{name}", getattr(self, name) >= 0, "a float >= 0", getattr(self, name))


@dataclass(frozen=True)
class TilingConfig:
    """How slides become patches: resolution, size, tissue rule. Shared by extraction and end-to-end bags.

    A slide's level-0 resolution is its labels-CSV `mpp` cell if it has one, else its file's metadata; `mpp_override`
    serves the files without metadata only, unless `force_mpp` applies it to every slide (a mis-calibrated scanner).
    `mpp_from_objective` (opt-in) reads a file without mpp but with an objective power at 10 / power um/px (20x = 0.5,
    the usual convention, which scanners miss by up to 10 %), warning with the file's name; before `mpp_override`.
    """

    mpp: float = 0.5
    patch_size: int = 256
    tissue_threshold: float = 0.5
    tissue: TissueParams = TissueParams()
    mpp_override: float | None = None
    force_mpp: bool = False
    mpp_from_objective: bool = False

    def __post_init__(self) -> None:
        check("tiling.mpp", self.mpp > 0, "microns per pixel > 0", self.mpp)
        check("tiling.patch_size", self.patch_size >= 1, "an int >= 1 (pixels)", self.patch_size)
        check("tiling.tissue_threshold", 0 <= self.tissue_threshold <= 1, "a float in [0, 1]", self.tissue_threshold)
        override = self.mpp_override
        check("tiling.mpp_override", override is None or override > 0, "microns per pixel > 0", override)
        if self.force_mpp and self.mpp_override is None:
            raise ValueError("tiling.force_mpp: expected a tiling.mpp_override to force on every slide, got none")


@dataclass(frozen=True)
class PatchGrid:
    """Patches of one slide: level-0 top-left corners, and the geometry needed to read them back."""

    coords: np.ndarray  # (N, 2) int32, (x, y) in level-0 pixels
    patch_size: int  # output pixels per side at `mpp`
    mpp: float  # microns per pixel of the patches
    level0_size: float  # level-0 pixels per patch side
    tissue_fraction: np.ndarray  # (N,) float32
    mask: np.ndarray  # tissue mask thumbnail (bool) at `mask_mpp`
    mask_mpp: float

    def __len__(self) -> int:
        return len(self.coords)


@dataclass(frozen=True)
class SlidePatches:
    """Where one slide's patches are: its file, id, grid and optional mpp override; `patch_store`, a folder where
    readers keep them decoded (`data_modules.datasets.patch_store`), or None."""

    slide_id: str
    path: Path
    grid: PatchGrid
    mpp_override: float | None = None
    patch_store: str | None = None

    def digest(self) -> str:
        """What the patches are cut from and how: the file (`file_signature`: size, mtime and a content sample, of
        every instance of a DICOM series), the grid (level-0 corners and patch size, which follow the level-0 mpp
        used) and the output size and mpp. Anything computed from the patches, such as cached features, is valid
        while this is unchanged."""
        grid = self.grid
        digest = hashlib.blake2b(digest_size=12)
        geometry = [*file_signature(self.path), grid.patch_size, grid.mpp, grid.level0_size]
        digest.update(json.dumps(geometry).encode())
        digest.update(np.ascontiguousarray(grid.coords, dtype=np.int64).tobytes())
        return digest.hexdigest()


def tissue_mask(slide: Slide, params: TissueParams = TissueParams()) -> np.ndarray:
    """Boolean tissue mask at `params.mask_mpp` microns per pixel (`mask_resolution`).

    Saturation above Otsu's threshold and `min_saturation`, on pixels darker than `max_value`; where glass is scarce
    (TMA cores, ROI exports, tissue-filled crops: under `MIN_GLASS` of the image), Otsu would split the tissue itself,
    so `min_saturation` alone decides. Specks under `min_object_um2` are dropped, never objects over
    `MAX_SPECK_SHARE` of the image.

    Works in uint8 throughout (HSV saturation and value straight from RGB, a histogram median filter, closing by
    distance transforms): a 50k x 50k slide's 3k x 3k mask costs about a second, not ten.
    """
    w0, h0 = slide.dimensions
    mask_mpp = mask_resolution(slide, params)
    scale = mask_mpp / slide.require_mpp()
    thumb = slide.get_thumbnail((max(1, round(w0 / scale)), max(1, round(h0 / scale))))
    value = thumb.max(axis=2)
    spread = value - thumb.min(axis=2)
    saturation = (spread.astype(np.uint16) * 255 // np.maximum(value, 1)).astype(np.uint8)  # HSV S, 0-255
    px = lambda um: max(0, int(round(um / mask_mpp)))  # noqa: E731 - tiny unit conversion
    if px(params.median_um) > 1:
        saturation = median(saturation, footprint=np.ones((px(params.median_um),) * 2, bool))
    stained = value < params.max_value * 255
    floor = params.min_saturation * 255
    candidate = saturation[stained]
    glass = 1 - np.count_nonzero(stained & (saturation > floor)) / saturation.size  # near-white or unsaturated
    otsu = threshold_otsu(candidate) if glass >= MIN_GLASS and candidate.size and np.ptp(candidate) > 0 else 0
    mask = (saturation > max(otsu, floor)) & stained
    radius = px(params.close_um)
    if radius and mask.any():  # closing = dilation then erosion by a disk, each an exact distance threshold
        dilated = ndimage.distance_transform_edt(~np.pad(mask, radius)) <= radius
        mask = (ndimage.distance_transform_edt(dilated) > radius)[radius:-radius, radius:-radius]
    if params.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    min_pixels = min(params.min_object_um2 / mask_mpp**2, MAX_SPECK_SHARE * mask.size)
    if min_pixels > 1 and mask.any():
        labels, n = ndimage.label(mask)
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        mask = np.isin(labels, 1 + np.flatnonzero(sizes >= min_pixels))
    return mask


def mask_resolution(slide: Slide, params: TissueParams) -> float:
    """The mask's microns per pixel: `params.mask_mpp`, or the slide's own where it is coarser (a mask is never
    finer than level 0, whatever the settings)."""
    return max(params.mask_mpp, slide.require_mpp())


def patch_grid(
    path: str | os.PathLike,
    *,
    mpp: float,
    patch_size: int,
    tissue_threshold: float = 0.5,
    tissue: TissueParams = TissueParams(),
    mpp_override: float | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> PatchGrid:
    """Non-overlapping `patch_size` patches at `mpp` whose tissue fraction is at least `tissue_threshold`.

    With `cache_dir`, the grid is stored there keyed by the file (path, `file_signature`) and every parameter, so a
    second call with the same inputs only reads a small .npz.
    """
    check("mpp", mpp > 0, "microns per pixel > 0", mpp)
    check("patch_size", patch_size >= 1, "an int >= 1 (pixels)", patch_size)
    check("tissue_threshold", 0.0 <= tissue_threshold <= 1.0, "a float in [0, 1]", tissue_threshold)
    path = Path(path)
    cache_file = None
    if cache_dir is not None:
        key = _cache_key(path, mpp, patch_size, tissue_threshold, tissue, mpp_override)
        cache_file = Path(cache_dir) / f"{path.name}.{key}.grid.npz"
        if cache_file.is_file():
            return _load(cache_file)
    with open_slide(path, mpp=mpp_override) as slide:
        grid = _compute_grid(slide, mpp, patch_size, tissue_threshold, tissue)
    if cache_file is not None:
        _save(cache_file, grid)
    return grid


def _compute_grid(slide: Slide, mpp: float, patch_size: int, threshold: float, tissue: TissueParams) -> PatchGrid:
    slide_mpp = slide.require_mpp()
    if slide_mpp > MAX_UPSAMPLE * mpp:  # bounded work and memory, whatever the resolution says
        raise SlideError(
            f"{slide.path}: tiling at {mpp:g} um/px would enlarge this slide's {slide_mpp:.4g} um/px pixels "
            f"{slide_mpp / mpp:.0f} times (at most {MAX_UPSAMPLE:g}); check its resolution (the labels CSV's `mpp` "
            "cell, tiling.mpp_override) or tiling.mpp"
        )
    level0_size = patch_size * mpp / slide_mpp
    w0, h0 = slide.dimensions
    nx, ny = int(w0 // level0_size), int(h0 // level0_size)
    if nx == 0 or ny == 0:
        raise SlideError(
            f"{slide.path}: slide ({w0} x {h0} px) is smaller than one {patch_size} px patch at {mpp} um/px"
        )
    mask, mask_mpp = tissue_mask(slide, tissue), mask_resolution(slide, tissue)
    if not mask.any():
        raise SlideError(
            f"{slide.path}: no tissue found; tune tiling.tissue (min_saturation, max_value, min_object_um2) for this "
            "slide's stain and background"
        )
    fraction = _cell_fractions(mask, level0_size * slide_mpp / mask_mpp, nx, ny)
    gy, gx = np.nonzero(fraction >= max(threshold, 1e-9))
    coords = np.stack([np.floor(gx * level0_size), np.floor(gy * level0_size)], axis=1).astype(np.int32)
    if len(coords) == 0:
        raise SlideError(f"{slide.path}: no patch has a tissue fraction of at least {threshold}")
    return PatchGrid(coords, patch_size, mpp, level0_size, fraction[gy, gx].astype(np.float32), mask, mask_mpp)


def _cell_fractions(mask: np.ndarray, cell: float, nx: int, ny: int) -> np.ndarray:
    """Tissue fraction of each grid cell (`cell` mask pixels a side, fractional), by area-weighted integral image."""
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1))
    integral[1:, 1:] = mask.cumsum(0).cumsum(1)

    def at(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:  # bilinear lookup: exact area for fractional edges
        ys, xs = np.clip(ys, 0, mask.shape[0]), np.clip(xs, 0, mask.shape[1])
        y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
        y1, x1 = np.minimum(y0 + 1, mask.shape[0]), np.minimum(x0 + 1, mask.shape[1])
        wy, wx = ys - y0, xs - x0
        return (
            integral[y0][:, x0] * np.outer(1 - wy, 1 - wx)
            + integral[y1][:, x0] * np.outer(wy, 1 - wx)
            + integral[y0][:, x1] * np.outer(1 - wy, wx)
            + integral[y1][:, x1] * np.outer(wy, wx)
        )

    ys, xs = np.arange(ny + 1) * cell, np.arange(nx + 1) * cell
    table = at(ys, xs)
    area = table[1:, 1:] - table[:-1, 1:] - table[1:, :-1] + table[:-1, :-1]
    return area / (cell * cell)


def _cache_key(path: Path, mpp: float, patch_size: int, threshold: float, tissue: TissueParams, override) -> str:
    blob = json.dumps(
        [
            _CACHE_VERSION,
            str(path.resolve()),
            *file_signature(path),
            mpp,
            patch_size,
            threshold,
            asdict(tissue),
            override,
        ],
        sort_keys=True,
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _save(file: Path, grid: PatchGrid) -> None:
    """Write to a temporary name then rename: a killed run never leaves a half-written grid."""
    with atomic_path(file) as tmp, tmp.open("wb") as fh:  # a file object: np.savez adds no suffix to it
        np.savez(fh, **{k: np.asarray(v) for k, v in asdict(grid).items()})


def _load(file: Path) -> PatchGrid:
    with np.load(file) as data:
        return PatchGrid(
            coords=data["coords"],
            patch_size=int(data["patch_size"]),
            mpp=float(data["mpp"]),
            level0_size=float(data["level0_size"]),
            tissue_fraction=data["tissue_fraction"],
            mask=data["mask"],
            mask_mpp=float(data["mask_mpp"]),
        )
