"""Whole-slide images read lazily with tifffile: an OpenSlide-like `Slide` for SVS, pyramidal TIFF, OME-TIFF and NDPI.

Tiles are fetched by offset and decoded with tifffile's own per-tile decoder (the one its zarr store calls), so only
the tiles a request touches are ever decoded. We call it directly rather than through a `zarr.Array` because zarr 3
dispatches every read to its event-loop thread, which costs ~0.6 ms a call, more than decoding a JPEG tile
(benchmarks/RESULTS.md); `Slide.zarr_level` still hands out tifffile's zarr view for dask/napari-style access.
"""

from __future__ import annotations

import math
import os
import re
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile
from PIL import Image

__all__ = ["Slide", "SlideError", "open_slide"]

BACKGROUND = 255  # glass is white: regions outside the image read as white
_MICRONS_PER_UNIT = {"inch": 25_400.0, "centimeter": 10_000.0, "millimeter": 1_000.0, "micrometer": 1.0}
_OME_UNITS = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
_NON_PYRAMID_SERIES = {"thumbnail", "label", "macro", "overview"}
Resample = Literal["nearest", "box", "bilinear", "lanczos"]
_PIL_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
}


class SlideError(ValueError):
    """A slide file that cannot be read as asked; the message names the file and what was expected."""


def open_slide(path: str | os.PathLike, mpp: float | None = None) -> Slide:
    """Open a whole-slide image; `mpp` overrides the file's level-0 microns per pixel."""
    return Slide(path, mpp=mpp)


@dataclass(frozen=True)
class _Level:
    """One pyramid level: its keyframe page and tile table."""

    page: tifffile.TiffPage
    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: np.ndarray
    bytecounts: np.ndarray

    @property
    def cols(self) -> int:
        return math.ceil(self.width / self.tile_w)


class _TileCache:
    """Small LRU of decoded tiles, bounded in bytes: neighbouring patch reads share tiles."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
            return tile

    def put(self, key: tuple[int, int], tile: np.ndarray) -> None:
        if tile.nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._tiles:
                return
            self._tiles[key] = tile
            self._bytes += tile.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._tiles.popitem(last=False)
                self._bytes -= old.nbytes


class Slide:
    """A whole-slide image with OpenSlide's geometry conventions; see DESIGN.md section 3.

    Not picklable by design (it holds a file handle): datasets keep paths and open one `Slide` per worker process.
    """

    def __init__(self, path: str | os.PathLike, mpp: float | None = None, *, tile_cache_bytes: int = 64 << 20) -> None:
        self.path = Path(path)
        if mpp is not None and not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
            raise SlideError(f"{self.path}: mpp override must be a positive number of microns per pixel, got {mpp!r}")
        if not self.path.is_file():
            raise SlideError(f"{self.path}: no such file")
        try:
            self._tif = tifffile.TiffFile(self.path)
        except Exception as exc:  # tifffile raises TiffFileError, struct.error, ValueError ... on foreign files
            raise SlideError(f"{self.path}: not a readable TIFF-based slide ({exc})") from exc
        try:
            self._levels = _pyramid_levels(self._tif, self.path)
            self.properties = _properties(self._tif)
            self.mpp = float(mpp) if mpp is not None else _metadata_mpp(self._tif)
        except Exception:
            self._tif.close()
            raise
        if self.mpp is not None:
            self.properties["mpp"] = str(self.mpp)
        # One lock for every read of the file, tifffile's delay-loaded tag values included: reads are seek + read on
        # one shared handle, and patch reads run on several threads.
        self._tif.filehandle.set_lock(True)
        self._cache = _TileCache(tile_cache_bytes)

    # -- OpenSlide-compatible geometry -------------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self._levels)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((lv.width, lv.height) for lv in self._levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        w0, h0 = self.dimensions
        return tuple((w0 / w + h0 / h) / 2.0 for w, h in self.level_dimensions)

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed `downsample` (OpenSlide's rule)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-6):
                best = level
        return best

    def require_mpp(self) -> float:
        if self.mpp is None:
            raise SlideError(
                f"{self.path}: microns per pixel unknown (no MPP in the file's metadata); "
                "give it: open_slide(path, mpp=0.25), an `mpp` column in the labels CSV, or tiling.mpp_override"
            )
        return self.mpp

    # -- reading -----------------------------------------------------------------------------------------------------
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB pixels of `level` at level-0 `location`, `size` in level pixels; outside the image is white."""
        w, h = (int(s) for s in size)
        if w <= 0 or h <= 0:
            raise SlideError(f"{self.path}: region size must be positive, got {size}")
        if not 0 <= level < self.level_count:
            raise SlideError(f"{self.path}: level {level} out of range (the slide has {self.level_count} levels)")
        ds = self.level_downsamples[level]
        x0, y0 = (math.floor(v / ds) for v in location)
        return self._read_level(level, x0, y0, w, h)

    def read_at_mpp(
        self, location: tuple[int, int], size: tuple[int, int], mpp: float, resample: Resample = "bilinear"
    ) -> np.ndarray:
        """`size` pixels at `mpp` microns per pixel, from the best level at or finer than `mpp`, resampled once."""
        w, h = (int(s) for s in size)
        if w <= 0 or h <= 0:
            raise SlideError(f"{self.path}: region size must be positive, got {size}")
        scale = mpp / self.require_mpp()  # level-0 pixels per output pixel
        level = self.get_best_level_for_downsample(scale)
        ds = self.level_downsamples[level]
        factor = scale / ds  # level pixels per output pixel, >= 1 up to rounding
        fx, fy = location[0] / ds, location[1] / ds
        if abs(factor - 1) < 1e-6 and fx == int(fx) and fy == int(fy):
            return self._read_level(level, int(fx), int(fy), w, h)
        x0, y0 = math.floor(fx), math.floor(fy)
        x1, y1 = math.ceil(fx + w * factor), math.ceil(fy + h * factor)
        region = Image.fromarray(self._read_level(level, x0, y0, x1 - x0, y1 - y0))
        box = (fx - x0, fy - y0, fx - x0 + w * factor, fy - y0 + h * factor)
        return np.asarray(region.resize((w, h), _PIL_RESAMPLE[resample], box=box))

    def get_thumbnail(self, size: tuple[int, int]) -> np.ndarray:
        """An RGB image fitting in `size` with the slide's aspect, built band by band (bounded memory)."""
        max_w, max_h = (int(s) for s in size)
        if max_w <= 0 or max_h <= 0:
            raise SlideError(f"{self.path}: thumbnail size must be positive, got {size}")
        w0, h0 = self.dimensions
        downsample = max(w0 / max_w, h0 / max_h)
        out_w, out_h = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
        level = self.get_best_level_for_downsample(downsample)
        reduced = self._block_reduced_level(level, max(1, int(downsample / self.level_downsamples[level])))
        return np.asarray(Image.fromarray(reduced).resize((out_w, out_h), Image.Resampling.LANCZOS))

    def zarr_level(self, level: int = 0):
        """tifffile's lazy zarr array of one level, for dask/napari-style access (one event-loop hop per read)."""
        import zarr

        series = self._levels[level].page
        return zarr.open(series.aszarr(), mode="r")

    def close(self) -> None:
        self._tif.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> None:
        raise TypeError(f"Slide({self.path}) holds an open file and cannot be pickled; pass paths to worker processes")

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, dimensions={self.dimensions}, levels={self.level_count}, mpp={self.mpp})"

    # -- internals ---------------------------------------------------------------------------------------------------
    def _read_level(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        lv = self._levels[level]
        out = np.full((h, w, 3), BACKGROUND, dtype=np.uint8)
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x0 + w, lv.width), min(y0 + h, lv.height)
        if cx0 >= cx1 or cy0 >= cy1:
            return out
        for ty in range(cy0 // lv.tile_h, (cy1 - 1) // lv.tile_h + 1):
            for tx in range(cx0 // lv.tile_w, (cx1 - 1) // lv.tile_w + 1):
                tile = self._tile(level, ty * lv.cols + tx)
                if tile is None:
                    continue
                tx0, ty0 = tx * lv.tile_w, ty * lv.tile_h
                sx0, sy0 = max(cx0, tx0), max(cy0, ty0)
                sx1, sy1 = min(cx1, tx0 + tile.shape[1]), min(cy1, ty0 + tile.shape[0])
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = tile[sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0]
        return out

    def _tile(self, level: int, index: int) -> np.ndarray | None:
        """Decoded RGB tile `index` of `level`, or None for a sparse (absent) tile."""
        key = (level, index)
        tile = self._cache.get(key)
        if tile is not None:
            return tile
        lv = self._levels[level]
        offset, count = int(lv.offsets[index]), int(lv.bytecounts[index])
        if offset == 0 or count == 0:
            return None
        fh = self._tif.filehandle
        with fh.lock:
            fh.seek(offset)
            data = fh.read(count)
        try:
            decoded, _, shape = lv.page.decode(
                data, index, jpegtables=lv.page.jpegtables, jpegheader=lv.page.jpegheader
            )
        except Exception as exc:
            raise SlideError(f"{self.path}: tile {index} of level {level} cannot be decoded ({exc})") from exc
        tile = _to_rgb(decoded.reshape(decoded.shape[-3:])[: shape[-3], : shape[-2]])
        self._cache.put(key, tile)
        return tile

    def _block_reduced_level(self, level: int, factor: int) -> np.ndarray:
        """Level `level` block-averaged by `factor`, one tile row at a time so no whole level is ever held."""
        lv = self._levels[level]
        out_w = lv.width // factor or 1
        rows: list[np.ndarray] = []
        carry = np.empty((0, out_w, 3), dtype=np.float32)
        for y in range(0, lv.height, lv.tile_h):
            band = self._read_level(level, 0, y, out_w * factor, min(lv.tile_h, lv.height - y)).astype(np.float32)
            band = band.reshape(band.shape[0], out_w, factor, 3).mean(axis=2)
            band = np.concatenate([carry, band])
            usable = band.shape[0] // factor * factor
            if usable:
                rows.append(band[:usable].reshape(-1, factor, out_w, 3).mean(axis=1))
            carry = band[usable:]
        if not rows:
            rows.append(carry.mean(axis=0, keepdims=True))
        return np.round(np.concatenate(rows)).astype(np.uint8)


def _to_rgb(tile: np.ndarray) -> np.ndarray:
    if tile.ndim == 2:
        tile = tile[..., None]
    if tile.dtype != np.uint8:
        tile = (tile.astype(np.float32) * (255.0 / np.iinfo(tile.dtype).max)).astype(np.uint8)
    if tile.shape[-1] == 1:
        return np.repeat(tile, 3, axis=-1)
    return np.ascontiguousarray(tile[..., :3])


def _pyramid_levels(tif: tifffile.TiffFile, path: Path) -> list[_Level]:
    """Pyramid levels, finest first: tifffile's series levels, or OpenSlide's generic rule of tiled pages by size."""
    images = [s for s in tif.series if s.name.lower() not in _NON_PYRAMID_SERIES]
    if not images:
        raise SlideError(f"{path}: no image series found")
    base = max(images, key=lambda s: s.keyframe.imagewidth * s.keyframe.imagelength)
    pages = [lv.keyframe for lv in base.levels]
    if len(pages) == 1:  # levels stored as separate series/pages (generic TIFF, older OME): same aspect, smaller
        w0, h0 = pages[0].imagewidth, pages[0].imagelength
        for s in images:
            p = s.keyframe
            if p.imagewidth < w0 and p.is_tiled and abs(p.imagewidth / w0 - p.imagelength / h0) < 2 / min(p.shape[:2]):
                pages.append(p)
        pages.sort(key=lambda p: -p.imagewidth)
    levels = []
    for i, page in enumerate(pages):
        if not page.is_tiled:
            raise SlideError(
                f"{path}: level {i} is stored in strips, not tiles; whole-slide images must be tiled "
                "(convert with e.g. `vips tiffsave --tile --pyramid`)"
            )
        if page.planarconfig == 2 and page.samplesperpixel > 1:
            raise SlideError(f"{path}: level {i} has planar (separate) colour planes; expected interleaved RGB")
        offsets, counts = np.asarray(page.dataoffsets, np.int64), np.asarray(page.databytecounts, np.int64)
        end = int((offsets + counts).max())
        if end > tif.filehandle.size:
            raise SlideError(
                f"{path}: truncated file: level {i} tile data ends at byte {end}, file has {tif.filehandle.size}"
            )
        page.decode  # noqa: B018 - tifffile builds (and caches) the tile decoder once here, not on reader threads
        levels.append(_Level(page, page.imagewidth, page.imagelength, page.tilewidth, page.tilelength, offsets, counts))
    return levels


def _properties(tif: tifffile.TiffFile) -> dict[str, str]:
    page = tif.pages.first
    props: dict[str, str] = {"vendor": _vendor(tif)}
    for name in ("ImageDescription", "Make", "Model", "Software", "DateTime"):
        tag = page.tags.get(name)
        if tag is not None:
            props[f"tiff.{name}"] = str(tag.value)
    if tif.is_svs:
        for key, value in _aperio_fields(page.description).items():
            props[f"aperio.{key}"] = value
    return props


def _vendor(tif: tifffile.TiffFile) -> str:
    for flag in ("svs", "ndpi", "ome", "philips", "scn", "bif"):
        if getattr(tif, f"is_{flag}", False):
            return {"svs": "aperio", "ndpi": "hamamatsu"}.get(flag, flag)
    return "generic-tiff"


def _aperio_fields(description: str) -> dict[str, str]:
    fields = {}
    for item in description.split("|")[1:]:
        key, sep, value = item.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _metadata_mpp(tif: tifffile.TiffFile) -> float | None:
    """Level-0 microns per pixel from the metadata each format carries, or None if the file does not say."""
    page = tif.pages.first
    if tif.is_svs:
        value = _aperio_fields(page.description).get("MPP")
        if value is not None:
            return _positive(value)
    if tif.is_ome and tif.ome_metadata:
        mpp = _ome_mpp(tif.ome_metadata)
        if mpp is not None:
            return mpp
    xres, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if xres is None or unit is None:
        return None
    unit_name = tifffile.RESUNIT(unit.value).name.lower()
    if unit_name not in _MICRONS_PER_UNIT:
        return None
    num, den = xres.value if isinstance(xres.value, tuple) else (xres.value, 1)
    if not num or not den:
        return None
    return _positive(_MICRONS_PER_UNIT[unit_name] * den / num)


def _ome_mpp(xml: str) -> float | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next((el for el in root.iter() if el.tag.endswith("}Pixels") or el.tag == "Pixels"), None)
    if pixels is None or pixels.get("PhysicalSizeX") is None:
        return None
    scale = _OME_UNITS.get(pixels.get("PhysicalSizeXUnit", "µm"))
    return None if scale is None else _positive(float(pixels.get("PhysicalSizeX")) * scale)


def _positive(value: str | float) -> float | None:
    try:
        number = float(re.sub(r"[^0-9.eE+-]", "", str(value)))
    except ValueError:
        return None
    return number if math.isfinite(number) and number > 0 else None
