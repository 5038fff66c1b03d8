"""A labelled slide cohort on disk: the labels CSV, its classes, and a slide folder -> slide files and patch grids."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from .slides import SlideError, open_slide
from .splits import SPLITS
from .targets import Targets, class_index
from .tiling import SlidePatches, TilingConfig, patch_grid

__all__ = [
    "COLUMNS",
    "OnSlideError",
    "SLIDE_EXTENSIONS",
    "SlideCohort",
    "SlideLabel",
    "class_index",
    "find_slide",
    "name_classes",
    "read_labels",
    "require_labels",
]

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ome.tif", ".ome.tiff", ".ndpi")
# What a slide that cannot be read does to a run: stop it, naming the slide (level and tile where a tile is broken),
# or leave the slide out, recorded and printed at the end.
OnSlideError = Literal["raise", "skip"]


COLUMNS = ("slide_id", "label", "patient_id", "split", "mpp")


@dataclass(frozen=True)
class SlideLabel:
    slide_id: str
    label: str | None  # the `label` cell; None: unknown (new slides to predict) or a task without that column
    patient_id: str
    split: str | None = None
    mpp: float | None = None  # level-0 microns per pixel of this slide's file, when its metadata lacks or misstates it
    target: tuple[float, ...] | None = None  # the task's number columns (`Targets.parse`); None: unknown or none
    stratum: str | None = None  # what splits stratify by (`Targets.strata`); None: unlabelled
    line: int = 0  # the CSV line, for errors

    @property
    def labelled(self) -> bool:
        return self.label is not None or self.target is not None


def read_labels(path: str | os.PathLike, targets: Targets | None = None) -> list[SlideLabel]:
    """Rows of a `slide_id[,label][,patient_id][,split][,mpp]` CSV, plus the columns of `targets` (default:
    classification by `label`; see `data_modules.targets`); a missing patient id means one patient per slide.

    Header names and cells are stripped and a UTF-8 byte-order mark is accepted (spreadsheets write both); an unknown
    column is refused, since a misspelt `patient_id` would silently put one patient's slides in several splits.
    Labels may be missing (no column, or empty cells) for slides that are only predicted; `require_labels` says where
    they are needed."""
    targets = targets or Targets()
    columns = (*COLUMNS, *targets.allowed_columns)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: labels CSV not found")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [name.strip() for name in next(reader, [])]
        if "slide_id" not in header:
            raise ValueError(f"{path}: missing column 'slide_id'; expected columns {', '.join(columns)}")
        unknown = [name for name in header if name not in columns]
        if unknown or len(set(header)) < len(header):
            what = f"unknown column {unknown[0]!r}" if unknown else "a repeated column"
            raise ValueError(f"{path}: {what}; the columns are {', '.join(columns)} (slide_id required)")
        absent = [name for name in targets.target_columns if name not in header]
        if absent:
            raise ValueError(f"{path}: missing column {absent[0]!r}, which {targets.task} targets read")
        rows = []
        for line, cells in enumerate(reader, start=2):
            if len(cells) > len(header):
                raise ValueError(f"{path}:{line}: {len(cells)} cells, but the header names {len(header)} columns")
            if any(cell.strip() for cell in cells):  # blank lines are skipped
                rows.append(_row(path, line, dict(zip(header, cells, strict=False)), targets))
    if not rows:
        raise ValueError(f"{path}: no slides listed")
    seen: set[str] = set()
    for row in rows:
        if row.slide_id in seen:
            raise ValueError(f"{path}: duplicate slide_id {row.slide_id!r}")
        seen.add(row.slide_id)
    targets.names(rows, path)  # a multilabel cell naming an unknown label fails here
    return [replace(row, stratum=s) for row, s in zip(rows, targets.strata(rows), strict=True)]


def _row(path: Path, line: int, cells: dict[str, str], targets: Targets) -> SlideLabel:
    value = {name: (cells.get(name) or "").strip() or None for name in (*COLUMNS, *targets.target_columns)}
    if value["slide_id"] is None:
        raise ValueError(f"{path}:{line}: empty slide_id")
    if value["split"] is not None and value["split"] not in SPLITS:
        raise ValueError(f"{path}:{line}: split {value['split']!r} is not one of {list(SPLITS)}")
    mpp = None
    if value["mpp"] is not None:
        try:
            mpp = float(value["mpp"])
        except ValueError:
            mpp = -1.0
        if not 0 < mpp < 100:
            raise ValueError(f"{path}:{line}: mpp {value['mpp']!r} is not microns per pixel (a number in (0, 100))")
    patient = value["patient_id"] or value["slide_id"]
    label = value["label"] if targets.uses_label_column else None
    target = targets.parse(path, line, value)
    return SlideLabel(value["slide_id"], label, patient, value["split"], mpp, target, line=line)


def require_labels(rows: Sequence[SlideLabel], path: str | os.PathLike, purpose: str) -> None:
    """A clear error when a slide has no label but `purpose` (training, testing) needs one."""
    unlabelled = [row.slide_id for row in rows if not row.labelled]
    if unlabelled:
        more = f" and {len(unlabelled) - 1} more" if len(unlabelled) > 1 else ""
        raise ValueError(
            f"{path}: slide {unlabelled[0]!r}{more} has no label, which {purpose} needs "
            "(only predict runs on unlabelled slides)"
        )


def name_classes(names: dict[str, str] | Sequence[str] | None, classes: Sequence[str]) -> list[str]:
    """Display names in class-index order. `names` maps label values to names (`{"0": normal, "1": tumour}`), or lists
    them in the order of the sorted label values `classes`; a list that names a label value at another position than
    that value's class is refused, since it would call normal slides tumour without a word."""
    classes = list(classes)
    if names is None:
        return classes
    if isinstance(names, dict):
        names = {str(k): str(v) for k, v in names.items()}
        if set(names) != set(classes):
            raise ValueError(f"class_names: expected a name for each label value {classes}, got keys {sorted(names)}")
        return [names[c] for c in classes]
    names = [str(n) for n in names]
    if len(names) != len(classes):
        raise ValueError(f"class_names: expected {len(classes)} names, one per label value {classes}, got {names}")
    for i, name in enumerate(names):
        if name in classes and classes.index(name) != i:
            raise ValueError(
                f"class_names: {name!r} is at position {i}, but label {name!r} is class {classes.index(name)} (classes "
                f"are the sorted label values {classes}); list them in that order or give {{label value: name}}"
            )
    return names


def find_slide(slides_dir: str | os.PathLike, slide_id: str) -> Path | None:
    """`<slides_dir>/<slide_id>.<ext>` for the first slide extension that exists, in any letter case (scanners write
    `.SVS` and `.TIF` too), else None."""
    candidates = [Path(slides_dir) / f"{slide_id}{ext}" for ext in SLIDE_EXTENSIONS]
    for path in candidates:
        if path.is_file():
            return path
    folder = candidates[0].parent
    if not folder.is_dir():
        return None
    rank = {path.name.lower(): k for k, path in enumerate(candidates)}
    found = sorted((rank[e.name.lower()], e.name) for e in os.scandir(folder) if e.name.lower() in rank and e.is_file())
    return folder / found[0][1] if found else None


class SlideCohort:
    """Slide files of a labels CSV (`slide_id,label[,patient_id][,split]`, or the columns of `targets`), each found
    as `<slides>/<id>.<ext>`."""

    def __init__(self, labels: str | os.PathLike, slides: str | os.PathLike, targets: Targets | None = None) -> None:
        self.labels_path, self.slides_dir = Path(labels), Path(slides)
        self.targets = targets or Targets()
        self.rows: list[SlideLabel] = read_labels(self.labels_path, self.targets)
        self.paths = {row.slide_id: self._find(row.slide_id) for row in self.rows}
        self._csv_mpp = {row.slide_id: row.mpp for row in self.rows}

    def encoded_targets(self) -> dict[str, torch.Tensor]:
        """Slide id -> its target tensor (`Targets.encode`), for the labelled slides."""
        names = self.targets.names(self.rows, self.labels_path)
        encoded = {row.slide_id: self.targets.encode(row, names) for row in self.rows}
        return {k: v for k, v in encoded.items() if v is not None}

    def _find(self, slide_id: str) -> Path:
        path = find_slide(self.slides_dir, slide_id)
        if path is None:
            raise ValueError(
                f"{self.labels_path}: slide {slide_id!r} has no file in {self.slides_dir} "
                f"(looked for {slide_id}{{{','.join(SLIDE_EXTENSIONS)}}})"
            )
        return path

    def patches(
        self, tiling: TilingConfig, cache_dir: str | os.PathLike, skipped: dict[str, str] | None = None
    ) -> list[SlidePatches]:
        """Patch grids of every slide, computed once and cached in `cache_dir`. With `skipped` (the per-slide error
        policy `skip`), a slide that cannot be tiled (unreadable, no tissue) is left out and its error recorded there
        instead of stopping the cohort."""
        out = []
        for row in tqdm(self.rows, desc="tiling", unit="slide", leave=False):
            slide_id = row.slide_id
            try:
                override = self.mpp_override(slide_id, tiling)
                grid = patch_grid(
                    self.paths[slide_id],
                    mpp=tiling.mpp,
                    patch_size=tiling.patch_size,
                    tissue_threshold=tiling.tissue_threshold,
                    tissue=tiling.tissue,
                    mpp_override=override,
                    cache_dir=cache_dir,
                )
            except SlideError as error:
                if skipped is None:
                    raise
                skipped[slide_id] = str(error)
                continue
            out.append(SlidePatches(slide_id, self.paths[slide_id], grid, override))
        return out

    def mpp_override(self, slide_id: str, tiling: TilingConfig) -> float | None:
        """The level-0 microns per pixel to read a slide at instead of its file's (None: the file's own): the CSV's
        `mpp` cell, else `tiling.mpp_override` where the file has no resolution metadata or `force_mpp` is set."""
        if self._csv_mpp[slide_id] is not None:
            return self._csv_mpp[slide_id]
        if tiling.mpp_override is None or tiling.force_mpp:
            return tiling.mpp_override
        with open_slide(self.paths[slide_id]) as slide:
            return tiling.mpp_override if slide.mpp is None else None
