"""Outlines of sets of square cells (a slide's tiled patches, a mask's pixels) as polygons in level-0 pixels: the
tissue and tumour outlines of the QuPath export and the viewer, one rule for both."""

from __future__ import annotations

import numpy as np
import shapely
from shapely.geometry import mapping

__all__ = ["cells_outline", "mask_outline"]


def cells_outline(corners: np.ndarray, side: float) -> dict | None:
    """The union of the squares with top-left `corners` (N, 2) and `side`, as a GeoJSON geometry (a Polygon or
    MultiPolygon, holes kept, straight edges without their intermediate grid vertices); None for no cells."""
    corners = np.asarray(corners, dtype=np.float64).reshape(-1, 2)
    if len(corners) == 0:
        return None
    boxes = shapely.box(corners[:, 0], corners[:, 1], corners[:, 0] + side, corners[:, 1] + side)
    union = shapely.simplify(shapely.union_all(boxes), 0)  # drops the collinear vertices of every grid step
    return _plain(mapping(union))


def mask_outline(mask: np.ndarray, downsample: float) -> dict | None:
    """The outline of a boolean mask whose pixel (row i, column j) covers level-0 [j, j + 1) x [i, i + 1) times
    `downsample`; None where the mask is empty."""
    rows, cols = np.nonzero(np.asarray(mask, bool))
    return cells_outline(np.stack([cols, rows], 1) * float(downsample), float(downsample))


def _plain(value):
    """Lists of floats instead of shapely's nested tuples: what JSON writers and zarr attributes keep as given."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return float(value) if isinstance(value, (int, float, np.floating, np.integer)) else value
