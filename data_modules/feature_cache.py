"""The on-disk feature format, all of it: our zarr cache (write, read, manifest, finding a cache) and the CLAM/TRIDENT
`.h5` files users bring.

Our cache: `<root>/<key>/<slide>.zarr` (`<slide>` = `file_names.safe_name(slide_id)`), one zarr group per slide
(`features` (N, D), `coords` (N, 2) int32, provenance attributes, the `source` digest of the patches) beside one
`manifest.json`, where `key` names the embedder and the patch geometry, so features of different embedders (or ICMIL
iterations) never mix. A slide is written to a temporary folder and renamed into place when complete: a killed
extraction never leaves a half slide that looks finished, and a rerun skips finished slides whose source is
unchanged. CLAM/TRIDENT: `<folder>/<slide_id>.h5` with `features` ((N, D) or (1, N, D)) and optionally `coords`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import zarr
from filelock import FileLock

from .file_names import safe_name

__all__ = ["FINGERPRINT", "FeatureCache", "FeatureDtype", "SlideFeatureWriter", "SlideFeatures"]

FeatureDtype = Literal["float16", "float32"]
_ROWS_PER_CHUNK = 4096
_HOST = socket.gethostname().replace("-", "_")  # in temporaries' names, where `-` separates host and pid
_MANIFEST = "manifest.json"
_SKIPPED = "skipped"  # the manifest's record of slides without features, beside the provenance
# What identifies features for a model trained on them: the embedder's architecture and weights, the patch geometry.
FINGERPRINT = ("backbone", "truncate_after", "output", "input_size", "weights_hash", "mpp", "patch_size_px")


@dataclass(frozen=True)
class SlideFeatures:
    """One slide's bag: features (N, D) float16 or float32 as stored (the model converts on its device), level-0
    coords (N, 2), and the provenance attributes it was written with."""

    slide_id: str
    features: np.ndarray
    coords: np.ndarray
    attrs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.features)


class FeatureCache:
    """A folder of per-slide features: ours (zarr, with a `manifest.json`) or CLAM/TRIDENT `.h5` files.

    Holds only its path: cheap to pickle into loader workers, and each read opens one slide's files."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @classmethod
    def find(cls, path: str | os.PathLike) -> FeatureCache:
        """The cache at `path` if it holds slide features, else its only cache subfolder (`runs/features` -> the one
        key under it)."""
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"features folder {path} does not exist (run feature extraction first)")
        if any(path.glob("*.zarr")) or any(path.glob("*.h5")) or (path / _MANIFEST).is_file():
            return cls(path)
        caches = sorted(p for p in path.iterdir() if (p / _MANIFEST).is_file())
        if len(caches) == 1:
            return cls(caches[0])
        if not caches:
            raise ValueError(f"features folder {path} holds no .zarr or .h5 slide features")
        names = ", ".join(p.name for p in caches)
        raise ValueError(f"features folder {path} holds {len(caches)} caches ({names}); name one: {path}/<key>")

    def has(self, slide_id: str, source: str | None = None) -> bool:
        """Whether the slide's features are complete here; with `source` (`SlidePatches.digest`), also that they were
        computed from those patches (a slide file replaced under the same id, or read at another mpp, is not)."""
        meta = self._zarr(slide_id) / "zarr.json"
        if not meta.is_file():
            return False
        return source is None or json.loads(meta.read_text()).get("attributes", {}).get("source") == source

    def manifest(self) -> dict:
        path = self.path / _MANIFEST
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_manifest(self, provenance: dict) -> None:
        """Record (or check) what produced these features: a mismatch means two embedders share a key."""
        existing = self.manifest()
        produced_by = {k: v for k, v in existing.items() if k != _SKIPPED}
        if produced_by and produced_by != provenance:
            raise ValueError(f"feature cache {self.path} was written by {produced_by}, not by {provenance}")
        self._save_manifest({**existing, **provenance})

    def fingerprint(self) -> dict | None:
        """The `FINGERPRINT` entries of the manifest (None for features without one: CLAM/TRIDENT `.h5`): a bag
        classifier records them and refuses features of another embedder or geometry, however alike in width."""
        manifest = self.manifest()
        return {key: manifest.get(key) for key in FINGERPRINT} if manifest else None

    def skipped(self) -> dict[str, str]:
        """Slides that could not be read when this cache was written (slide id -> error; on_slide_error: skip)."""
        return dict(self.manifest().get(_SKIPPED, {}))

    def record_skipped(self, skipped: dict[str, str]) -> None:
        """Add `skipped` to the manifest's record; slides that have features by now leave it."""
        merged = {**self.skipped(), **skipped}
        self._save_manifest({**self.manifest(), _SKIPPED: {k: v for k, v in sorted(merged.items()) if not self.has(k)}})

    def _save_manifest(self, manifest: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{_MANIFEST}.{os.getpid()}"
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, self.path / _MANIFEST)

    def read(self, slide_id: str) -> SlideFeatures:
        """The bag of `slide_id`, from `<id>.zarr` (ours) or `<id>.h5` (CLAM/TRIDENT)."""
        zarr_path, h5_path = self._zarr(slide_id), self.path / f"{slide_id}.h5"
        if self.has(slide_id):
            source = zarr_path
            group = zarr.open_group(zarr_path, mode="r")
            features, coords, attrs = group["features"][:], group["coords"][:], dict(group.attrs)
        elif h5_path.is_file():
            source = h5_path
            with h5py.File(h5_path, "r") as fh:
                if "features" not in fh:
                    raise ValueError(
                        f"{h5_path}: no `features` dataset (expected CLAM/TRIDENT layout: features, coords)"
                    )
                features = fh["features"][:]
                coords = fh["coords"][:] if "coords" in fh else None
                attrs = dict(fh.attrs)
        else:
            raise ValueError(
                f"slide {slide_id!r}: no features in {self.path} (expected {zarr_path.name} or {h5_path.name})"
            )
        features = np.asarray(features)
        features = features.reshape(-1, features.shape[-1])  # some tools keep a leading batch axis: (1, N, D)
        if features.dtype not in (np.float16, np.float32):  # half stays half: the model converts on its device
            features = features.astype(np.float32)
        coords = np.zeros((len(features), 2), np.int32) if coords is None else np.asarray(coords).reshape(-1, 2)
        if len(coords) != len(features):  # heatmaps would pair patches with the wrong scores
            raise ValueError(f"{source}: {len(features)} feature rows but {len(coords)} coords; expected one per patch")
        return SlideFeatures(slide_id, features, coords, attrs)

    def writer(self, slide_id: str, n: int, dim: int, dtype: FeatureDtype, attrs: dict) -> SlideFeatureWriter:
        return SlideFeatureWriter(self._zarr(slide_id), n, dim, dtype, attrs)

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the half-written slides of extractions that died (killed, out of memory) on this host; returns
        them. Temporaries of live processes, and of other hosts sharing the folder, are left alone."""
        removed = []
        for folder, dirs, _ in os.walk(self.path):  # never into slides' groups: a cache holds many files per slide
            for name in [d for d in dirs if ".zarr.tmp-" in d]:
                host, _, pid = name.rpartition(".tmp-")[2].rpartition("-")
                if host == _HOST and pid.isdigit() and not _alive(int(pid)):
                    shutil.rmtree(Path(folder, name), ignore_errors=True)
                    removed.append(Path(folder, name))
            dirs[:] = [d for d in dirs if not d.endswith(".zarr") and ".zarr.tmp-" not in d]
        return removed

    def _zarr(self, slide_id: str) -> Path:
        return self.path / f"{safe_name(slide_id)}.zarr"


class SlideFeatureWriter:
    """Rows arrive batch by batch into a temporary group; `commit` renames it into place once all N are written.

    The temporary is named by host and pid, so the next extraction can tell a dead writer's leftovers from a live
    one's; `commit` holds the slide's lock, so two runs sharing a cache never interleave their renames."""

    def __init__(self, final: Path, n: int, dim: int, dtype: FeatureDtype, attrs: dict) -> None:
        self.final, self.n = final, n
        self.tmp = final.with_name(f".{final.name}.tmp-{_HOST}-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        group = zarr.open_group(self.tmp, mode="w", attributes=attrs)
        chunk = min(max(n, 1), _ROWS_PER_CHUNK)
        # uncompressed: float features barely compress (~8 %) and zstd would triple the read time of a bag
        self.features = group.create_array(
            "features", shape=(n, dim), chunks=(chunk, dim), dtype=dtype, compressors=None
        )
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
        locks = self.final.parent / ".locks"
        locks.mkdir(exist_ok=True)
        with FileLock(locks / f"{self.final.name}.lock"):
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
