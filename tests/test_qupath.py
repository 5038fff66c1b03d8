"""The QuPath export and the outlines it draws: tiles with their measurements, the tiled tissue with its holes, the
ground truth of the slide."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import shapely
from shapely.geometry import shape

from data_modules.io import safe_name
from data_modules.slides.outlines import cells_outline, mask_outline
from icmil_pl.outputs.patch_scores import PatchScores, read_scores, scored_slides, write_scores
from icmil_pl.outputs.qupath import slide_geojson, write_geojson


def _ring_of_patches(side: int = 100) -> np.ndarray:
    """A 3 x 3 block of patches without its centre, plus one patch apart: two parts, one with a hole."""
    block = [(i * side, j * side) for i in range(3) for j in range(3) if (i, j) != (1, 1)]
    return np.asarray(block + [(600, 600)], np.int64)


def _scores(kind: str = "attention", truth: dict | None = None) -> PatchScores:
    coords = _ring_of_patches()
    probs = np.linspace(0.05, 0.95, len(coords), dtype=np.float32)
    return PatchScores(
        slide_id="../odd id",
        coords=coords,
        scores=np.arange(1, len(coords) + 1, dtype=np.float32) / 45,
        kind=kind,
        probs=np.stack([1 - probs, probs], 1),
        classes=["normal", "tumour"],
        label=None,
        predicted="tumour",
        slide_probs=[0.3, 0.7],
        patch_side=100.0,
        dimensions=(800, 800),
        truth=truth,
    )


def test_outline_of_cells_is_their_union_with_holes_and_no_grid_vertices():
    outline = shape(cells_outline(_ring_of_patches(), 100))
    assert outline.geom_type == "MultiPolygon" and outline.area == 9 * 100 * 100
    ring = max(outline.geoms, key=lambda g: g.area)
    assert len(ring.interiors) == 1 and shapely.Polygon(ring.interiors[0]).area == 100 * 100
    assert len(ring.exterior.coords) == 5  # a square: the grid's intermediate corners are gone
    assert cells_outline(np.zeros((0, 2)), 100) is None
    mask = np.zeros((4, 6), bool)
    mask[1:3, 2:5] = True
    assert shape(mask_outline(mask, 8)).bounds == (16.0, 8.0, 40.0, 24.0)


def test_geojson_tiles_carry_the_stored_scores_and_the_annotations(tmp_path):
    truth = {"type": "Polygon", "coordinates": [[[0, 0], [50, 0], [50, 50], [0, 50], [0, 0]]]}
    write_scores(tmp_path, _scores(truth=truth))
    stored = read_scores(tmp_path, next(scored_slides(tmp_path)))
    path = write_geojson(tmp_path, stored)
    assert path == tmp_path / "qupath" / f"{safe_name('../odd id')}.geojson"  # never a path out of the folder
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    features = json.loads(path.read_text())["features"]
    tiles = [f for f in features if f["properties"]["objectType"] == "tile"]
    assert len(tiles) == len(stored.coords)
    for tile, (x, y), attention, probs in zip(tiles, stored.coords, stored.scores, stored.probs, strict=True):
        assert shape(tile["geometry"]).bounds == (x, y, x + 100, y + 100)
        m = tile["properties"]["measurements"]
        assert (m["attention"], m["prob_normal"], m["prob_tumour"]) == pytest.approx((attention, *probs), rel=1e-6)
        assert tile["properties"]["classification"]["name"] == ("tumour" if probs[1] > 0.5 else "normal")
    annotations = [f["properties"] for f in features if f["properties"]["objectType"] == "annotation"]
    assert [a["name"] for a in annotations] == ["tiled tissue", "tumour (ground truth)"]
    assert all("classification" not in a and len(a["color"]) == 3 for a in annotations)  # no classes added to QuPath
    assert shape(features[-1]["geometry"]).equals(shape(truth))


def test_every_feature_has_an_id_that_a_rerun_keeps_and_another_run_changes(tmp_path):
    """QuPath updates objects of the same id on import: a rerun into one folder must not duplicate a slide's tiles."""
    scores = _scores(truth={"type": "Polygon", "coordinates": [[[0, 0], [5, 0], [5, 5], [0, 0]]]})
    first = json.loads(write_geojson(tmp_path / "run", scores).read_text())["features"]
    again = json.loads(write_geojson(tmp_path / "run", scores).read_text())["features"]
    other = json.loads(write_geojson(tmp_path / "other", scores).read_text())["features"]
    ids = [f["id"] for f in first]
    assert len(set(ids)) == len(first) == len(scores.coords) + 2
    assert all(str(uuid.UUID(i)) == i for i in ids)
    assert ids == [f["id"] for f in again] and not set(ids) & {f["id"] for f in other}


def test_without_attention_tiles_carry_only_probabilities():
    features = slide_geojson(_scores(kind="patch probability"))["features"]
    assert set(features[0]["properties"]["measurements"]) == {"prob_normal", "prob_tumour"}
    assert [f["properties"]["name"] for f in features if f["properties"]["objectType"] == "annotation"] == [
        "tiled tissue"
    ]
