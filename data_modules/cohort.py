"""A labelled slide cohort on disk: the labels CSV, its classes, and slide folders -> slide files and patch grids."""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from .file_names import id_key
from .slides import SlideError, open_slide
from .splits import SPLITS
from .targets import Targets, class_index
from .tiling import SlidePatches, TilingConfig, patch_grid

__all__ = [
    "COLUMNS",
    "OnSlideError",
    "SLIDE_EXTENSIONS",
    "SlideCohort",
    "SlideFinder",
    "SlideFolders",
    "SlideLabel",
    "class_index",
    "find_slide",
    "locate_slides",
    "name_classes",
    "read_labels",
    "require_labels",
    "slide_roots",
]

# Read by tifffile, then the formats only OpenSlide reads. A `.dcm` file is one level of a DICOM WSI, whose slide is
# the folder holding them (`path` cells may name either); the folder, never an instance, is what a search finds.
SLIDE_EXTENSIONS = (
    ".svs",
    ".tif",
    ".tiff",
    ".ome.tif",
    ".ome.tiff",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".bif",
    ".vms",
    ".vmu",
    ".dcm",
)
_DICOM = ".dcm"
# Where slides are: one folder, several, or none (every row of the labels CSV has a `path`).
SlideFolders = str | os.PathLike | Sequence[str | os.PathLike] | None
# What a slide that cannot be read does to a run: stop it, naming the slide (level and tile where a tile is broken),
# or leave the slide out, recorded and printed at the end.
OnSlideError = Literal["raise", "skip"]


COLUMNS = ("slide_id", "label", "patient_id", "split", "mpp", "path")


@dataclass(frozen=True)
class SlideLabel:
    slide_id: str
    label: str | None  # the `label` cell; None: unknown (new slides to predict) or a task without that column
    patient_id: str
    split: str | None = None
    mpp: float | None = None  # level-0 microns per pixel of this slide's file, when its metadata lacks or misstates it
    path: str | None = None  # the `path` cell as written; `locate_slides` resolves it against the CSV's folder
    target: tuple[float, ...] | None = None  # the task's number columns (`Targets.parse`); None: unknown or none
    stratum: str | None = None  # what splits stratify by (`Targets.strata`); None: unlabelled
    line: int = 0  # the CSV line, for errors

    @property
    def labelled(self) -> bool:
        return self.label is not None or self.target is not None


def read_labels(path: str | os.PathLike, targets: Targets | None = None) -> list[SlideLabel]:
    """Rows of a `slide_id[,label][,patient_id][,split][,mpp][,path]` CSV plus the columns of `targets` (default: a
    `label` class; see `data_modules.targets`); no patient id: one patient per slide. Header names and cells are
    stripped, a UTF-8 BOM is accepted. Refused: an unknown column (a misspelt `patient_id` would split a patient), a
    patient id written two ways (`PATIENT_002`, `patient_002`). Unlabelled slides can only be predicted."""
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
    return SlideLabel(value["slide_id"], label, patient, value["split"], mpp, value["path"], target=target, line=line)


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


def slide_roots(slides: SlideFolders) -> tuple[Path, ...]:
    """The folders of a `slides` setting (one folder or a list of them), `~` expanded."""
    if slides is None:
        return ()
    folders = [slides] if isinstance(slides, (str, os.PathLike)) else list(slides)
    return tuple(Path(folder).expanduser() for folder in folders)


class SlideFinder:
    """Slide files below root folders, by slide id.

    `<root>/<id>.<ext>` is tried first, costing a few stats and no search, so a flat folder behaves as it always did
    (the first extension of `SLIDE_EXTENSIONS` wins there); otherwise the id names a file `<id>.<ext>` anywhere below
    a root, or the file `<root>/<id>.<ext>` where the id is a `sub/dir/id` path, in any letter case of the extension.
    A DICOM WSI is a folder `<id>` holding `.dcm` files. The search reads an index built on first need by one walk
    per root (cohorts hold thousands of slides); hidden files and folders are left out, linked folders followed once.
    """

    def __init__(self, slides: SlideFolders) -> None:
        self.roots = slide_roots(slides)
        self._index: dict[str, dict[Path, None]] | None = None

    def find(self, slide_id: str) -> Path | None:
        """The one file of `slide_id`, None if there is none; an id with several files is refused, naming them."""
        found = list(dict.fromkeys(p for p in (_direct(root, slide_id) for root in self.roots) if p is not None))
        if not found:
            if self._index is None:
                self._index = {}
                for root in self.roots:
                    for key, path in _slides_below(root):
                        self._index.setdefault(key, {})[path] = None
            found = list(self._index.get(slide_id, ()))
        if len(found) > 1:
            names = ", ".join(str(path) for path in sorted(found))
            raise ValueError(f"slide {slide_id!r} matches {len(found)} files ({names}); give its row a path cell")
        return found[0] if found else None


def _direct(root: Path, slide_id: str) -> Path | None:
    for ext in SLIDE_EXTENSIONS:
        if ext != _DICOM and (root / f"{slide_id}{ext}").is_file():
            return root / f"{slide_id}{ext}"
    return root / slide_id if _is_dicom_folder(root / slide_id) else None


def _is_dicom_folder(path: Path) -> bool:
    if not path.is_dir():
        return False
    with os.scandir(path) as entries:
        return any(e.name.lower().endswith(_DICOM) and e.is_file() for e in entries)


def _slides_below(root: Path) -> Iterator[tuple[str, Path]]:
    """(key, slide path) of every slide below `root`: keyed by its name without a slide extension and by its path
    from the root without one (a name with two, `a.ome.tif`, gives both `a` and `a.ome`)."""
    seen: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        here = Path(folder)
        try:
            stat = here.stat()
        except OSError:
            dirs.clear()
            continue
        if (stat.st_dev, stat.st_ino) in seen:  # a link back up the tree, or a folder reached twice
            dirs.clear()
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        relative = here.relative_to(root)
        if any(name.lower().endswith(_DICOM) for name in files):  # a DICOM WSI: the folder is the slide
            dirs.clear()
            yield from ((key, here) for key in {here.name, relative.as_posix()} - {"", "."})
            continue
        for name in (name for name in files if not name.startswith(".")):
            for ext in SLIDE_EXTENSIONS:
                if name.lower().endswith(ext):
                    stem = name[: -len(ext)]
                    yield from ((key, here / name) for key in {stem, (relative / stem).as_posix()})


def find_slide(slides: SlideFolders, slide_id: str) -> Path | None:
    """The file of one slide below `slides` (see `SlideFinder`, which finds many with one walk per root)."""
    return SlideFinder(slides).find(slide_id)


def locate_slides(
    rows: Sequence[SlideLabel], labels: str | os.PathLike, slides: SlideFolders, required: bool = True
) -> dict[str, Path]:
    """Slide id -> file of each row: its `path` cell (`~` expanded, relative to the CSV's folder; a `.dcm` file stands
    for its DICOM folder), else the file `SlideFinder` finds below the `slides` folders. One file is one slide: two
    rows naming one file are refused. With `required=False` (heatmaps of feature bags), a slide without a file is
    left out instead of refused."""
    labels, finder, paths, owner = Path(labels), SlideFinder(slides), {}, {}
    missing = [root for root in finder.roots if not root.is_dir()]
    if missing and required:
        raise ValueError(f"slides: {missing[0]} is not a folder")
    for row in rows:
        try:
            path = _slide_file(row, labels, finder)
        except _NoFile:
            if required:
                raise
            continue
        first = owner.setdefault(path.resolve(), row)
        if first is not row:
            raise ValueError(
                f"{labels}: slides {first.slide_id!r} (line {first.line}) and {row.slide_id!r} (line {row.line}) are "
                f"one file, {path}"
            )
        paths[row.slide_id] = path
    return paths


class _NoFile(ValueError):
    """A slide without a file: refused where the slides are read, left out where only heatmaps would use it."""


def _slide_file(row: SlideLabel, labels: Path, finder: SlideFinder) -> Path:
    where = f"{labels}:{row.line}"
    if row.path is not None:
        path = Path(row.path).expanduser()
        path = path if path.is_absolute() else labels.parent / path
        if not path.exists():
            raise _NoFile(f"{where}: column path: no file {path}")
        if path.is_file():
            return path.parent if path.name.lower().endswith(_DICOM) else path
        if not _is_dicom_folder(path):
            raise ValueError(f"{where}: column path: {path} is a folder without .dcm files (a DICOM WSI is one)")
        return path
    if not finder.roots:
        raise _NoFile(f"{where}: slide {row.slide_id!r} has no path cell, and no slides folder is given")
    try:
        path = finder.find(row.slide_id)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    if path is None:
        folders = ", ".join(str(root) for root in finder.roots)
        files = ",".join(ext for ext in SLIDE_EXTENSIONS if ext != _DICOM)
        raise _NoFile(
            f"{where}: slide {row.slide_id!r} has no file in or below {folders} (looked for "
            f"{row.slide_id}{{{files}}} in any letter case, and a DICOM folder {row.slide_id}/)"
        )
    return path


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
