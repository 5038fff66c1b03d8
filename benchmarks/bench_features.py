"""Two-stage MIL throughput: loading bags from the zarr cache vs `.h5`, and extraction vs embedding alone.

1. Bags per second reading the same features from our zarr cache (float32, and float16: the cache's default) and
   from CLAM-style float32 `.h5` files, through `FeatureCache.read` (what every data module calls), files warm in
   the page cache.
2. Extraction (slide read + tissue patches + embed + cache write, `trainer.predict` with `num_workers` loader
   processes) in patches per second, against the same embedder on the same patches already decoded in memory.

    python benchmarks/bench_features.py --bags 100 --instances 10000 --dim 1024 --patches 256 --workers 2
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from data_modules.datasets.feature_cache import FeatureCache
from data_modules.datasets.patches import SlidePatchDataModule
from data_modules.slides.tiling import TilingConfig
from data_modules.synthetic import CohortSpec, make_cohort
from icmil_pl.callbacks import extract_features
from icmil_pl.encoders import PatchEmbedder


def loading(root: Path, bags: int, instances: int, dim: int) -> None:
    rng = np.random.default_rng(0)
    caches = {dtype: FeatureCache(root / dtype) for dtype in ("float32", "float16")}
    h5_dir = root / "h5"
    h5_dir.mkdir(parents=True)
    for i in range(bags):
        features = rng.normal(size=(instances, dim)).astype(np.float32)
        coords = rng.integers(0, 100_000, (instances, 2)).astype(np.int32)
        for dtype, cache in caches.items():
            writer = cache.writer(f"s{i}", instances, dim, dtype, {})
            writer.append(features, coords)
            writer.commit()
        with h5py.File(h5_dir / f"s{i}.h5", "w") as fh:
            fh["features"], fh["coords"] = features, coords
    folders = {
        "zarr cache float32": caches["float32"].path,
        "zarr cache float16": caches["float16"].path,
        "h5 float32 (CLAM)": h5_dir,
    }
    results = {}
    for name, folder in folders.items():
        cache = FeatureCache.find(folder)  # once per data module, as FeatureBagDataModule does
        for _ in range(2):  # the first pass warms the page cache; the second is timed
            start = time.perf_counter()
            for i in range(bags):
                cache.read(f"s{i}")
            results[name] = bags / (time.perf_counter() - start)
    h5 = results["h5 float32 (CLAM)"]
    print(f"\nloading {bags} bags of {instances} x {dim} (FeatureCache.read, arrays as stored)")
    for name, rate in results.items():
        print(f"  {name:20s} {rate:8.1f} bags/s  {rate / h5:5.2f}x h5")
    print("  target: >= 1.0x h5")


def extraction(root: Path, patches: int, workers: int, backbone: str, truncate: str, patch_size: int) -> None:
    side = int(np.ceil(np.sqrt(patches / 0.35))) * patch_size  # tissue covers ~35-60 % of a synthetic slide
    cohort = make_cohort(root / "cohort", CohortSpec(n_slides=2, seed=0, size=(side, side), mpp=0.5))
    embedder = PatchEmbedder(backbone, truncate_after=truncate).eval()
    data = SlidePatchDataModule(
        str(cohort / "labels.csv"),
        str(cohort / "slides"),
        TilingConfig(mpp=0.5, patch_size=patch_size, tissue_threshold=0.5),
        grid_cache=str(root / "grids"),
        batch_size=32,
        num_workers=workers,
    )
    data.setup()
    n = len(data.dataset())
    decoded = torch.stack([data.dataset()[i]["image"] for i in range(n)])  # the same patches, already in memory

    start = time.perf_counter()
    with torch.inference_mode():
        for batch in decoded.split(32):
            embedder(batch)
    embed_rate = n / (time.perf_counter() - start)

    start = time.perf_counter()
    extract_features(
        embedder,
        data,
        str(root / "features"),
        trainer_kwargs={"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
    )
    extract_rate = n / (time.perf_counter() - start)
    print(f"\nextraction of {n} patches ({patch_size} px, {backbone} cut after {truncate}), {workers} loader workers")
    print(f"  embed only (decoded tensors)  {embed_rate:8.1f} patches/s")
    print(f"  extraction (read + embed + write) {extract_rate:8.1f} patches/s")
    print(f"  ratio: {extract_rate / embed_rate:.2f}x (target >= 0.8)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bags", type=int, default=100)
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument(
        "--patches", type=int, default=256, help="about this many tissue patches are extracted (0: skip)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--truncate-after", default="layer3")
    parser.add_argument("--patch-size", type=int, default=256)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_features_"))
    try:
        loading(root / "loading", args.bags, args.instances, args.dim)
        if args.patches:
            extraction(
                root / "extraction", args.patches, args.workers, args.backbone, args.truncate_after, args.patch_size
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
