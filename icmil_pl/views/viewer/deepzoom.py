"""Deep Zoom tiles of a slide, cut on request from our own `Slide` reader (OpenSlide's DeepZoomGenerator geometry).

Deep Zoom level `max_level` is level 0 of the slide; each level below halves it (rounding up) down to 1 x 1. A tile is
`tile_size` pixels plus `overlap` on every side that has a neighbour. It is read from the coarsest slide level that is
at least as fine as the Deep Zoom level, and resized only where the two differ: where they coincide (every level of a
2x or 4x pyramid) a tile is exactly `Slide.read_region` of its rectangle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image

from data_modules.slides import Slide

__all__ = ["DeepZoom", "TileOutOfRange"]

_SAME_SCALE = 1e-3  # slide-level downsamples are measured ratios (e.g. 3.9996 for an odd level-0 width)


class TileOutOfRange(LookupError):
    """A tile address past the slide's edge or its levels (the server answers 404)."""


@dataclass(frozen=True)
class DeepZoom:
    """The Deep Zoom pyramid of one slide; `tile` reads one tile."""

    slide: Slide
    tile_size: int = 254
    overlap: int = 1

    @cached_property
    def level_dimensions(self) -> list[tuple[int, int]]:
        """(width, height) of every Deep Zoom level, coarsest (1 x 1) first."""
        size = self.slide.dimensions
        sizes = [size]
        while size[0] > 1 or size[1] > 1:
            size = (max(1, math.ceil(size[0] / 2)), max(1, math.ceil(size[1] / 2)))
            sizes.append(size)
        return sizes[::-1]

    @property
    def max_level(self) -> int:
        return len(self.level_dimensions) - 1

    def dzi(self) -> str:
        """The `.dzi` descriptor OpenSeadragon opens."""
        w, h = self.slide.dimensions
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="jpeg" '
            f'Overlap="{self.overlap}" TileSize="{self.tile_size}"><Size Width="{w}" Height="{h}"/></Image>\n'
        )

    def tile_grid(self, level: int) -> tuple[int, int]:
        """(columns, rows) of tiles at `level`."""
        w, h = self._level_size(level)
        return math.ceil(w / self.tile_size), math.ceil(h / self.tile_size)

    def tile_rect(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """(x, y, width, height) of a tile in the pixels of its Deep Zoom level, overlap included."""
        cols, rows = self.tile_grid(level)
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileOutOfRange(f"tile {col}_{row}: level {level} has {cols} x {rows} tiles")
        w, h = self._level_size(level)
        x0 = col * self.tile_size - (self.overlap if col > 0 else 0)
        y0 = row * self.tile_size - (self.overlap if row > 0 else 0)
        x1 = min(w, (col + 1) * self.tile_size + self.overlap)
        y1 = min(h, (row + 1) * self.tile_size + self.overlap)
        return x0, y0, x1 - x0, y1 - y0

    def downsample(self, level: int) -> float:
        """Level-0 pixels per pixel of Deep Zoom `level`."""
        return float(2 ** (self.max_level - level))

    def tile(self, level: int, col: int, row: int) -> np.ndarray:
        """RGB pixels of one tile (height, width, 3)."""
        x, y, w, h = self.tile_rect(level, col, row)
        d = self.downsample(level)
        source = self.slide.best_pyramid_level(d)
        factor = d / self.slide.pyramid_downsamples[source]  # source-level pixels per tile pixel, >= 1
        location = (round(x * d), round(y * d))
        if abs(factor - 1) < _SAME_SCALE:
            return self.slide.read_pyramid(location, source, (w, h))
        region = self.slide.read_pyramid(location, source, (math.ceil(w * factor), math.ceil(h * factor)))
        return np.asarray(Image.fromarray(region).resize((w, h), Image.Resampling.LANCZOS))

    def _level_size(self, level: int) -> tuple[int, int]:
        if not 0 <= level <= self.max_level:
            raise TileOutOfRange(f"level {level}: the slide has Deep Zoom levels 0 to {self.max_level}")
        return self.level_dimensions[level]
