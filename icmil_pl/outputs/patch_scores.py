"""`scores.zarr`: every predicted slide's patches with their scores, the one store the figures, the QuPath export,
the report and the viewer read. Nothing else knows its layout.

    scores.zarr/<safe_name(slide_id)>/coords   (N, 2) int64, level-0 top-left corners
    scores.zarr/<safe_name(slide_id)>/scores   (N,) float32, attention (or, without attention, the patch's
                                               positive-class probability on its own)
    scores.zarr/<safe_name(slide_id)>/probs    (N, C) float32, the bag head applied to each patch on its own: class
                                               or label probabilities, or the task's per-patch outputs (`classes`
                                               then names those: `risk`, `predicted_<target>`)
    attributes: slide_id, kind, task, classes, label, predicted (as predictions.csv writes them), slide_probs (the
                slide's outputs), patch_side (level-0 pixels), slide_path, dimensions (level 0), truth (a GeoJSON
                geometry in level-0 pixels where the cohort knows its tumour)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from data_modules.io import safe_name

from ..tasks import TASKS

__all__ = ["SCORES_STORE", "PatchScores", "read_scores", "scored_slides", "write_scores"]

SCORES_STORE = "scores.zarr"


@dataclass(frozen=True)
class PatchScores:
    """One predicted slide: its patches, their scores and the slide-level call."""

    slide_id: str
    coords: np.ndarray  # (N, 2) int64
    scores: np.ndarray  # (N,) float32
    kind: str  # what `scores` are: "attention" or "patch probability"
    probs: np.ndarray | None  # (N, C) float32 per-patch class probabilities, None where the model cannot give them
    classes: list[str]
    label: str | None  # the true class name, None when unknown
    predicted: str
    slide_probs: list[float]
    patch_side: float  # level-0 pixels per patch side
    slide_path: str | None = None  # the slide file it was cut from, where known
    dimensions: tuple[int, int] | None = None  # level-0 (width, height)
    truth: dict | None = None  # GeoJSON geometry of the ground truth (`data_modules.annotations`), where known
    task: str = "classification"  # the model's task kind: whether `probs` are probabilities of `classes`

    @property
    def probabilities(self) -> bool:
        """Whether `probs` are per-class (or per-label) probabilities rather than a value or a risk."""
        return TASKS[self.task].probabilities is not None

    @property
    def one_class(self) -> bool:
        """Whether a patch's call is its most probable class (`probs` a softmax over `classes`)."""
        return TASKS[self.task].probabilities == "softmax"

    @property
    def name(self) -> str:
        """The slide's file and group name in every output (ids come from users' CSVs: never a path)."""
        return safe_name(self.slide_id)


def write_scores(root: str | os.PathLike, scores: PatchScores) -> None:
    """Write (or replace) one slide's group in `<root>/scores.zarr`."""
    group = zarr.open_group(str(Path(root) / SCORES_STORE), mode="a").require_group(scores.name)
    group.create_array("coords", data=np.asarray(scores.coords, np.int64).reshape(-1, 2), overwrite=True)
    group.create_array("scores", data=np.asarray(scores.scores, np.float32).reshape(-1), overwrite=True)
    if scores.probs is not None:
        group.create_array("probs", data=np.asarray(scores.probs, np.float32), overwrite=True)
    elif "probs" in group:
        del group["probs"]
    group.attrs.update(
        {
            "slide_id": scores.slide_id,
            "kind": scores.kind,
            "task": scores.task,
            "classes": list(scores.classes),
            "label": scores.label,
            "predicted": scores.predicted,
            "slide_probs": [float(p) for p in scores.slide_probs],
            "patch_side": float(scores.patch_side),
            "slide_path": scores.slide_path,
            "dimensions": None if scores.dimensions is None else [int(v) for v in scores.dimensions],
            "truth": scores.truth,
        }
    )


def read_scores(root: str | os.PathLike, name: str) -> PatchScores:
    """The slide stored under `name` (its safe name) in `<root>/scores.zarr`."""
    group = zarr.open_group(str(Path(root) / SCORES_STORE), mode="r")[name]
    attrs = dict(group.attrs)
    if "classes" not in attrs:
        raise ValueError(
            f"{Path(root) / SCORES_STORE}/{name}: written by an older icmil-pl (no classes recorded); rerun predict"
        )
    dimensions = attrs.get("dimensions")
    return PatchScores(
        slide_id=attrs["slide_id"],
        coords=group["coords"][:],
        scores=group["scores"][:],
        kind=attrs["kind"],
        probs=group["probs"][:] if "probs" in group else None,
        classes=list(attrs["classes"]),
        label=attrs.get("label"),
        predicted=attrs["predicted"],
        slide_probs=list(attrs["slide_probs"]),
        patch_side=float(attrs["patch_side"]),
        slide_path=attrs.get("slide_path"),
        dimensions=None if dimensions is None else (int(dimensions[0]), int(dimensions[1])),
        truth=attrs.get("truth"),
        task=attrs.get("task", "classification"),
    )


def scored_slides(root: str | os.PathLike) -> Iterator[str]:
    """The safe names of every slide in `<root>/scores.zarr` (nested ids included), sorted."""
    store = Path(root) / SCORES_STORE
    if not store.is_dir():
        return iter(())
    found = []

    def walk(group, prefix: str) -> None:
        for key, child in group.members():
            path = f"{prefix}{key}"
            if isinstance(child, zarr.Group):
                if "coords" in child:
                    found.append(path)
                else:
                    walk(child, f"{path}/")

    walk(zarr.open_group(str(store), mode="r"), "")
    return iter(sorted(found))
