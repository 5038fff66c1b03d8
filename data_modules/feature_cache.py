"""The feature cache: one zarr group per slide (`features` (N, D), `coords` (N, 2) int32) under a fingerprint folder.

Layout: `<root>/<key>/<slide_id>.zarr`, where `key` names the embedder and the patch geometry, so features of
different embedders (or ICMIL iterations) never mix. A slide is written to a temporary folder and renamed into place
when complete: a killed extraction never leaves a half slide that looks finished, and a rerun skips finished slides.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

__all__ = ["FeatureCache", "SlideFeatures", "SlideFeatureWriter"]

FeatureDtype = Literal["float16", "float32"]
_ROWS_PER_CHUNK = 4096


class SlideFeatures:
    """One slide's cached features, read lazily (`features[...]` decodes only what is asked)."""

    def __init__(self, slide_id: str, features: Any, coords: np.ndarray, attrs: dict) -> None:
        self.slide_id, self.features, self.coords, self.attrs = slide_id, features, coords, attrs

    def __len__(self) -> int:
        return int(self.features.shape[0])


class FeatureCache:
    """A folder of per-slide feature groups sharing one provenance record (`manifest.json`)."""

    def __init__(self, root: str | os.PathLike, key: str) -> None:
        self.root = Path(root)
        self.key = key
        self.path = self.root / key

    def slide_path(self, slide_id: str) -> Path:
        return self.path / f"{slide_id}.zarr"

    def has(self, slide_id: str) -> bool:
        return (self.slide_path(slide_id) / "zarr.json").is_file()

    def missing(self, slide_ids: list[str]) -> list[str]:
        return [s for s in slide_ids if not self.has(s)]

    def manifest(self) -> dict:
        path = self.path / "manifest.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_manifest(self, provenance: dict) -> None:
        """Record (or check) what produced these features: a mismatch means two embedders share a key."""
        existing = self.manifest()
        if existing and existing != provenance:
            raise ValueError(f"feature cache {self.path} was written by {existing}, not by {provenance}")
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".manifest.json.{os.getpid()}"
        tmp.write_text(json.dumps(provenance, indent=1, sort_keys=True))
        os.replace(tmp, self.path / "manifest.json")

    def read(self, slide_id: str) -> SlideFeatures:
        if not self.has(slide_id):
            raise ValueError(f"feature cache {self.path}: no features for slide {slide_id!r} (extract them first)")
        group = zarr.open_group(self.slide_path(slide_id), mode="r")
        return SlideFeatures(slide_id, group["features"], group["coords"][:], dict(group.attrs))

    def writer(self, slide_id: str, n: int, dim: int, dtype: FeatureDtype, attrs: dict) -> SlideFeatureWriter:
        return SlideFeatureWriter(self.slide_path(slide_id), n, dim, dtype, attrs)


class SlideFeatureWriter:
    """Rows arrive batch by batch into a temporary group; `commit` renames it into place once all N are written."""

    def __init__(self, final: Path, n: int, dim: int, dtype: FeatureDtype, attrs: dict) -> None:
        self.final, self.n = final, n
        self.tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        group = zarr.open_group(self.tmp, mode="w", attributes=attrs)
        chunk = min(max(n, 1), _ROWS_PER_CHUNK)
        # uncompressed: float features barely compress (~8 %) and zstd would triple the read time of a bag
        self.features = group.create_array("features", shape=(n, dim), chunks=(chunk, dim), dtype=dtype,
                                           compressors=None)
        self.coords = group.create_array("coords", shape=(n, 2), chunks=(max(n, 1), 2), dtype="int32")
        self.written = 0
        self._buffer: list[tuple[np.ndarray, np.ndarray]] = []
        self._buffered = 0

    def append(self, features: np.ndarray, coords: np.ndarray) -> None:
        if not np.isfinite(features).all():
            self.abort()
            raise ValueError(f"{self.final.stem}: the embedder produced non-finite features (NaN/inf)")
        self._buffer.append((features, coords))
        self._buffered += len(features)
        if self._buffered >= _ROWS_PER_CHUNK or self.written + self._buffered == self.n:
            self._flush()

    @property
    def complete(self) -> bool:
        return self.written + self._buffered == self.n

    def commit(self) -> None:
        self._flush()
        if self.written != self.n:
            self.abort()
            raise RuntimeError(f"{self.final.stem}: wrote {self.written} of {self.n} patch features")
        shutil.rmtree(self.final, ignore_errors=True)
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _flush(self) -> None:
        if not self._buffer:
            return
        features = np.concatenate([f for f, _ in self._buffer])
        coords = np.concatenate([c for _, c in self._buffer])
        end = self.written + len(features)
        self.features[self.written : end] = features
        self.coords[self.written : end] = coords
        self.written, self._buffer, self._buffered = end, [], 0
