"""Outlines of sets of square cells (a slide's tiled patches, a mask's pixels) as polygons in level-0 pixels: the
tissue and tumour outlines of the QuPath export and the viewer, one rule for both."""

from __future__ import annotations

import numpy as np
import shapely
from shapely.geometry import mapping

__all__ = ["cells_outline", "mask_outline", "plain"]


def cells_outline(corners: np.ndarray, side: float) -> dict | None:
    """The union of the squares with top-left `corners` (N, 2) and `side`, as a GeoJSON geometry (a Polygon or
    MultiPolygon, holes kept, straight edges without their intermediate grid vertices); None for no cells."""
    corners = np.asarray(corners, dtype=np.float64).reshape(-1, 2)
    if len(corners) == 0:
        return None
    boxes = shapely.box(corners[:, 0], corners[:, 1], corners[:, 0] + side, corners[:, 1] + side)
    union = shapely.simplify(shapely.union_all(boxes), 0)  # drops the collinear vertices of every grid step
    return plain(mapping(union))


def mask_outline(mask: np.ndarray, downsample: float) -> dict | None:
    """The outline of a boolean mask whose pixel (row i, column j) covers level-0 [j, j + 1) x [i, i + 1) times
    `downsample`; None where the mask is empty. Each row's runs of pixels are one box: a union of thousands of boxes
    where pixels would be millions."""
    mask = np.asarray(mask, bool)
    edges = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)  # row-major, so each run's end pairs with its start
    if len(rows) == 0:
        return None
    ds = float(downsample)
    boxes = shapely.box(starts * ds, rows * ds, ends * ds, (rows + 1) * ds)
    return plain(mapping(shapely.simplify(shapely.union_all(boxes), 0)))


def plain(value):
    """Lists of floats instead of shapely's nested tuples: what JSON writers and zarr attributes keep as given."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return float(value) if isinstance(value, (int, float, np.floating, np.integer)) else value
