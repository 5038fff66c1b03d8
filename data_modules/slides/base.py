"""What every slide backend shares: OpenSlide's geometry conventions, resampled reads, thumbnails, errors.

A backend (`tiff_slide.TiffSlide`, `openslide_slide.OpenSlideSlide`) supplies its levels and one primitive,
`_read_level` (RGB pixels of one level in that level's coordinates, white outside); everything a caller uses is built
on it here, so the two read the same way (DESIGN.md section 3).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

__all__ = ["BACKGROUND", "MAX_SCAN_MPP", "Resample", "Slide", "SlideError", "positive"]

BACKGROUND = 255  # glass is white: regions outside the image read as white
# Microns per pixel beyond which a file's resolution is a screen's, not a scanner's: ImageJ, Photoshop and QuPath
# exports carry 72 dpi (352.8 um/px), and tiling at 0.5 um/px on that would upsample 700 times.
MAX_SCAN_MPP = 10.0
Resample = Literal["nearest", "box", "bilinear", "lanczos"]
_PIL_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
}


class SlideError(ValueError):
    """A slide file that cannot be read as asked; the message names the file and what was expected."""


class Slide:
    """A whole-slide image with OpenSlide's geometry conventions; see DESIGN.md section 3.

    `properties["backend"]` says which reader opened the file. Not picklable by design (it holds a file handle):
    datasets keep paths and open one `Slide` per worker process.
    """

    path: Path
    mpp: float | None  # level-0 microns per pixel: the file's, or the override; None if unknown
    objective_power: float | None  # the scan's objective magnification, where the file records it
    properties: dict[str, str]
    mpp_unknown_because: str = "no MPP in the file's metadata"

    # -- what a backend provides ---------------------------------------------------------------------------------------
    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        raise NotImplementedError

    def _read_level(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 pixels of `level` at level coordinates (x0, y0); outside the image is white."""
        raise NotImplementedError

    def _band_height(self, level: int) -> int:
        """Rows read at a time when a whole level is streamed (thumbnails): the level's tile height, say."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- OpenSlide-compatible geometry -------------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        w0, h0 = self.dimensions
        return tuple((w0 / w + h0 / h) / 2.0 for w, h in self.level_dimensions)

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed `downsample` (OpenSlide's rule)."""
        return _best_level(self.level_downsamples, downsample)

    # -- the pyramid this library reads from: the file's levels, then coarser ones a backend computes where the file
    # has few (a single-level TIFF), for thumbnails, tissue masks and the viewer; OpenSlide's geometry stays the file's
    @property
    def pyramid_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.level_dimensions

    @property
    def pyramid_downsamples(self) -> tuple[float, ...]:
        w0, h0 = self.dimensions
        computed = self.pyramid_dimensions[self.level_count :]
        return self.level_downsamples + tuple((w0 / w + h0 / h) / 2.0 for w, h in computed)

    def best_pyramid_level(self, downsample: float) -> int:
        """As `get_best_level_for_downsample`, over the pyramid's levels, computed ones included."""
        return _best_level(self.pyramid_downsamples, downsample)

    def require_mpp(self) -> float:
        if self.mpp is None:
            power = f"; the file records a {self.objective_power:g}x objective" if self.objective_power else ""
            raise SlideError(
                f"{self.path}: microns per pixel unknown ({self.mpp_unknown_because}{power}); give it in the slide's "
                "`mpp` cell of the labels CSV, or as tiling.mpp_override (tiling.mpp_from_objective reads it from the "
                "objective power)"
            )
        return self.mpp

    def _scan_mpp(self, mpp: float | None) -> float | None:
        """A file's own resolution, or None where no scanner would write it (above `MAX_SCAN_MPP`), said why."""
        if mpp is not None and mpp > MAX_SCAN_MPP:
            self.mpp_unknown_because = (
                f"its metadata says {mpp:.4g} um/px, {25_400 / mpp:.4g} dpi: a screen's resolution, not a scanner's"
            )
            return None
        return mpp

    # -- reading -----------------------------------------------------------------------------------------------------
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB pixels of `level` at level-0 `location`, `size` in level pixels; outside the image is white."""
        return self._region(location, level, size, self.level_count)

    def read_pyramid(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """As `read_region`, on any level of the pyramid (`pyramid_dimensions`)."""
        if level < self.level_count:
            return self.read_region(location, level, size)
        return self._region(location, level, size, len(self.pyramid_dimensions))

    def read_at_mpp(
        self, location: tuple[int, int], size: tuple[int, int], mpp: float, resample: Resample = "bilinear"
    ) -> np.ndarray:
        """`size` pixels at `mpp` microns per pixel, from the best level at or finer than `mpp`, resampled once."""
        w, h = (int(s) for s in size)
        if w <= 0 or h <= 0:
            raise SlideError(f"{self.path}: region size must be positive, got {size}")
        scale = mpp / self.require_mpp()  # level-0 pixels per output pixel
        level = self.best_pyramid_level(scale)
        ds = self.pyramid_downsamples[level]
        factor = scale / ds  # level pixels per output pixel, >= 1 up to rounding
        fx, fy = location[0] / ds, location[1] / ds
        if abs(factor - 1) < 1e-6 and fx == int(fx) and fy == int(fy):
            return self._read_level(level, int(fx), int(fy), w, h)
        x0, y0 = math.floor(fx), math.floor(fy)
        x1, y1 = math.ceil(fx + w * factor), math.ceil(fy + h * factor)
        region = Image.fromarray(self._read_level(level, x0, y0, x1 - x0, y1 - y0))
        box = (fx - x0, fy - y0, fx - x0 + w * factor, fy - y0 + h * factor)
        return np.asarray(region.resize((w, h), _PIL_RESAMPLE[resample], box=box))

    def get_thumbnail(self, size: tuple[int, int]) -> np.ndarray:
        """An RGB image fitting in `size` with the slide's aspect, built band by band (bounded memory)."""
        max_w, max_h = (int(s) for s in size)
        if max_w <= 0 or max_h <= 0:
            raise SlideError(f"{self.path}: thumbnail size must be positive, got {size}")
        w0, h0 = self.dimensions
        downsample = max(w0 / max_w, h0 / max_h)
        out_w, out_h = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
        level = self.best_pyramid_level(downsample)
        reduced = self._block_reduced_level(level, max(1, int(downsample / self.pyramid_downsamples[level])))
        return np.asarray(Image.fromarray(reduced).resize((out_w, out_h), Image.Resampling.LANCZOS))

    def zarr_level(self, level: int = 0):
        """A lazy zarr array of one level, for dask/napari-style access (the tifffile backend has one)."""
        raise SlideError(f"{self.path}: zarr views need the tifffile backend; this slide is read by {self.backend}")

    @property
    def backend(self) -> str:
        return self.properties["backend"]

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> None:
        raise TypeError(f"Slide({self.path}) holds an open file and cannot be pickled; pass paths to worker processes")

    def __repr__(self) -> str:
        return (
            f"Slide({str(self.path)!r}, dimensions={self.dimensions}, levels={self.level_count}, mpp={self.mpp}, "
            f"backend={self.backend!r})"
        )

    # -- shared internals --------------------------------------------------------------------------------------------
    def _check_region(self, level: int, size: tuple[int, int], levels: int | None = None) -> tuple[int, int]:
        """(w, h) of a region of `level`, one of the first `levels` (default: OpenSlide's `level_count`)."""
        levels = self.level_count if levels is None else levels
        w, h = (int(s) for s in size)
        if w <= 0 or h <= 0:
            raise SlideError(f"{self.path}: region size must be positive, got {size}")
        if not 0 <= level < levels:
            raise SlideError(f"{self.path}: level {level} out of range (the slide has {levels} levels)")
        return w, h

    def _region(self, location: tuple[int, int], level: int, size: tuple[int, int], levels: int) -> np.ndarray:
        w, h = self._check_region(level, size, levels)
        ds = self.pyramid_downsamples[level]
        x0, y0 = (math.floor(v / ds) for v in location)
        return self._read_level(level, x0, y0, w, h)

    def _block_reduced_level(self, level: int, factor: int) -> np.ndarray:
        """Level `level` block-averaged by `factor`, one band of rows at a time so no whole level is ever held."""
        width, height = self.pyramid_dimensions[level]
        band_h = self._band_height(level)
        out_w = width // factor or 1
        rows: list[np.ndarray] = []
        carry = np.empty((0, out_w, 3), dtype=np.float32)
        for y in range(0, height, band_h):
            band = self._read_level(level, 0, y, out_w * factor, min(band_h, height - y)).astype(np.float32)
            band = band.reshape(band.shape[0], out_w, factor, 3).mean(axis=2)
            band = np.concatenate([carry, band])
            usable = band.shape[0] // factor * factor
            if usable:
                rows.append(band[:usable].reshape(-1, factor, out_w, 3).mean(axis=1))
            carry = band[usable:]
        if not rows:
            rows.append(carry.mean(axis=0, keepdims=True))
        return np.round(np.concatenate(rows)).astype(np.uint8)


def _best_level(downsamples: tuple[float, ...], downsample: float) -> int:
    """The coarsest level whose downsample does not exceed `downsample` (OpenSlide's rule)."""
    best = 0
    for level, ds in enumerate(downsamples):
        if ds <= downsample * (1 + 1e-6):
            best = level
    return best


def positive(value: str | float | None) -> float | None:
    """A finite positive number from a metadata string (`0.2527`, `0.25 um`), else None."""
    if value is None:
        return None
    try:
        number = float(re.sub(r"[^0-9.eE+-]", "", str(value)))
    except ValueError:
        return None
    return number if math.isfinite(number) and number > 0 else None
