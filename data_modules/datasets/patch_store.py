"""Decoded patches written once and read by every later epoch instead of the slide.

A coupling or end-to-end epoch reads every patch of its slides again: the tile decode and the resampling to the
tiling's mpp are identical each time. The store keeps the patches as uint8 (N, 3, S, S), the readers' own layout, one
zarr array per slide and tiling: `<root>/<safe slide id>/<digest>-<resample>.zarr`, the digest being
`SlidePatches.digest()` (the file's signature, the grid, the output size and mpp), so a changed slide or tiling is a
different entry and a stale one is never read. Arrays are chunked in runs of `CHUNK` patches (one file each), zstd
level 1: a run of patches reads an order of magnitude faster than decoding it, but one patch alone costs a whole
chunk (zarr's per-call overhead dominates, and one-patch chunks in shards made runs as slow as decoding), so readers
of single patches keep the last chunk (`PatchDataset`); figures in benchmarks/RESULTS.md. An entry is written into a
temporary folder and renamed into place, so a killed writer leaves nothing a reader would take (the next writer of
the slide on that host removes it), and of two processes filling one slide the first rename wins.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from ..io import safe_name
from ..slides import Resample
from ..slides.tiling import SlidePatches
from .claims import process_alive

__all__ = ["CHUNK", "PatchStore", "PatchWriter"]

CHUNK = 64  # patches per chunk file: a 256 px patch is 196 KB, a chunk about 12 MB before compression


class PatchStore:
    """The decoded patches of slides under `root`, by slide and tiling (see the module's docstring)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, patches: SlidePatches, resample: Resample) -> Path:
        return self.root / safe_name(patches.slide_id) / f"{patches.digest()}-{resample}.zarr"

    def open(self, patches: SlidePatches, resample: Resample) -> zarr.Array | None:
        """The slide's stored patches, or None where they are not (yet) stored."""
        path = self.path(patches, resample)
        return zarr.open_array(path, mode="r") if path.is_dir() else None

    def writer(self, patches: SlidePatches, resample: Resample) -> PatchWriter | None:
        """A writer of the slide's patches in grid order, or None where they are stored already."""
        final = self.path(patches, resample)
        if final.is_dir():
            return None
        for partial in final.parent.glob(f".{final.name}.*"):  # what writers killed on this host left
            host, pid, _ = partial.name[len(final.name) + 2 :].rsplit("-", 2)
            if host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(partial, ignore_errors=True)
        return PatchWriter(final, len(patches.grid), patches.grid.patch_size)

    def fill(self, patches: SlidePatches, resample: Resample, read: Callable[[np.ndarray], np.ndarray]) -> zarr.Array:
        """Store every patch of the slide, reading `CHUNK` at a time with `read(coords) -> uint8 (n, 3, S, S)`;
        returns the stored array (another process's, where it finished first)."""
        writer = self.writer(patches, resample)
        if writer is None:
            return zarr.open_array(self.path(patches, resample), mode="r")
        try:
            coords = patches.grid.coords
            for start in range(0, len(coords), CHUNK):
                writer.append(read(coords[start : start + CHUNK]))
            return writer.commit()
        finally:
            writer.abort()


class PatchWriter:
    """One slide's patches appended in grid order (any number at a time: they are written a whole chunk at a time)
    into a temporary folder beside the entry; `commit` renames it into place once every patch is there."""

    def __init__(self, final: Path, count: int, size: int) -> None:
        self.final, self.count = final, count
        final.parent.mkdir(parents=True, exist_ok=True)
        self.partial = final.with_name(f".{final.name}.{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self._array = zarr.create_array(
            self.partial,
            shape=(count, 3, size, size),
            chunks=(CHUNK, 3, size, size),
            dtype="uint8",
            compressors=ZstdCodec(level=1),
        )
        self._written = 0
        self._pending: list[np.ndarray] = []

    @property
    def complete(self) -> bool:
        return self._written + sum(len(p) for p in self._pending) == self.count

    def append(self, images: np.ndarray) -> None:
        """uint8 (n, 3, S, S), the grid's next n patches."""
        self._pending.append(np.asarray(images, dtype=np.uint8))
        pending = sum(len(p) for p in self._pending)
        if pending >= CHUNK or self.complete:
            block = np.concatenate(self._pending)
            whole = len(block) if self.complete else len(block) // CHUNK * CHUNK
            self._array[self._written : self._written + whole] = block[:whole]
            self._written += whole
            self._pending = [block[whole:]] if whole < len(block) else []

    def commit(self) -> zarr.Array:
        """The entry, renamed into place (another process's, where its rename came first)."""
        if not self.complete:
            raise RuntimeError(f"{self.final}: {self._written} of {self.count} patches written")
        try:
            os.rename(self.partial, self.final)
        except OSError:
            if not self.final.is_dir():  # not another process's rename winning: a real failure
                raise
            self.abort()
        return zarr.open_array(self.final, mode="r")

    def abort(self) -> None:
        """Remove what is not committed (nothing once committed)."""
        shutil.rmtree(self.partial, ignore_errors=True)
