"""Slide id -> slide file, looked up once per cohort: a row's `path` cell, else a search of the slide folders that
knows the slide formats from the format table (`data_modules.slides.formats`)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..slides.formats import SLIDE_EXTENSIONS, is_dicom_folder, is_instance
from .labels import SlideLabel

__all__ = ["SlideFinder", "SlideFolders", "find_slide", "locate_slides", "slide_roots"]

# Where slides are: one folder, several, or none (every row of the labels CSV has a `path`).
SlideFolders = str | os.PathLike | Sequence[str | os.PathLike] | None
# Extensions of slides that are one file; a DICOM instance is one level of a slide that is the folder holding them
# (`path` cells may name either); the folder, never an instance, is what a search finds.
_FILE_EXTENSIONS = tuple(ext for ext in SLIDE_EXTENSIONS if not is_instance(f"x{ext}"))


def slide_roots(slides: SlideFolders) -> tuple[Path, ...]:
    """The folders of a `slides` setting (one folder or a list of them), `~` expanded."""
    if slides is None:
        return ()
    folders = [slides] if isinstance(slides, (str, os.PathLike)) else list(slides)
    return tuple(Path(folder).expanduser() for folder in folders)


class SlideFinder:
    """Slide files below root folders, by slide id.

    `<root>/<id>.<ext>` is tried first, costing a few stats and no search, so a flat folder behaves as it always did
    (the first extension of the format table wins there); otherwise the id names a file `<id>.<ext>` anywhere below
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
    for ext in _FILE_EXTENSIONS:
        if (root / f"{slide_id}{ext}").is_file():
            return root / f"{slide_id}{ext}"
    return root / slide_id if is_dicom_folder(root / slide_id) else None


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
        if any(is_instance(name) for name in files):  # a DICOM WSI: the folder is the slide
            dirs.clear()
            yield from ((key, here) for key in {here.name, relative.as_posix()} - {"", "."})
            continue
        for name in (name for name in files if not name.startswith(".")):
            for ext in _FILE_EXTENSIONS:
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
            return path.parent if is_instance(path.name) else path
        if not is_dicom_folder(path):
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
        files = ",".join(_FILE_EXTENSIONS)
        raise _NoFile(
            f"{where}: slide {row.slide_id!r} has no file in or below {folders} (looked for "
            f"{row.slide_id}{{{files}}} in any letter case, and a DICOM folder {row.slide_id}/)"
        )
    return path
