"""A labelled slide cohort on disk: the labels CSV read into rows, their class names, and the cohort's slide files
(found once, by `finder`) and patch grids."""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from ..io import id_key
from ..slides import SlideError, open_slide
from ..slides.tiling import SlidePatches, TilingConfig, patch_grid
from .finder import SlideFolders, locate_slides, slide_roots
from .labels import COLUMNS, SPLITS, SlideLabel, cell_number
from .targets import Targets

__all__ = ["OnSlideError", "SlideCohort", "name_classes", "read_labels", "require_labels"]

# What a slide that cannot be read does to a run: stop it, naming the slide (level and tile where a tile is broken),
# or leave the slide out, recorded and printed at the end.
OnSlideError = Literal["raise", "skip"]


def read_labels(path: str | os.PathLike, targets: Targets | None = None) -> list[SlideLabel]:
    """Rows of a `slide_id[,label][,patient_id][,split][,mpp][,path][,annotations]` CSV plus the columns of `targets`
    (default: a `label` class; see `data_modules.cohort.targets`); no patient id: one patient per slide. Header names
    and cells are stripped, a UTF-8 BOM is accepted, and so are semicolons or tabs between cells (a spreadsheet's
    export). Refused: an unknown column (a misspelt `patient_id` would split a patient), a patient id written two ways
    (`PATIENT_002`, `patient_002`). Unlabelled slides can only be predicted."""
    targets = targets or Targets()
    columns = (*COLUMNS, *targets.allowed_columns)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: labels CSV not found")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        delimiter = _delimiter(fh.readline())
        fh.seek(0)  # the decoder restarts: a BOM is skipped again
        reader = csv.reader(fh, delimiter=delimiter)
        header = [name.strip() for name in next(reader, [])]
        if "slide_id" not in header:
            raise ValueError(f"{path}: missing column 'slide_id'; expected columns {', '.join(columns)}")
        unknown = [name for name in header if name not in columns]
        if unknown or len(set(header)) < len(header):
            what = f"unknown column {unknown[0]!r}" if unknown else "a repeated column"
            raise ValueError(
                f"{path}: {what}; the columns are {', '.join(columns)} (slide_id required), and those the task reads; "
                "name other columns in targets.ignore"
            )
        if absent := [name for name in targets.target_columns if name not in header]:
            raise ValueError(f"{path}: missing column {absent[0]!r}, which {targets.task} targets read")
        slides, patients = {}, {}  # slide id -> row; `id_key` of a patient_id as written -> that spelling, its line
        for line, cells in enumerate(reader, start=2):
            if len(cells) > len(header):
                raise ValueError(f"{path}:{line}: {len(cells)} cells, but the header names {len(header)} columns")
            if not any(cell.strip() for cell in cells):
                continue  # a blank line
            row = _row(path, line, named := dict(zip(header, cells, strict=False)), targets)
            if slides.setdefault(row.slide_id, row) is not row:
                raise ValueError(f"{path}: duplicate slide_id {row.slide_id!r}")
            spelling = (named.get("patient_id") or "").strip()  # never the default: slide ids in two cases are 2 slides
            first, at = patients.setdefault(id_key(spelling), (spelling, line)) if spelling else (spelling, line)
            if first != spelling:
                two = f"{path}: patient_id {first!r} (line {at}) and {spelling!r} (line {line}) differ"
                raise ValueError(f"{two} in case or invisible characters: write one patient's id one way")
    if not slides:
        raise ValueError(f"{path}: no slides listed")
    rows = list(slides.values())
    targets.names(rows, path)  # a multilabel cell naming an unknown label fails here
    return [replace(row, stratum=s) for row, s in zip(rows, targets.strata(rows), strict=True)]


def _delimiter(header: str) -> str:
    """The header's separator: a comma, or the semicolon of a European spreadsheet's export, or a tab."""
    return next((d for d in ",;\t" if "slide_id" in (cell.strip() for cell in header.split(d))), ",")


def _row(path: Path, line: int, cells: dict[str, str], targets: Targets) -> SlideLabel:
    value = {name: (cells.get(name) or "").strip() or None for name in (*COLUMNS, *targets.target_columns)}
    if value["slide_id"] is None:
        raise ValueError(f"{path}:{line}: empty slide_id")
    if value["split"] is not None and value["split"] not in SPLITS:
        raise ValueError(f"{path}:{line}: split {value['split']!r} is not one of {list(SPLITS)}")
    mpp = None
    if value["mpp"] is not None:
        try:
            mpp = cell_number(value["mpp"])
        except ValueError:
            mpp = -1.0
        if not 0 < mpp < 100:
            raise ValueError(f"{path}:{line}: mpp {value['mpp']!r} is not microns per pixel (a number in (0, 100))")
    patient = value["patient_id"] or value["slide_id"]
    label = value["label"] if targets.uses_label_column else None
    target = targets.parse(path, line, value)
    return SlideLabel(
        value["slide_id"],
        label,
        patient,
        value["split"],
        mpp,
        value["path"],
        target,
        line=line,
        annotations=value["annotations"],
    )


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
    """Display names in class-index order, bound to the label values `classes` (sorted) explicitly: `names` maps label
    values to names (`{"0": normal, "1": tumour}`), or lists the label values themselves restyled (`[Normal, Tumour]`
    for normal/tumour, matched by `id_key`) in class order. Names bound by position alone are refused: a list that did
    not match the values called normal slides Tumour without a word."""
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
    index = {id_key(c): k for k, c in enumerate(classes)}
    for i, name in enumerate(names):
        k = index.get(id_key(name))
        if k is None:
            by_value = ", ".join(f"{c!r}: <name>" for c in classes)
            raise ValueError(
                f"class_names: {name!r} is not one of the label values {classes}; a list only restyles them, so bind "
                f"other names to the values they mean: {{{by_value}}}"
            )
        if k != i:
            raise ValueError(
                f"class_names: {name!r} is at position {i}, but label {classes[k]!r} is class {k} (classes are the "
                f"sorted label values {classes}); list them in that order or give {{label value: name}}"
            )
    return names


class SlideCohort:
    """Slide files of a labels CSV (`slide_id,label[,patient_id][,split][,mpp][,path]`, or the columns of `targets`):
    a row's `path` cell, else found below the `slides` folders (`locate_slides`)."""

    def __init__(self, labels: str | os.PathLike, slides: SlideFolders = None, targets: Targets | None = None) -> None:
        self.labels_path, self.roots = Path(labels), slide_roots(slides)
        self.targets = targets or Targets()
        self.rows: list[SlideLabel] = read_labels(self.labels_path, self.targets)
        self.paths = locate_slides(self.rows, self.labels_path, self.roots)
        self._csv_mpp = {row.slide_id: row.mpp for row in self.rows}

    def encoded_targets(self) -> dict[str, torch.Tensor]:
        """Slide id -> its target tensor (`Targets.encode`), for the labelled slides."""
        names = self.targets.names(self.rows, self.labels_path)
        encoded = {row.slide_id: self.targets.encode(row, names) for row in self.rows}
        return {k: v for k, v in encoded.items() if v is not None}

    def patches(
        self,
        tiling: TilingConfig,
        cache_dir: str | os.PathLike,
        skipped: dict[str, str] | None = None,
        patch_store: str | None = None,
    ) -> list[SlidePatches]:
        """Patch grids of every slide, computed once and cached in `cache_dir`. With `skipped` (the per-slide error
        policy `skip`), a slide that cannot be tiled (unreadable, no tissue) is left out and its error recorded there
        instead of stopping the cohort. `patch_store`: where readers keep the patches decoded (None: nowhere)."""
        out = []
        for row in tqdm(self.rows, desc="tiling", unit="slide", leave=False, disable=None):  # no bar in a log file
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
            out.append(SlidePatches(slide_id, self.paths[slide_id], grid, override, patch_store))
        return out

    def mpp_override(self, slide_id: str, tiling: TilingConfig) -> float | None:
        """The level-0 microns per pixel to read a slide at instead of its file's (None: the file's own): the CSV's
        `mpp` cell, else, where the file has no resolution metadata, its objective power (`tiling.mpp_from_objective`)
        or `tiling.mpp_override`; `force_mpp` applies the override to every slide."""
        if self._csv_mpp[slide_id] is not None:
            return self._csv_mpp[slide_id]
        if tiling.force_mpp or (tiling.mpp_override is None and not tiling.mpp_from_objective):
            return tiling.mpp_override
        path = self.paths[slide_id]
        with open_slide(path) as slide:
            if slide.mpp is not None:
                return None
            power = slide.objective_power
        if tiling.mpp_from_objective and power:
            warnings.warn(
                f"{path}: no mpp in its metadata; assuming {10 / power:g} um/px from its {power:g}x objective "
                "(tiling.mpp_from_objective: 20x = 0.5 um/px)",
                stacklevel=2,
            )
            return 10 / power
        return tiling.mpp_override
