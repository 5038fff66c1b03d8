"""Per-slide GeoJSON that QuPath imports (File > Import objects from file) as locked tiles with measurements,
coloured in Measure > Show measurement maps; the layout WSInfer writes.

One `tile` feature per patch: its square in level-0 pixels, `measurements` = `attention` (where the model has one)
and `prob_<class>` (the bag head on that patch alone), `classification` = the patch's most probable class. Then the
tiled tissue's outline as one `annotation`, and the tumour ground truth as another where the cohort knows it: each
with a `name` and a colour, not a classification, so that importing them adds no classes to a QuPath project.

Every feature has a stable `id`, a UUID derived from the run's output folder, the slide and the patch index (or the
annotation's name): importing a slide's predictions again updates its objects instead of adding copies.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np

from data_modules.io import atomic_path
from data_modules.slides.outlines import cells_outline

from .patch_scores import PatchScores
from .plots import TRUTH_RGB

__all__ = ["QUPATH_DIR", "class_colour", "feature_id", "slide_geojson", "write_geojson"]

QUPATH_DIR = "qupath"  # <predict dir>/qupath/<slide>.geojson
_IDS = uuid.UUID("6f1c2d4e-8a3b-4c5d-9e7f-0a1b2c3d4e5f")  # the namespace of the features' ids
_PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def class_colour(index: int) -> list[int]:
    """The colour of class `index` in QuPath and the viewer (index 0 blue, 1 red, as the heatmaps' low and high)."""
    return list(_PALETTE[index % len(_PALETTE)])


def feature_id(run: str, slide_id: str, part: int | str) -> str:
    """The stable id of a slide's patch (`part` its index) or annotation (`part` its name) in `run`'s export."""
    return str(uuid.uuid5(_IDS, json.dumps([run, slide_id, part])))


def slide_geojson(scores: PatchScores, run: str = "") -> dict:
    """The FeatureCollection of one slide (see the module docstring); `run` names the export its ids belong to."""
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
        geometry = {"type": "Polygon", "coordinates": [ring]}
        identity = feature_id(run, scores.slide_id, i)
        features.append({"type": "Feature", "id": identity, "geometry": geometry, "properties": properties})
    for name, geometry, colour in (
        ("tiled tissue", cells_outline(scores.coords, side), [0, 0, 0]),
        ("tumour (ground truth)", scores.truth, list(TRUTH_RGB)),
    ):
        if geometry is not None:
            properties = {"objectType": "annotation", "name": name, "color": colour, "isLocked": True}
            identity = feature_id(run, scores.slide_id, name)
            features.append({"type": "Feature", "id": identity, "geometry": geometry, "properties": properties})
    return {"type": "FeatureCollection", "features": features}


def write_geojson(folder: str | os.PathLike, scores: PatchScores) -> Path:
    """`<folder>/qupath/<slide>.geojson`, written whole or not at all; its ids belong to `folder` (the run's predict
    or test folder), so a rerun into it gives the same ids."""
    path = Path(folder) / QUPATH_DIR / f"{scores.name}.geojson"
    with atomic_path(path) as tmp, tmp.open("w") as fh:
        json.dump(slide_geojson(scores, str(Path(folder).resolve())), fh, separators=(",", ":"))
    return path
