"""The format table: which files are slides, and which reader opens each. Read by `open_slide` and by the finder,
so a new format is one row here (and a backend, if neither reader knows it).

tifffile reads what it maps to a plain pyramid (SVS, generic and single-level TIFF, OME-TIFF, NDPI): faster than
OpenSlide and pixel-exact. OpenSlide reads the rest: MRXS, Leica SCN, Ventana BIF, VMS/VMU, Philips TIFF and DICOM WSI,
whose slide is a folder of `.dcm` instances (a path may name either the folder or one instance).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tifffile

from .base import SlideError
from .openslide_backend import openslide_format

__all__ = [
    "FORMATS",
    "SLIDE_EXTENSIONS",
    "Reader",
    "SlideFormat",
    "dicom_instance",
    "is_dicom_folder",
    "is_instance",
    "reader_for",
    "slide_format",
]

Reader = Literal["tifffile", "openslide"]
_OPENSLIDE_TIFFS = ("philips", "scn", "bif")  # TIFF dialects whose levels live in vendor metadata


def _mrxs_data(path: Path) -> None:
    """MRXS keeps its pixels in a folder named like the file; without it OpenSlide's error does not say so."""
    data = path.with_suffix("")
    if not (data / "Slidedat.ini").is_file():
        raise SlideError(
            f"{path}: an MRXS slide needs its data folder beside it ({data}/ with Slidedat.ini and Data*.dat); "
            "copy the folder with the .mrxs file"
        )


@dataclass(frozen=True)
class SlideFormat:
    """One slide format: its file extensions (lower case), the reader that opens it, whether a slide is a folder of
    such files (DICOM WSI), and a check run before opening that names what a reader's own error would not."""

    name: str
    extensions: tuple[str, ...]
    reader: Reader
    folder: bool = False
    check: Callable[[Path], None] | None = None


# In the order a finder tries `<root>/<id>.<ext>`: the first extension that exists wins there.
FORMATS = (
    SlideFormat("Aperio SVS", (".svs",), "tifffile"),
    SlideFormat(
        "TIFF (Philips, Leica and Ventana dialects are sniffed and go to OpenSlide)", (".tif", ".tiff"), "tifffile"
    ),
    SlideFormat("OME-TIFF", (".ome.tif", ".ome.tiff"), "tifffile"),
    SlideFormat("Hamamatsu NDPI", (".ndpi",), "tifffile"),
    SlideFormat("3DHISTECH MIRAX", (".mrxs",), "openslide", check=_mrxs_data),
    SlideFormat("Leica SCN", (".scn",), "openslide"),
    SlideFormat("Ventana BIF", (".bif",), "openslide"),
    SlideFormat("Hamamatsu VMS/VMU", (".vms", ".vmu"), "openslide"),
    SlideFormat("DICOM WSI", (".dcm",), "openslide", folder=True),
)
SLIDE_EXTENSIONS = tuple(ext for fmt in FORMATS for ext in fmt.extensions)
_DICOM = next(fmt for fmt in FORMATS if fmt.folder)


def slide_format(name: str) -> SlideFormat | None:
    """The format of a file name by its longest matching extension, in any letter case; None: not a slide's."""
    name = name.lower()
    matches = [(len(ext), fmt) for fmt in FORMATS for ext in fmt.extensions if name.endswith(ext)]
    return max(matches, key=lambda m: m[0])[1] if matches else None


def is_instance(name: str) -> bool:
    """Whether a file name is one file of a folder-slide (a DICOM instance), never a slide of its own."""
    fmt = slide_format(name)
    return fmt is not None and fmt.folder


def is_dicom_folder(path: Path) -> bool:
    """Whether `path` is a folder holding DICOM instances: a DICOM WSI."""
    if not path.is_dir():
        return False
    with os.scandir(path) as entries:
        return any(is_instance(e.name) and e.is_file() for e in entries)


def dicom_instance(folder: Path) -> Path:
    """The file OpenSlide opens for a DICOM WSI series folder: its first `.dcm` (OpenSlide finds the others)."""
    instances = sorted(p for p in folder.iterdir() if is_instance(p.name) and p.is_file())
    if not instances:
        raise SlideError(f"{folder}: a folder is read as a DICOM WSI series, but it holds no .dcm files")
    return instances[0]


def reader_for(path: Path) -> Reader:
    """The reader for a slide file (a DICOM folder is OpenSlide's). A TIFF is sniffed for vendor dialects; a file
    tifffile cannot parse goes to OpenSlide if it detects a format, else to tifffile, whose error says why not."""
    if path.is_dir():
        return _DICOM.reader
    fmt = slide_format(path.name)
    if fmt is not None and fmt.check is not None:
        fmt.check(path)
    if fmt is not None and fmt.reader == "openslide":
        return "openslide"
    try:
        with tifffile.TiffFile(path) as tif:
            return "openslide" if any(getattr(tif, f"is_{name}", False) for name in _OPENSLIDE_TIFFS) else "tifffile"
    except Exception:  # not a TIFF tifffile reads
        return "openslide" if openslide_format(path) else "tifffile"
