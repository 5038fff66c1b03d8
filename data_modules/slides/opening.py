"""Whole-slide images behind one OpenSlide-like `Slide` API: `open_slide` opens one with the reader the format table
(`formats`) names; `file_signature` says whether a slide's files changed, for the caches keyed on it."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile

from .base import Slide, SlideError
from .formats import dicom_instance, is_instance, reader_for
from .openslide_backend import OpenSlideSlide
from .tiff_backend import TiffSlide

__all__ = ["Backend", "file_signature", "open_slide"]

Backend = Literal["auto", "tifffile", "openslide"]
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
    if (reader_for(path) if backend == "auto" else backend) == "tifffile":
        return TiffSlide(path, mpp)
    return OpenSlideSlide(path, mpp)


def file_signature(path: Path) -> tuple[int, int, str]:
    """(bytes, newest mtime in ns, content sample) of a slide: its file, or for a DICOM series folder all its `.dcm`
    instances, so caches keyed on it notice a rewritten level. The sample, a hash of each file's first and last MiB
    and of a TIFF's level-0 tile offsets and byte counts, notices a rewrite that kept the size and the mtime (`cp -p`,
    a converter restoring times). Memoised on each file's stat (inode, ctime): a repeated call costs a stat."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if is_instance(p.name)) if path.is_dir() else [path]
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
