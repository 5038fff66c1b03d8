"""The on-disk feature format, all of it: our zarr cache (write, read, manifest, finding a cache) and the CLAM/TRIDENT
`.h5` files users bring.

Our cache: `<root>/<key>/<slide>.zarr` (`<slide>` = `file_names.safe_name(slide_id)`), one zarr group per slide
(`features` (N, D), `coords` (N, 2) int32, provenance attributes, the `source` digest of the patches) beside one
`manifest.json`, where `key` names the embedder and the patch geometry, so features of different embedders (or ICMIL
iterations) never mix. A slide is written to a temporary folder and renamed into place when complete: a killed
extraction never leaves a half slide that looks finished, and a rerun skips finished slides whose source is
unchanged. Each group records a CRC-32 of its arrays' bytes (`checksums`), which `read` verifies, and `has` checks
that every chunk file is there with its size: a lost or cut chunk must never read as zeros (zarr's fill value).
CLAM/TRIDENT: `<folder>/<slide_id>.h5` with `features` ((N, D) or (1, N, D)) and optionally `coords` ((N, 2)).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import socket
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import zarr
from filelock import FileLock

from ..io import atomic_write, safe_name
from .claims import process_alive

__all__ = ["FINGERPRINT", "FeatureCache", "FeatureDtype", "SlideFeatureWriter", "SlideFeatures"]

FeatureDtype = Literal["float16", "float32"]
_ROWS_PER_CHUNK = 4096
_HOST = socket.gethostname().replace("-", "_")  # in temporaries' names, where `-` separates host and pid
_MANIFEST = "manifest.json"
_SKIPPED = "skipped"  # the manifest's record of slides without features, beside the provenance
_LAST_EXTRACTION = "last_extraction"  # the manifest's record of the latest extraction's throughput
_EXTRACTIONS = "extractions"  # the manifest's record of each extraction process: who embedded which slides
_KEPT_EXTRACTIONS = 100  # the latest this many (a job array of a thousand tasks keeps its last hundred)
_CHECKSUMS = "checksums"  # a group's attribute: array name -> CRC-32 of its little-endian bytes (older caches lack it)
_ARRAYS = ("features", "coords")
_VERIFIED: set[tuple] = set()  # groups whose checksums matched, by their files' stats: each is hashed once a process
# What identifies features for a model trained on them: the embedder's architecture and weights, the patch geometry.
FINGERPRINT = ("backbone", "truncate_after", "output", "input_size", "weights_hash", "mpp", "patch_size_px")


@dataclass(frozen=True)
class SlideFeatures:
    """One slide's bag: features (N, D) float16 or float32 as stored (the model converts on its device), level-0
    coords (N, 2), the provenance attributes it was written with, and the zarr group or `.h5` file read."""

    slide_id: str
    features: np.ndarray
    coords: np.ndarray
    attrs: dict = field(default_factory=dict)
    source: Path | None = None

    def __len__(self) -> int:
        return len(self.features)

    @property
    def patch_side(self) -> float | None:
        """Level-0 pixels per patch side where the bag says it: ours (`level0_patch_size`), TRIDENT's
        (`patch_size_level0`), or CLAM's `patch_size` read at `patch_level` 0; None where it does not."""
        for key in ("level0_patch_size", "patch_size_level0"):
            if self.attrs.get(key) is not None:
                return float(self.attrs[key])
        if self.attrs.get("patch_size") is not None and int(self.attrs.get("patch_level", -1)) == 0:
            return float(self.attrs["patch_size"])
        return None


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
        computed from those patches (a slide file replaced under the same id, or read at another mpp, is not). Reads
        metadata and chunk files' sizes, no data: a damaged slide is not complete, so extraction embeds it again."""
        folder = self._zarr(slide_id)
        if _damage(folder) is not None:
            return False
        return (
            source is None
            or json.loads((folder / "zarr.json").read_text()).get("attributes", {}).get("source") == source
        )

    def manifest(self) -> dict:
        path = self.path / _MANIFEST
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_manifest(self, provenance: dict) -> None:
        """Record (or check) what produced these features: another `FINGERPRINT` means two embedders share a key.
        The rest of the provenance (where the weights file is, the code version) may differ and is updated."""
        with self._manifest_lock():
            existing = self.manifest()
            if existing and self.fingerprint() != {key: provenance.get(key) for key in FINGERPRINT}:
                records = (_SKIPPED, _LAST_EXTRACTION, _EXTRACTIONS)
                produced_by = {k: v for k, v in existing.items() if k not in records}
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
        with self._manifest_lock():
            merged = {**self.skipped(), **skipped}
            kept = {k: v for k, v in sorted(merged.items()) if not self.has(k)}
            self._save_manifest({**self.manifest(), _SKIPPED: kept})

    def record_extraction(self, summary: dict) -> None:
        """Keep an extraction's throughput and the slides it embedded in the manifest (`extraction_summary`): the
        latest as `last_extraction`, to compare across versions and machines, and each process's in `extractions`,
        which says who embedded which slide when several ran at once."""
        with self._manifest_lock():
            manifest = self.manifest()
            history = [*manifest.get(_EXTRACTIONS, []), summary][-_KEPT_EXTRACTIONS:]
            self._save_manifest({**manifest, _LAST_EXTRACTION: summary, _EXTRACTIONS: history})

    def _manifest_lock(self) -> FileLock:
        """Held around every read-modify-write of the manifest: extractions running at once each record theirs."""
        locks = self.path / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        return FileLock(locks / f"{_MANIFEST}.lock")

    def _save_manifest(self, manifest: dict) -> None:
        atomic_write(self.path / _MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))

    def read(self, slide_id: str) -> SlideFeatures:
        """The bag of `slide_id`, from `<id>.zarr` (ours, verified whole) or `<id>.h5` (CLAM/TRIDENT)."""
        zarr_path, h5_path = self._zarr(slide_id), self.path / f"{slide_id}.h5"
        if zarr_path.is_dir():
            source = zarr_path
            features, coords, attrs = self._read_zarr(slide_id, zarr_path)
        elif h5_path.is_file():
            source = h5_path
            with h5py.File(h5_path, "r") as fh:
                if "features" not in fh:
                    raise ValueError(
                        f"{h5_path}: no `features` dataset (expected CLAM/TRIDENT layout: features, coords)"
                    )
                features = fh["features"][:]
                coords = fh["coords"][:] if "coords" in fh else None
                attrs = {**fh.attrs, **(fh["coords"].attrs if "coords" in fh else {})}  # CLAM, TRIDENT: on coords
            batched = coords is not None and coords.ndim == 3 and coords.shape[0] == 1  # as for features: (1, N, 2)
            if coords is not None and not (coords.shape[-1:] == (2,) and (coords.ndim == 2 or batched)):
                raise ValueError(f"{h5_path}: coords of shape {coords.shape}; expected (N, 2) level-0 (x, y) corners")
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
        return SlideFeatures(slide_id, features, coords, attrs, source)

    def writer(self, slide_id: str, n: int, dim: int, dtype: FeatureDtype, attrs: dict) -> SlideFeatureWriter:
        return SlideFeatureWriter(self._zarr(slide_id), n, dim, dtype, attrs)

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the half-written slides of extractions that died (killed, out of memory) on this host; returns
        them. Temporaries of live processes, and of other hosts sharing the folder, are left alone."""
        removed = []
        for folder, dirs, _ in os.walk(self.path):  # never into slides' groups: a cache holds many files per slide
            for name in [d for d in dirs if ".zarr.tmp-" in d]:
                host, _, pid = name.rpartition(".tmp-")[2].rpartition("-")
                if host == _HOST and pid.isdigit() and not process_alive(int(pid)):
                    shutil.rmtree(Path(folder, name), ignore_errors=True)
                    removed.append(Path(folder, name))
            dirs[:] = [d for d in dirs if not d.endswith(".zarr") and ".zarr.tmp-" not in d]
        return removed

    def _zarr(self, slide_id: str) -> Path:
        return self.path / f"{safe_name(slide_id)}.zarr"

    def _read_zarr(self, slide_id: str, folder: Path) -> tuple[np.ndarray, np.ndarray, dict]:
        """A slide's arrays and attributes, refused unless every chunk is there and they match their checksums
        (hashed once per process while no file of the group changes: the CRC would add two thirds to every read)."""
        stamps: list[tuple] = []
        damage = _damage(folder, stamps)
        fix = "rerun the feature extraction, which embeds it again"
        if damage is None:  # what `has` cannot see without reading, extraction cannot see either
            fix = f"delete {folder} and {fix}"
            try:
                group = zarr.open_group(folder, mode="r")
                features, coords, attrs = group["features"][:], group["coords"][:], dict(group.attrs)
            except (RuntimeError, ValueError, OSError, KeyError) as exc:  # e.g. a compressed chunk cut short
                damage = f"a chunk does not decode: {type(exc).__name__}"
        if damage is None and (stamp := (str(folder), *stamps)) not in _VERIFIED:
            expected = attrs.get(_CHECKSUMS) or {}  # caches written before checksums: structural checks only
            found = {"features": _crc(features), "coords": _crc(coords)}
            bad = [name for name in _ARRAYS if name in expected and expected[name] != found[name]]
            damage = f"{bad[0]} do not match their checksum" if bad else None
            if damage is None:
                _VERIFIED.add(stamp)
        if damage is not None:
            raise ValueError(f"slide {slide_id!r}: features in {self.path} are damaged ({damage}); {fix}")
        return features, coords, attrs


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
        whole = {"write_empty_chunks": True}  # every chunk on disk, even all zeros: a missing one is damage
        self.group = group
        # uncompressed: float features barely compress (~8 %) and zstd would triple the read time of a bag
        self.features = group.create_array(
            "features", shape=(n, dim), chunks=(chunk, dim), dtype=dtype, compressors=None, config=whole
        )
        self.coords = group.create_array(  # uncompressed too (8 bytes a patch): `has` then knows every chunk's size
            "coords", shape=(n, 2), chunks=(max(n, 1), 2), dtype="int32", compressors=None, config=whole
        )
        self._checksums = {name: 0 for name in _ARRAYS}  # running CRC-32s: rows arrive in order
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
        self.group.attrs[_CHECKSUMS] = self._checksums
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
        features = np.concatenate([f for f, _ in self._buffer]).astype(self.features.dtype, copy=False)
        coords = np.concatenate([c for _, c in self._buffer]).astype(np.int32, copy=False)
        end = self.written + len(features)
        try:
            self.features[self.written : end] = features
            self.coords[self.written : end] = coords
        except OSError as error:  # a full disk said "[Errno 28] No space left on device", naming no folder
            self.abort()
            why = f"could not write features into {self.final.parent} ({error.strerror or error}); free space there"
            raise OSError(error.errno, f"{why} or give the extraction another cache_root", str(self.final)) from error
        self._checksums = {
            "features": _crc(features, self._checksums["features"]),
            "coords": _crc(coords, self._checksums["coords"]),
        }
        self.written, self._buffer, self._buffered = end, [], 0


def _crc(array: np.ndarray, crc: int = 0) -> int:
    """CRC-32 of an array's little-endian bytes, continuing `crc` (about 4 GB/s: 10 ms for a 20k x 1024 half bag)."""
    return zlib.crc32(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")), crc)


def _damage(folder: Path, stamps: list[tuple] | None = None) -> str | None:
    """Why the slide group at `folder` is not whole, from its metadata and its chunk files' sizes (no data read), or
    None. An uncompressed chunk's size is known (zarr writes edge chunks whole); a compressed one must not be empty.
    `stamps` collects the stats (inode, size, mtime) of its files."""
    stamps = [] if stamps is None else stamps
    try:
        stat = (folder / "zarr.json").stat()
    except FileNotFoundError:
        return "zarr.json is missing"
    stamps.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
    for name in _ARRAYS:
        try:
            stat = (folder / name / "zarr.json").stat()
            stamps.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
            meta = json.loads((folder / name / "zarr.json").read_text())
            shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
            encoding = meta["chunk_key_encoding"]
            raw = [codec["name"] for codec in meta["codecs"]] == ["bytes"]
            size = math.prod(chunks) * np.dtype(meta["data_type"]).itemsize if raw else None
        except (OSError, ValueError, KeyError, TypeError):
            return f"{name}/zarr.json is missing or unreadable"
        separator = encoding.get("configuration", {}).get("separator", "/" if encoding["name"] == "default" else ".")
        for index in itertools.product(
            *(range(-(-extent // step)) for extent, step in zip(shape, chunks, strict=True))
        ):
            key = separator.join(("c", *map(str, index)) if encoding["name"] == "default" else map(str, index))
            try:
                stat = (folder / name / key).stat()
            except FileNotFoundError:
                return f"chunk {name}/{key} is missing"
            found = stat.st_size
            stamps.append((stat.st_ino, found, stat.st_mtime_ns))
            if found == 0 or (size is not None and found != size):
                return f"chunk {name}/{key} holds {found} bytes" + (f", not {size}" if size else "")
    return None
