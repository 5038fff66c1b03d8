"""Writing a synthetic slide as a real pyramidal TIFF (SVS, generic TIFF or OME-TIFF), tile by tile with bounded
memory: lower levels are spooled to raw files next to the output while level 0 is written."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, get_args

import numpy as np
import tifffile

from data_modules.io import check

from ..io import atomic_path
from .levels import area4
from .scene import Scene, SlideInfo, cached_scene
from .sites import Site
from .spec import CohortSpec, Compression, Flavour

__all__ = ["write_slide"]

_THUMBNAIL_PX = 1024  # an SVS thumbnail is the first pyramid level at most this large
_APERIO = "Aperio Image Library v12.0.15"


class _Spool:
    """Pyramid levels 1.. built by streaming 4x4 area averages into raw files, so no level is ever held in memory."""

    def __init__(self, dims: Sequence[tuple[int, int]], directory: Path) -> None:
        self.dims = list(dims)
        self.files: list[IO[bytes]] = [open(directory / f"level{k}.raw", "w+b") for k in range(1, len(dims))]
        # pending[k - 1]: rows of level k waiting for a complete 4-row group of level k + 1
        self.pending = [np.zeros((0, w, 3), np.uint8) for w, _ in self.dims[1:-1]]

    def push(self, level: int, rows: np.ndarray) -> None:
        """Append the next rows of `level` (>= 1) and propagate complete 4-row groups down the pyramid."""
        self.files[level - 1].write(np.ascontiguousarray(rows).tobytes())
        if level + 1 < len(self.dims):
            rows = np.concatenate([self.pending[level - 1], rows])
            whole = len(rows) // 4 * 4
            self.pending[level - 1] = rows[whole:]
            if whole:
                self.push(level + 1, area4(rows[:whole]))

    def finish(self) -> None:
        """Flush the partial row groups at the bottom edge, top level first."""
        for level in range(1, len(self.dims) - 1):
            rows, self.pending[level - 1] = self.pending[level - 1], self.pending[level - 1][:0]
            if len(rows):
                self.push(level + 1, area4(rows))
        for f, (w, h) in zip(self.files, self.dims[1:], strict=True):
            if f.tell() != w * h * 3:
                raise RuntimeError(f"pyramid spool: level {w}x{h} has {f.tell()} bytes")

    def rows(self, level: int, y: int, n: int) -> np.ndarray:
        w = self.dims[level][0]
        f = self.files[level - 1]
        f.seek(y * w * 3)
        return np.frombuffer(f.read(n * w * 3), np.uint8).reshape(n, w, 3)

    def close(self) -> None:
        for f in self.files:
            f.close()


def _level_dimensions(width: int, height: int, tile_size: int, levels: int | None) -> list[tuple[int, int]]:
    """Pyramid sizes, each level a quarter of the previous (rounded up); by default, like scanners, down to the first
    level whose next quarter would be smaller than a tile."""
    dims = [(width, height)]
    while (len(dims) < levels) if levels else max(dims[-1]) / 4 >= tile_size:
        w, h = dims[-1]
        dims.append((-(-w // 4), -(-h // 4)))
    return dims


def _level0_tiles(
    scene: Scene, dims: Sequence[tuple[int, int]], tile: int, spool: _Spool | None
) -> Iterator[np.ndarray]:
    w, h = dims[0]
    for y in range(0, h, tile):
        th = min(tile, h - y)
        band = np.empty((-(-th // 4), dims[1][0], 3), np.uint8) if spool else None
        for x in range(0, w, tile):
            pixels = scene.render(x, y, tile, tile)
            if spool:
                block = area4(pixels[:th, : min(tile, w - x)])
                band[:, x // 4 : x // 4 + block.shape[1]] = block
                if x + tile >= w:  # before the last yield: the writer stops pulling after the last tile
                    spool.push(1, band)
            yield pixels


def _spooled_tiles(spool: _Spool, level: int, tile: int) -> Iterator[np.ndarray]:
    w, h = spool.dims[level]
    for y in range(0, h, tile):
        band = spool.rows(level, y, min(tile, h - y))
        for x in range(0, w, tile):
            pixels = band[:, x : x + tile]
            if pixels.shape[:2] != (tile, tile):  # replicate the edge rather than pad black: no JPEG ringing
                pixels = np.pad(pixels, ((0, tile - pixels.shape[0]), (0, tile - pixels.shape[1]), (0, 0)), mode="edge")
            yield pixels


def _codec(compression: Compression, quality: int, flavour: Flavour) -> dict:
    """tifffile arguments. JPEG is RGB without chroma subsampling (as Aperio writes it): OpenSlide and tifffile decode
    it to identical pixels. JPEG 2000 in SVS uses Aperio's tag 33005 (which OpenSlide reads); elsewhere the common
    34712, which OpenSlide does not read."""
    if compression == "jpeg":
        args = {"level": quality, "outcolorspace": "RGB"}
        return {"compression": "jpeg", "compressionargs": args, "subsampling": (1, 1)}
    if compression == "jpeg2000":
        return {"compression": 33005 if flavour == "svs" else "jpeg2000", "compressionargs": {"level": quality}}
    return {"compression": "lzw" if compression == "lzw" else "zlib", "predictor": True}


def _label_image(seed: int, height: int) -> np.ndarray:
    """A square slide label with a barcode that encodes the seed."""
    label = np.full((256, 256, 3), 250, np.uint8)
    bits = np.unpackbits(np.frombuffer(seed.to_bytes(8, "little"), np.uint8))
    for i, bit in enumerate(bits):
        label[40:120, 32 + 3 * i : 33 + 3 * i + int(bit)] = 20
    rows = np.arange(height) * 256 // height
    return label[rows][:, rows]


def _write_pyramid(tmp: Path, scene: Scene, info: SlideInfo, spool_dir: Path, workers: int) -> None:
    dims = list(info.level_dimensions)
    (w, h), tile, flavour, mpp = info.dimensions, info.tile_size, info.flavour, info.mpp
    spooled = list(dims)  # SVS also needs a thumbnail level, possibly below the pyramid
    while flavour == "svs" and (len(spooled) < 2 or max(spooled[-1]) > _THUMBNAIL_PX):
        spooled.append((-(-spooled[-1][0] // 4), -(-spooled[-1][1] // 4)))
    spool = _Spool(spooled, spool_dir) if len(spooled) > 1 else None
    tiled = {
        "dtype": np.uint8,
        "photometric": "rgb",
        "tile": (tile, tile),
        "maxworkers": workers,
        "buffersize": 8 * workers * tile * tile * 3,
        **_codec(info.compression, info.quality, flavour),
    }
    stripped = {"photometric": "rgb", "metadata": None, "rowsperstrip": 64}
    codec = {"jpeg": f"JPEG/RGB Q={info.quality}", "jpeg2000": f"J2K/RGB Q={info.quality}"}.get(
        info.compression, info.compression.upper()
    )
    aperio = f"{_APERIO} \r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile})"
    props = f"|AppMag = {round(10 / mpp)}|MPP = {mpp}|Filename = {info.path.name}|ScanScope ID = icmil-pl synthetic"

    def page(level: int) -> dict:
        lw, lh = dims[level]
        if flavour == "svs":
            return {"metadata": None, "description": f"{aperio}{f' -> {lw}x{lh}' if level else ''} {codec}{props}"}
        resolution = {"resolution": (1e4 / mpp * lw / w, 1e4 / mpp * lh / h), "resolutionunit": "CENTIMETER"}
        if level:
            return {"metadata": None, "subfiletype": 1, **resolution}
        if flavour == "tiff":
            return {"metadata": None, **resolution}
        ome = {
            "axes": "YXS",
            "Name": info.path.name,
            "PhysicalSizeX": mpp,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": mpp,
            "PhysicalSizeYUnit": "µm",
        }
        return {"metadata": ome, "subifds": len(dims) - 1, **resolution}

    try:
        with tifffile.TiffWriter(tmp, bigtiff=w * h * 3 > 2**31, ome=flavour == "ome") as tif:
            tif.write(_level0_tiles(scene, spooled, tile, spool), shape=(h, w, 3), **tiled, **page(0))
            if spool:
                spool.finish()
            if flavour == "svs":  # page 1 is the thumbnail, as in Aperio files
                thumb = spool.rows(len(spooled) - 1, 0, spooled[-1][1])
                desc = f"{_APERIO} \r\n{w}x{h} -> {thumb.shape[1]}x{thumb.shape[0]} - {codec}{props}"
                tif.write(thumb, description=desc, **stripped, **_codec("jpeg", 90, flavour))
            for level in range(1, len(dims)):
                lw, lh = dims[level]
                tif.write(_spooled_tiles(spool, level, tile), shape=(lh, lw, 3), **tiled, **page(level))
            if flavour == "svs":
                label = _label_image(info.seed, thumb.shape[0])
                desc = f"{_APERIO}\r\nlabel {label.shape[1]}x{label.shape[0]}"
                tif.write(label, description=desc, subfiletype=1, compression="lzw", **stripped)
                macro = np.concatenate([label, thumb], axis=1)
                desc = f"{_APERIO}\r\nmacro {macro.shape[1]}x{macro.shape[0]}"
                tif.write(macro, description=desc, subfiletype=9, **stripped, **_codec("jpeg", 90, flavour))
    finally:
        if spool:
            spool.close()


def write_slide(
    path: str | os.PathLike,
    spec: CohortSpec = CohortSpec(),
    *,
    seed: int,
    tumour: bool,
    flavour: Flavour | None = None,
    levels: int | None = None,
    workers: int = 1,
    site: Site | None = None,
    mimics: bool = False,
) -> SlideInfo:
    """Write one synthetic slide with `spec`'s size, mpp, tiles and tumour settings atomically (temp name, then
    rename) and return its ground truth. `seed` is the slide's own (64 bits); `flavour` defaults to the first of
    `spec.flavours`.

    flavour "svs": Aperio layout (OpenSlide vendor "aperio"): level 0, a stripped thumbnail, the other levels, a label
    and a macro image. "tiff": generic pyramidal TIFF, levels as reduced-resolution pages, mpp in X/YResolution (per
    cm); OpenSlide reads it as "generic-tiff". "ome": OME-TIFF with the levels as SubIFDs and PhysicalSizeX/Y in um.
    `levels` (default: down to about one tile) sets the pyramid depth; `workers` threads compress tiles (memory grows
    by 8 tiles per worker). A slide of `site` is stained, lit, blurred and compressed as the site's, jittered a little
    (from `seed`); with `mimics`, it holds benign mimics (`spec.mimic_area`, `spec.mimic_kind`, `spec.mimic_extent`).
    """
    flavour = spec.flavours[0] if flavour is None else flavour
    check("seed", isinstance(seed, int) and 0 <= seed < 2**64, "an int in [0, 2**64)", seed)
    check("flavour", flavour in get_args(Flavour), f"one of {get_args(Flavour)}", flavour)
    check("levels", levels is None or (isinstance(levels, int) and 1 <= levels <= 12), "None or 1..12", levels)
    check("workers", isinstance(workers, int) and workers >= 1, "an int >= 1", workers)
    path = Path(path)
    (width, height), tile_size = spec.size, spec.tile_size
    dims = _level_dimensions(width, height, tile_size, levels)
    if site is not None:
        site = site.jittered(np.random.default_rng(np.random.SeedSequence([seed, 11])))
    mimic_area = spec.mimic_area if mimics else None
    scene = cached_scene(
        seed,
        spec.size,
        spec.mpp,
        bool(tumour),
        spec.tumour_contrast,
        spec.tumour_area,
        spec.tumour_types,
        site,
        mimic_area,
        spec.mimic_kind,
        spec.tumour_cellularity,
        spec.mimic_extent,
    )
    info = SlideInfo(
        path=path,
        seed=seed,
        dimensions=spec.size,
        mpp=spec.mpp,
        tumour=bool(tumour),
        tumour_contrast=spec.tumour_contrast,
        tumour_area=spec.tumour_area,
        flavour=flavour,
        compression=spec.compression,
        quality=spec.quality if site is None else site.quality,
        tile_size=tile_size,
        level_dimensions=tuple(dims),
        tissue_fraction=scene.tissue_fraction,
        tumour_regions=scene.tumour_regions,
        tumour_types=spec.tumour_types,
        site=site,
        mimic_area=mimic_area,
        mimic_regions=scene.mimic_regions,
        mimic_kind=spec.mimic_kind,
        tumour_cellularity=spec.tumour_cellularity,
        mimic_extent=spec.mimic_extent,
    )
    with atomic_path(path) as tmp, tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as spool:
        _write_pyramid(tmp, scene, info, Path(spool), workers)
    return info
