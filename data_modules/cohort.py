"""A labelled slide cohort on disk: the labels CSV, its classes, and a slide folder -> slide files and patch grids."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .splits import SPLITS
from .tiling import SlidePatches, TilingConfig, patch_grid

__all__ = [
    "SLIDE_EXTENSIONS",
    "SlideCohort",
    "SlideLabel",
    "class_index",
    "find_slide",
    "read_labels",
    "require_labels",
]

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ome.tif", ".ome.tiff", ".ndpi")


@dataclass(frozen=True)
class SlideLabel:
    slide_id: str
    label: str | None  # None: unknown (new slides to predict)
    patient_id: str
    split: str | None = None


def read_labels(path: str | os.PathLike) -> list[SlideLabel]:
    """Rows of a `slide_id[,label][,patient_id][,split]` CSV; a missing patient id means one patient per slide.

    Labels may be missing (no column, or empty cells) for slides that are only predicted; `require_labels` says
    where they are needed."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: labels CSV not found")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if "slide_id" not in (reader.fieldnames or ()):
            raise ValueError(f"{path}: missing column 'slide_id'; expected slide_id[,label][,patient_id][,split]")
        rows = []
        for line, row in enumerate(reader, start=2):
            slide_id, label = (row["slide_id"] or "").strip(), (row.get("label") or "").strip() or None
            if not slide_id:
                raise ValueError(f"{path}:{line}: empty slide_id")
            split = (row.get("split") or "").strip() or None
            if split is not None and split not in SPLITS:
                raise ValueError(f"{path}:{line}: split {split!r} is not one of {list(SPLITS)}")
            patient = (row.get("patient_id") or "").strip() or slide_id
            rows.append(SlideLabel(slide_id, label, patient, split))
    if not rows:
        raise ValueError(f"{path}: no slides listed")
    seen: set[str] = set()
    for row in rows:
        if row.slide_id in seen:
            raise ValueError(f"{path}: duplicate slide_id {row.slide_id!r}")
        seen.add(row.slide_id)
    return rows


def require_labels(rows: Sequence[SlideLabel], path: str | os.PathLike, purpose: str) -> None:
    """A clear error when a slide has no label but `purpose` (training, testing) needs one."""
    unlabelled = [row.slide_id for row in rows if row.label is None]
    if unlabelled:
        more = f" and {len(unlabelled) - 1} more" if len(unlabelled) > 1 else ""
        raise ValueError(
            f"{path}: slide {unlabelled[0]!r}{more} has no label, which {purpose} needs "
            "(only predict runs on unlabelled slides)"
        )


def class_index(
    rows: Sequence[SlideLabel], path: str | os.PathLike, classes: Sequence[str] | None = None
) -> dict[str, int]:
    """Class name -> index: `classes` in their order, else the labels present, sorted. Every model and data module
    of a run indexes classes by this one rule, so index k means the same class in each phase."""
    names = list(classes) if classes else sorted({row.label for row in rows if row.label is not None})
    unknown = next((row for row in rows if row.label is not None and row.label not in names), None)
    if unknown is not None:
        raise ValueError(f"{path}: slide {unknown.slide_id!r} has label {unknown.label!r}, not one of classes {names}")
    return {name: i for i, name in enumerate(names)}


def find_slide(slides_dir: str | os.PathLike, slide_id: str) -> Path | None:
    """`<slides_dir>/<slide_id>.<ext>` for the first slide extension that exists, else None."""
    for ext in SLIDE_EXTENSIONS:
        path = Path(slides_dir) / f"{slide_id}{ext}"
        if path.is_file():
            return path
    return None


class SlideCohort:
    """Slide files of a labels CSV (`slide_id,label[,patient_id][,split]`), each found as `<slides>/<id>.<ext>`."""

    def __init__(self, labels: str | os.PathLike, slides: str | os.PathLike) -> None:
        self.labels_path, self.slides_dir = Path(labels), Path(slides)
        self.rows: list[SlideLabel] = read_labels(self.labels_path)
        self.paths = {row.slide_id: self._find(row.slide_id) for row in self.rows}

    def class_index(self) -> dict[str, int]:
        return class_index(self.rows, self.labels_path)

    def _find(self, slide_id: str) -> Path:
        path = find_slide(self.slides_dir, slide_id)
        if path is None:
            raise ValueError(
                f"{self.labels_path}: slide {slide_id!r} has no file in {self.slides_dir} "
                f"(looked for {slide_id}{{{','.join(SLIDE_EXTENSIONS)}}})"
            )
        return path

    def patches(
        self, tiling: TilingConfig, cache_dir: str | os.PathLike, slide_ids: list[str] | None = None
    ) -> list[SlidePatches]:
        """Patch grids of the given slides (all by default), computed once and cached in `cache_dir`."""
        ids = [row.slide_id for row in self.rows] if slide_ids is None else slide_ids
        out = []
        for slide_id in tqdm(ids, desc="tiling", unit="slide", leave=False):
            grid = patch_grid(
                self.paths[slide_id],
                mpp=tiling.mpp,
                patch_size=tiling.patch_size,
                tissue_threshold=tiling.tissue_threshold,
                tissue=tiling.tissue,
                mpp_override=tiling.mpp_override,
                cache_dir=cache_dir,
            )
            out.append(SlidePatches(slide_id, self.paths[slide_id], grid, tiling.mpp_override))
        return out
