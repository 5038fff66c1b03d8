"""Whole-slide images behind one OpenSlide-like `Slide` API: `open_slide` picks the reader.

tifffile reads what it maps to a plain pyramid (SVS, generic and single-level TIFF, OME-TIFF, NDPI): faster than
OpenSlide and pixel-exact (`tiff_slide`). OpenSlide reads the rest (`openslide_slide`): MRXS, Leica SCN, Ventana
BIF, VMS/VMU, Philips TIFF and DICOM WSI (a folder of `.dcm` instances, or any one of them).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile

from .openslide_slide import OpenSlideSlide, openslide_format
from .slide_base import BACKGROUND, Resample, Slide, SlideError
from .tiff_slide import TiffSlide

__all__ = ["BACKGROUND", "Backend", "Resample", "Slide", "SlideError", "dicom_instance", "file_signature", "open_slide"]

Backend = Literal["auto", "tifffile", "openslide"]
_OPENSLIDE_SUFFIXES = {".mrxs", ".vms", ".vmu", ".scn", ".bif", ".dcm"}
_OPENSLIDE_TIFFS = ("philips", "scn", "bif")  # TIFF dialects whose levels live in vendor metadata
_SAMPLE_BYTES = 1 << 20  # `file_signature` hashes this much of each end of a file
_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF, either byte order
_SAMPLES: dict[tuple, str] = {}  # `file_signature`'s memo: (path, each file's name and stat) -> sample


def open_slide(path: str | os.PathLike, mpp: float | None = None, backend: Backend = "auto") -> Slide:
    """Open a whole-slide image; `mpp` overrides the file's level-0 microns per pixel, `backend` forces a reader."""
    path = Path(path)
    if mpp is not None and not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise SlideError(f"{path}: mpp override must be a positive number of microns per pixel, got {mpp!r}")
    if path.is_dir():
        return OpenSlideSlide(path, mpp, source=dicom_instance(path))
    if not path.is_file():
        raise SlideError(f"{path}: no such file")
    if backend == "auto":
        backend = _backend(path)
    if backend == "tifffile":
        return TiffSlide(path, mpp)
    if path.suffix.lower() == ".mrxs":
        _check_mrxs(path)
    return OpenSlideSlide(path, mpp)


def dicom_instance(folder: Path) -> Path:
    """The file OpenSlide opens for a DICOM WSI series folder: its first `.dcm` (OpenSlide finds the others)."""
    instances = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".dcm" and p.is_file())
    if not instances:
        raise SlideError(f"{folder}: a folder is read as a DICOM WSI series, but it holds no .dcm files")
    return instances[0]


def file_signature(path: Path) -> tuple[int, int, str]:
    """(bytes, newest mtime in ns, content sample) of a slide: its file, or for a DICOM series folder all its `.dcm`
    instances, so caches keyed on it notice a rewritten level. The sample, a hash of each file's first and last MiB
    and of a TIFF's level-0 tile offsets and byte counts, notices a rewrite that kept the size and the mtime (`cp -p`,
    a converter restoring times). Memoised on each file's stat (inode, ctime): a repeated call costs a stat."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".dcm") if path.is_dir() else [path]
    stats = [file.stat() for file in files]
    stamp = (
        str(path),
        *((f.name, s.st_size, s.st_mtime_ns, s.st_ino, s.st_ctime_ns) for f, s in zip(files, stats, strict=True)),
    )
    if stamp not in _SAMPLES:
        digest = hashlib.blake2b(digest_size=8)
        for file in files:
            digest.update(file.name.encode())
            _sample(file, digest)
        _SAMPLES[stamp] = digest.hexdigest()
    return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0), _SAMPLES[stamp]


def _sample(file: Path, digest: hashlib.blake2b) -> None:
    """Hash `file`'s first and last MiB and, for a TIFF, page 0's tile (or strip) offsets and byte counts: a rewrite
    with other pixels re-encodes tiles, which moves the offsets even in the middle of a large file."""
    with file.open("rb") as fh:
        head = fh.read(_SAMPLE_BYTES)
        fh.seek(max(fh.seek(0, os.SEEK_END) - _SAMPLE_BYTES, len(head)))
        digest.update(head)
        digest.update(fh.read())
    if head[:4] not in _TIFF_MAGIC:
        return
    try:  # opening reads the first IFD only
        with tifffile.TiffFile(file) as tif:
            page = tif.pages[0]
            digest.update(np.asarray([page.dataoffsets, page.databytecounts], np.int64).tobytes())
    except Exception:  # a TIFF tifffile cannot parse: open_slide says why; its head and tail are sampled
        return


def _backend(path: Path) -> Literal["tifffile", "openslide"]:
    if path.suffix.lower() in _OPENSLIDE_SUFFIXES:
        return "openslide"
    try:
        with tifffile.TiffFile(path) as tif:
            return "openslide" if any(getattr(tif, f"is_{name}", False) for name in _OPENSLIDE_TIFFS) else "tifffile"
    except Exception:  # not a TIFF tifffile reads: OpenSlide may know it, else TiffSlide says why not
        return "openslide" if openslide_format(path) else "tifffile"


def _check_mrxs(path: Path) -> None:
    """MRXS keeps its pixels in a folder named like the file; without it OpenSlide's error does not say so."""
    data = path.with_suffix("")
    if not (data / "Slidedat.ini").is_file():
        raise SlideError(
            f"{path}: an MRXS slide needs its data folder beside it ({data}/ with Slidedat.ini and Data*.dat); "
            "copy the folder with the .mrxs file"
        )
