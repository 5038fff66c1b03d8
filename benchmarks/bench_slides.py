"""Slide reading throughput: `Slide.read_region` vs OpenSlide vs decoding the same JPEG tiles directly.

`tiff`: one generated JPEG-tiled SVS, the same random 256 x 256 level-0 regions for every reader, single-threaded.
Prints patches/s for each and the ratios the foundation issue targets (>= 1.0x OpenSlide, >= 0.8x raw decode), then
times tissue detection + patch grid for the slide.

`dicom`: a generated slide re-written as a DICOM WSI series (one JPEG-framed instance per level), read through
`open_slide` (its OpenSlide backend) and through OpenSlide directly, the same regions for both in alternating rounds
(target: within 5 %).

    python benchmarks/bench_slides.py --size 50000 --patches 2000 --dicom-size 16384
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import tifffile

from data_modules.slides import open_slide
from data_modules.slides.tiling import patch_grid
from data_modules.synthetic import CohortSpec, write_slide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=50_000, help="slide width and height in pixels")
    parser.add_argument("--patches", type=int, default=2000, help="random 256 x 256 reads per reader")
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--data", type=Path, default=Path("data/bench"), help="where the generated slide is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--formats", nargs="+", choices=("tiff", "dicom"), default=["tiff", "dicom"])
    parser.add_argument("--dicom-size", type=int, default=16384, help="width and height of the DICOM slide")
    args = parser.parse_args()
    if "tiff" in args.formats:
        _bench_tiff(args)
    if "dicom" in args.formats:
        _bench_dicom(args)


def _bench_tiff(args: argparse.Namespace) -> None:
    path = args.data / f"bench_{args.size}.svs"
    if not path.exists():
        args.data.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        write_slide(
            path,
            CohortSpec(size=(args.size, args.size), compression="jpeg"),
            seed=args.seed,
            tumour=True,
            flavour="svs",
        )
        print(f"generated {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - start:.0f} s")
    _warm_page_cache(path)

    ps = args.patch_size
    rng = np.random.default_rng(args.seed)
    coords = rng.integers(0, args.size - ps, size=(args.patches, 2))

    results = {
        "icmil_pl Slide.read_region": _time(lambda: _ours(path, coords, ps)),
        "OpenSlide read_region": _time(lambda: _openslide(path, coords, ps)),
        "raw tile decode (imagecodecs)": _time(lambda: _raw(path, coords, ps)),
    }
    print(f"\n{args.patches} random {ps}x{ps} level-0 reads on a {args.size}x{args.size} JPEG-tiled SVS, 1 thread")
    print(f"{'reader':32s} {'patches/s':>10s}")
    for name, seconds in results.items():
        print(f"{name:32s} {args.patches / seconds:10.0f}")
    ours, osl, raw = results.values()
    print(f"\nratio vs OpenSlide: {osl / ours:.2f}x (target >= 1.0)")
    print(f"ratio vs raw decode limit: {raw / ours:.2f}x (target >= 0.8)")

    start = time.perf_counter()
    grid = patch_grid(path, mpp=0.5, patch_size=256, tissue_threshold=0.5)
    print(f"\ntissue detection + grid: {time.perf_counter() - start:.2f} s, {len(grid)} patches of 256 px at 0.5 um/px")


def _bench_dicom(args: argparse.Namespace) -> None:
    from data_modules.synthetic.dicom import dicom_from_slide

    folder = args.data / f"bench_dicom_{args.dicom_size}"
    if not folder.is_dir():
        args.data.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        source = args.data / f"bench_dicom_{args.dicom_size}.svs"
        write_slide(source, CohortSpec(size=(args.dicom_size,) * 2, compression="jpeg"), seed=args.seed, tumour=True)
        tmp = folder.with_name(folder.name + ".tmp")
        dicom_from_slide(source, tmp)
        tmp.rename(folder)
        source.unlink()
        print(f"generated {folder} in {time.perf_counter() - start:.0f} s")
    instance = sorted(folder.glob("*.dcm"))[0]
    for path in folder.glob("*.dcm"):
        _warm_page_cache(path)
    ps = args.patch_size
    coords = np.random.default_rng(args.seed).integers(0, args.dicom_size - ps, size=(args.patches, 2))
    _openslide(instance, coords[:50], ps)  # warm-up: OpenSlide's first open indexes the series
    # the two readers take turns over five rounds of the regions, so drift in the machine's speed hits both alike
    results = {"icmil_pl Slide.read_region": 0.0, "OpenSlide read_region": 0.0}
    for part in np.array_split(coords, 5):
        results["icmil_pl Slide.read_region"] += _time(_ours, folder, part, ps)
        results["OpenSlide read_region"] += _time(_openslide, instance, part, ps)
    print(
        f"\n{args.patches} random {ps}x{ps} level-0 reads on a {args.dicom_size}x{args.dicom_size} DICOM WSI, 1 thread,"
        " 5 alternating rounds"
    )
    print(f"{'reader':32s} {'patches/s':>10s}")
    for name, seconds in results.items():
        print(f"{name:32s} {args.patches / seconds:10.0f}")
    ours, osl = results.values()
    print(f"\nratio vs OpenSlide: {osl / ours:.3f}x (target >= 0.95)")


def _time(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _ours(path: Path, coords: np.ndarray, ps: int) -> None:
    with open_slide(path) as slide:
        for x, y in coords:
            slide.read_region((int(x), int(y)), 0, (ps, ps))


def _openslide(path: Path, coords: np.ndarray, ps: int) -> None:
    slide = openslide.OpenSlide(str(path))
    for x, y in coords:
        np.asarray(slide.read_region((int(x), int(y)), 0, (ps, ps)).convert("RGB"))
    slide.close()


def _raw(path: Path, coords: np.ndarray, ps: int) -> None:
    """The floor: read and decode exactly the tiles each region touches, nothing else."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        tw, th = page.tilewidth, page.tilelength
        cols = math.ceil(page.imagewidth / tw)
        offsets, counts, tables = page.dataoffsets, page.databytecounts, page.jpegtables
    fd = os.open(path, os.O_RDONLY)
    try:
        for x, y in coords:
            for ty in range(y // th, (y + ps - 1) // th + 1):
                for tx in range(x // tw, (x + ps - 1) // tw + 1):
                    i = ty * cols + tx
                    imagecodecs.jpeg8_decode(os.pread(fd, counts[i], offsets[i]), tables=tables)
    finally:
        os.close(fd)


def _warm_page_cache(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(64 << 20):
            pass


if __name__ == "__main__":
    main()
