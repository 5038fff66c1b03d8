"""Pixels at any pyramid level, as the file holds them before compression: level k > 0 is the 4x4 area average of
level k-1 (partial blocks at the image edge average the pixels that exist), so any region of any level can be
regenerated and compared with what a reader returns."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..io import check
from .scene import Scene, SlideInfo, scene_of

__all__ = ["area4", "render_region"]


def area4(a: np.ndarray) -> np.ndarray:
    """4x4 area average (rounded) of an RGB uint8 image; edge blocks average the pixels they have."""
    h, w = a.shape[:2]
    bh, bw = -(-h // 4), -(-w // 4)
    if h % 4 or w % 4:
        padded = np.zeros((bh * 4, bw * 4, 3), np.uint8)
        padded[:h, :w] = a
        a = padded
    rows = a[0::4].astype(np.uint16)
    rows += a[1::4]
    rows += a[2::4]
    rows += a[3::4]
    sums = rows[:, 0::4] + rows[:, 1::4]
    sums += rows[:, 2::4]
    sums += rows[:, 3::4]  # <= 16 * 255, so 2 * sums + count fits uint16
    count = np.minimum(4, h - 4 * np.arange(bh))[:, None, None] * np.minimum(4, w - 4 * np.arange(bw))[None, :, None]
    count = count.astype(np.uint16)
    return ((2 * sums + count) // (2 * count)).astype(np.uint8)


def render_region(info: SlideInfo, location: tuple[int, int], size: tuple[int, int], level: int = 0) -> np.ndarray:
    """The pixels the file holds before compression, OpenSlide-style: `location` in level-0 px, `size` in level px.

    Level 0 is defined everywhere; other levels only inside the level and at locations on the level's pixel grid.
    """
    x, y = location
    w, h = size
    scene = scene_of(info)
    check("level", 0 <= level < len(info.level_dimensions), f"0..{len(info.level_dimensions) - 1}", level)
    check("size", w >= 1 and h >= 1, "positive (w, h)", size)
    if level == 0:
        return scene.render(x, y, w, h)
    ds = 4**level
    lw, lh = info.level_dimensions[level]
    if x % ds or y % ds or x < 0 or y < 0 or x // ds + w > lw or y // ds + h > lh:
        raise ValueError(f"location/size: level {level} region must lie inside {lw}x{lh} at multiples of {ds}")
    return _render_level(scene, info.level_dimensions, level, x // ds, y // ds, w, h)


def _render_level(
    scene: Scene, dims: Sequence[tuple[int, int]], level: int, x: int, y: int, w: int, h: int
) -> np.ndarray:
    if level == 0:
        return scene.render(x, y, w, h)
    pw, ph = dims[level - 1]
    x0, y0 = 4 * x, 4 * y
    below = _render_level(scene, dims, level - 1, x0, y0, min(4 * w, pw - x0), min(4 * h, ph - y0))
    return area4(below)
