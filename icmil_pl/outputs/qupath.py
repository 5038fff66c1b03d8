"""Per-slide GeoJSON that QuPath imports (File > Import objects from file) as locked tiles with measurements,
coloured in Measure > Show measurement maps; the layout WSInfer writes.

One `tile` feature per patch: its square in level-0 pixels, `measurements` = `attention` (where the model has one)
and `prob_<class>` (the bag head on that patch alone), `classification` = the patch's most probable class. Then the
tiled tissue's outline as one `annotation`, and the tumour ground truth as another where the cohort knows it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from data_modules.io import atomic_path
from data_modules.slides.outlines import cells_outline

from .patch_scores import PatchScores
from .plots import TRUTH_RGB

__all__ = ["QUPATH_DIR", "class_colour", "slide_geojson", "write_geojson"]

QUPATH_DIR = "qupath"  # <predict dir>/qupath/<slide>.geojson
_PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def class_colour(index: int) -> list[int]:
    """The colour of class `index` in QuPath and the viewer (index 0 blue, 1 red, as the heatmaps' low and high)."""
    return list(_PALETTE[index % len(_PALETTE)])


def slide_geojson(scores: PatchScores) -> dict:
    """The FeatureCollection of one slide (see the module docstring)."""
    side = float(scores.patch_side)
    measurements: dict[str, np.ndarray] = {}
    if scores.kind == "attention":
        measurements["attention"] = scores.scores
    if scores.probs is not None:
        prefix = "prob_" if scores.probabilities else ""
        measurements.update({f"{prefix}{c}": scores.probs[:, k] for k, c in enumerate(scores.classes)})
    best = scores.probs.argmax(1) if scores.probs is not None and scores.one_class else None
    columns = {name: values.astype(float).tolist() for name, values in measurements.items()}
    features = []
    for i, (x, y) in enumerate(np.asarray(scores.coords, dtype=np.int64).tolist()):
        properties: dict = {
            "objectType": "tile",
            "isLocked": True,
            "measurements": {name: values[i] for name, values in columns.items()},
        }
        if best is not None:
            k = int(best[i])
            properties["classification"] = {"name": scores.classes[k], "color": class_colour(k)}
        ring = [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
        features.append(
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": properties}
        )
    for name, geometry, colour in (
        ("tiled tissue", cells_outline(scores.coords, side), [0, 0, 0]),
        ("tumour (ground truth)", scores.truth, list(TRUTH_RGB)),
    ):
        if geometry is not None:
            properties = {"objectType": "annotation", "name": name, "isLocked": True}
            properties["classification"] = {"name": name, "color": colour}
            features.append({"type": "Feature", "geometry": geometry, "properties": properties})
    return {"type": "FeatureCollection", "features": features}


def write_geojson(folder: str | os.PathLike, scores: PatchScores) -> Path:
    """`<folder>/qupath/<slide>.geojson`, written whole or not at all."""
    path = Path(folder) / QUPATH_DIR / f"{scores.name}.geojson"
    with atomic_path(path) as tmp, tmp.open("w") as fh:
        json.dump(slide_geojson(scores), fh, separators=(",", ":"))
    return path
