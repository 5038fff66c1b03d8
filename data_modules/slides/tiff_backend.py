"""Slides read with tifffile: SVS, pyramidal TIFF, OME-TIFF, NDPI, and single-level TIFFs, tiled or in strips.

Tiles are fetched by offset and decoded with tifffile's own per-tile decoder (the one its zarr store calls), so only
the tiles a request touches are ever decoded. We call it directly rather than through a `zarr.Array` because zarr 3
dispatches every read to its event-loop thread, which costs ~0.6 ms a call, more than decoding a JPEG tile
(benchmarks/RESULTS.md); `zarr_level` still hands out tifffile's zarr view for dask/napari-style access.

Strips are segments too: a stripped page is a level whose tiles are full-width bands (uncompressed strips are cut
into bands of about 1 MiB, since one strip may hold the whole image). A slide whose coarsest level is large (a
single-level TIFF) gets coarse levels of its own: block averages of that level, built in one band-by-band pass when
a coarse read first needs them, and kept in memory (at most `_COMPUTED_BYTES`).
"""

from __future__ import annotations

import math
import os
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from .base import BACKGROUND, Slide, SlideError, positive

__all__ = ["TiffSlide"]

_MICRONS_PER_UNIT = {"inch": 25_400.0, "centimeter": 10_000.0, "millimeter": 1_000.0, "micrometer": 1.0}
_OME_UNITS = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
_NON_PYRAMID_SERIES = {"thumbnail", "label", "macro", "overview"}
_RAW_BAND_BYTES = 1 << 20  # uncompressed strips are read in bands of about this size
_MAX_SEGMENT_BYTES = 128 << 20  # a decoded tile or strip larger than this is refused: every read would decode it
_COARSEST = 1024  # a slide whose coarsest stored level is longer than this (px) gets computed coarse levels
_COMPUTED_BYTES = 128 << 20  # the largest computed coarse level; finer ones would be read from level 0


@dataclass(frozen=True)
class _Level:
    """One stored level: its keyframe page and segment (tile or strip) table."""

    page: tifffile.TiffPage
    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: np.ndarray
    bytecounts: np.ndarray
    raw: bool = False  # uncompressed 8-bit strips, cut into bands read straight from the file

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


class TiffSlide(Slide):
    """A TIFF-based slide read with tifffile; `open_slide` chooses it for the formats it reads pixel-exactly."""

    def __init__(self, path: str | os.PathLike, mpp: float | None = None, *, tile_cache_bytes: int = 64 << 20) -> None:
        self.path = Path(path)
        try:
            self._tif = tifffile.TiffFile(self.path)
        except Exception as exc:  # tifffile raises TiffFileError, struct.error, ValueError ... on foreign files
            raise SlideError(f"{self.path}: not a readable TIFF-based slide ({exc})") from exc
        try:
            self._levels = _stored_levels(self._tif, self.path)
            self.properties = _properties(self._tif)
            self.mpp = float(mpp) if mpp is not None else self._scan_mpp(_metadata_mpp(self._tif))
            self.objective_power = _objective_power(self._tif)
        except Exception:
            self._tif.close()
            raise
        if self.mpp is not None:
            self.properties["mpp"] = str(self.mpp)
        # One lock for every read of the file, tifffile's delay-loaded tag values included: reads are seek + read on
        # one shared handle, and patch reads run on several threads.
        self._tif.filehandle.set_lock(True)
        largest = max(lv.tile_w * lv.tile_h * 3 for lv in self._levels)
        self._cache = _TileCache(tile_cache_bytes + largest)  # a single-strip image's one strip stays cached
        self._computed_factors = _computed_factors(self._levels[-1])
        self._computed_pixels: list[np.ndarray] | None = None
        self._computed_lock = threading.Lock()
        self.properties["backend"] = "tifffile"
        if self._computed_factors:
            self.properties["icmil.computed_levels"] = str(len(self._computed_factors))

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((lv.width, lv.height) for lv in self._levels)

    @property
    def pyramid_dimensions(self) -> tuple[tuple[int, int], ...]:
        """The stored levels, then the computed coarse ones (thumbnails and masks of a single-level file)."""
        stored = self.level_dimensions
        w, h = stored[-1]
        return stored + tuple((max(1, w // f), max(1, h // f)) for f in self._computed_factors)

    def zarr_level(self, level: int = 0):
        """tifffile's lazy zarr array of one stored level (one event-loop hop per read)."""
        import zarr

        if level >= len(self._levels):
            raise SlideError(f"{self.path}: level {level} is computed, not stored; zarr views exist for stored levels")
        return zarr.open(self._levels[level].page.aszarr(), mode="r")

    def close(self) -> None:
        self._tif.close()

    # -- internals ---------------------------------------------------------------------------------------------------
    def _band_height(self, level: int) -> int:
        return self._levels[level].tile_h if level < len(self._levels) else 256

    def _read_level(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        if level >= len(self._levels):
            return _crop(self._computed(level - len(self._levels)), x0, y0, w, h)
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
        if lv.raw:
            spp = lv.page.samplesperpixel
            tile = _to_rgb(np.frombuffer(data, np.uint8).reshape(-1, lv.width, spp))
        else:
            try:
                decoded, _, shape = lv.page.decode(
                    data, index, jpegtables=lv.page.jpegtables, jpegheader=lv.page.jpegheader
                )
            except Exception as exc:
                raise SlideError(f"{self.path}: tile {index} of level {level} cannot be decoded ({exc})") from exc
            tile = _to_rgb(decoded.reshape(decoded.shape[-3:])[: shape[-3], : shape[-2]])
        self._cache.put(key, tile)
        return tile

    def _computed(self, index: int) -> np.ndarray:
        """Computed coarse level `index`: the first from one band-by-band pass over the coarsest stored level, the
        others from the first."""
        with self._computed_lock:
            if self._computed_pixels is None:
                factors = self._computed_factors
                levels = [self._block_reduced_level(len(self._levels) - 1, factors[0])]
                for finer, coarser in zip(factors, factors[1:], strict=False):
                    levels.append(_block_mean(levels[-1], coarser // finer))
                self._computed_pixels = levels
            return self._computed_pixels[index]


def _crop(image: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    out = np.full((h, w, 3), BACKGROUND, dtype=np.uint8)
    ih, iw = image.shape[:2]
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, iw), min(y0 + h, ih)
    if cx0 < cx1 and cy0 < cy1:
        out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = image[cy0:cy1, cx0:cx1]
    return out


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    h, w = max(1, image.shape[0] // factor), max(1, image.shape[1] // factor)
    if image.shape[0] < factor or image.shape[1] < factor:
        return np.round(image.reshape(-1, 3).mean(axis=0)).astype(np.uint8)[None, None].repeat(h, 0).repeat(w, 1)
    blocks = image[: h * factor, : w * factor].reshape(h, factor, w, factor, 3)
    return np.round(blocks.mean(axis=(1, 3), dtype=np.float32)).astype(np.uint8)


def _computed_factors(coarsest: _Level) -> tuple[int, ...]:
    """Block factors (powers of 4, relative to the coarsest stored level) of the coarse levels to compute: none
    where the file's pyramid reaches `_COARSEST` px, and none finer than `_COMPUTED_BYTES` allows."""
    w, h = coarsest.width, coarsest.height
    if max(w, h) <= _COARSEST:
        return ()
    factor = 4
    while (w // factor) * (h // factor) * 3 > _COMPUTED_BYTES:
        factor *= 4
    out = [factor]
    while max(w, h) // out[-1] > _COARSEST:
        out.append(out[-1] * 4)
    return tuple(out)


def _to_rgb(tile: np.ndarray) -> np.ndarray:
    if tile.ndim == 2:
        tile = tile[..., None]
    if tile.dtype != np.uint8:
        tile = (tile.astype(np.float32) * (255.0 / np.iinfo(tile.dtype).max)).astype(np.uint8)
    if tile.shape[-1] == 1:
        return np.repeat(tile, 3, axis=-1)
    return np.ascontiguousarray(tile[..., :3])


def _stored_levels(tif: tifffile.TiffFile, path: Path) -> list[_Level]:
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
        if page.planarconfig == 2 and page.samplesperpixel > 1:
            raise SlideError(f"{path}: level {i} has planar (separate) colour planes; expected interleaved RGB")
        offsets, counts = np.asarray(page.dataoffsets, np.int64), np.asarray(page.databytecounts, np.int64)
        end = int((offsets + counts).max())
        if end > tif.filehandle.size:
            raise SlideError(
                f"{path}: truncated file: level {i} tile data ends at byte {end}, file has {tif.filehandle.size}"
            )
        level = _tiled_level(page) if page.is_tiled else _stripped_level(page, offsets, counts)
        if level.tile_w * level.tile_h * 3 > _MAX_SEGMENT_BYTES:
            raise SlideError(
                f"{path}: level {i} is stored in {'tiles' if page.is_tiled else 'strips'} of "
                f"{level.tile_w} x {level.tile_h} px, too large to decode per read; re-save it tiled "
                "(e.g. `vips tiffsave in.tif out.tif --tile --pyramid`)"
            )
        page.decode  # noqa: B018 - tifffile builds (and caches) the tile decoder once here, not on reader threads
        levels.append(level)
    return levels


def _tiled_level(page: tifffile.TiffPage) -> _Level:
    offsets, counts = np.asarray(page.dataoffsets, np.int64), np.asarray(page.databytecounts, np.int64)
    return _Level(page, page.imagewidth, page.imagelength, page.tilewidth, page.tilelength, offsets, counts)


def _stripped_level(page: tifffile.TiffPage, offsets: np.ndarray, counts: np.ndarray) -> _Level:
    """Strips as full-width tiles; uncompressed 8-bit strips re-cut into bands of about `_RAW_BAND_BYTES`."""
    width, height = page.imagewidth, page.imagelength
    rows = min(page.rowsperstrip or height, height)
    raw = page.compression == 1 and page.bitspersample == 8 and page.fillorder == 1 and page.predictor == 1
    if not raw:
        return _Level(page, width, height, width, rows, offsets, counts)
    row_bytes = width * page.samplesperpixel
    band = max(1, _RAW_BAND_BYTES // row_bytes)
    if len(offsets) > 1:  # a band must lie inside one strip: a divisor of the strip height
        band = max(d for d in range(1, min(band, rows) + 1) if rows % d == 0)
    else:
        band = min(band, rows)
    starts = np.arange(0, height, band)
    strip = starts // rows
    band_offsets = offsets[strip] + (starts - strip * rows) * row_bytes
    band_counts = np.minimum(band, height - starts) * row_bytes
    return _Level(page, width, height, width, band, band_offsets, band_counts.astype(np.int64), raw=True)


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
            return positive(value)
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
    return positive(_MICRONS_PER_UNIT[unit_name] * den / num)


def _objective_power(tif: tifffile.TiffFile) -> float | None:
    """The objective magnification the file records: Aperio `AppMag`, NDPI `Magnification`, OME's
    `NominalMagnification`."""
    page = tif.pages.first
    if tif.is_svs:
        return positive(_aperio_fields(page.description).get("AppMag"))
    if tif.is_ndpi:
        return positive(page.ndpi_tags.get("Magnification"))
    if tif.is_ome and tif.ome_metadata:
        try:
            root = ET.fromstring(tif.ome_metadata)
        except ET.ParseError:
            return None
        objective = next((el for el in root.iter() if el.tag.endswith("Objective")), None)
        return None if objective is None else positive(objective.get("NominalMagnification"))
    return None


def _ome_mpp(xml: str) -> float | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next((el for el in root.iter() if el.tag.endswith("}Pixels") or el.tag == "Pixels"), None)
    if pixels is None or pixels.get("PhysicalSizeX") is None:
        return None
    scale = _OME_UNITS.get(pixels.get("PhysicalSizeXUnit", "µm"))
    return None if scale is None else positive(float(pixels.get("PhysicalSizeX")) * scale)
