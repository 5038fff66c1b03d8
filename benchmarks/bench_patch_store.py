"""Epochs over whole slides with and without the patch store (`data_modules.datasets.patch_store`).

A coupling epoch (ICMIL's `BagGradient`) and an end-to-end epoch do the same per slide: read every patch as a lazy
`SlideBag` and back-propagate the bag loss exactly in chunks (`chunked.bag_backward`) through the demo's embedder
(random-init ResNet-18 cut after layer2) and an ABMIL head; a re-extraction reads every patch once through
`PatchDataset` and embeds it without a graph, and `Distillation`'s epochs read patches drawn at random. Each is
timed here on the demo cohort's slides (96 slides of 2048 px, 64 px patches at 1 um/px: `make demo` writes them)
without the store, then with it: the first training epoch stores the patches as it reads them, the others read them
from there. `--repeats` rounds of all; medians. Ratios are to the same work without the store in the same round
(this machine's speed drifts over minutes).

    python benchmarks/bench_patch_store.py [--slides 32] [--repeats 2] [--chunk-size 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from data_modules.cohort.splits import SplitConfig  # noqa: E402 - imported before any timing
from data_modules.datasets.patch_store import PatchStore  # noqa: E402
from data_modules.datasets.patches import PatchDataset  # noqa: E402
from data_modules.datasets.slide_bags import SlideBag, SlideBagDataModule  # noqa: E402
from data_modules.slides.tiling import TilingConfig  # noqa: E402
from data_modules.synthetic import CohortSpec, make_cohort  # noqa: E402
from icmil_pl.aggregators import ABMIL  # noqa: E402
from icmil_pl.chunked import bag_backward  # noqa: E402
from icmil_pl.encoders import PatchEmbedder  # noqa: E402

DEMO = CohortSpec(n_slides=96, seed=0, size=(2048, 2048), tumour_contrast=0.3, tumour_area=(0.1, 0.2))
TILING = TilingConfig(mpp=1.0, patch_size=64, tissue_threshold=0.5)


def bags(root: str, grids: str, store: str | None, n: int) -> list[SlideBag]:
    data = SlideBagDataModule(
        f"{root}/labels.csv", f"{root}/slides", TILING, grids, read_threads=2, splits=SplitConfig(), patch_store=store
    )
    data.setup("fit")
    return [item["patches"] for item in (data.dataset("train")[i] for i in range(n))]


def epoch(slides: list[SlideBag], embedder: PatchEmbedder, head: ABMIL, chunk: int) -> float:
    """One training epoch over fresh bags (as a coupling epoch gets them); its wall seconds."""
    start = time.perf_counter()
    for k, old in enumerate(slides):
        bag = SlideBag(old.patches, threads=old.threads)
        label = torch.tensor([k % 2])
        bag_backward(embedder, lambda h, y=label: F.cross_entropy(head(h).logits[None], y), bag, chunk)
        embedder.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def extraction(slides: list[SlideBag], embedder: PatchEmbedder, chunk: int, sample: int | None = None) -> float:
    """Every patch read through `PatchDataset` (one patch an item, as extraction's loader reads) and embedded; with
    `sample`, that many patches drawn at random instead (as `Distillation`'s epochs draw them)."""
    start = time.perf_counter()
    dataset = PatchDataset([bag.patches for bag in slides])
    order = np.arange(len(dataset)) if sample is None else np.random.default_rng(0).choice(len(dataset), sample)
    embedder.eval()
    with torch.no_grad():
        for a in range(0, len(order), chunk):
            embedder(torch.stack([dataset[int(i)]["image"] for i in order[a : a + chunk]]))
    embedder.train()
    return time.perf_counter() - start


def reads(plain: list[SlideBag], stored: list[SlideBag]) -> dict[str, float]:
    """Milliseconds a patch of reading alone: decoding runs of patches, and from the store a run, one patch at a time
    through `PatchDataset` (its last chunk kept) and one patch at a time without that."""
    n = sum(len(b) for b in plain)
    out = {}
    start = time.perf_counter()
    for bag in plain:
        SlideBag(bag.patches, threads=bag.threads)[0 : len(bag)]
    out["decoding runs of patches"] = time.perf_counter() - start
    start = time.perf_counter()
    for bag in stored:
        SlideBag(bag.patches)[0 : len(bag)]
    out["the store, runs of patches"] = time.perf_counter() - start
    dataset = PatchDataset([bag.patches for bag in stored])
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    out["the store, one patch a call, in order"] = time.perf_counter() - start
    arrays = [PatchStore(bag.patches.patch_store).open(bag.patches, "bilinear") for bag in stored]
    start = time.perf_counter()
    for array in arrays:
        for i in range(array.shape[0]):
            array[i]
    out["the store, one patch a zarr read"] = time.perf_counter() - start
    return {k: v / n * 1e3 for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--root", default="data/demo")
    args = parser.parse_args()
    make_cohort(args.root, DEMO)
    torch.manual_seed(0)
    embedder = PatchEmbedder("resnet18", truncate_after="layer2")
    head = ABMIL(embedder.feature_dim, 2)
    names = ("decode", "fill", "store", "x_decode", "x_store", "s_decode", "s_store")
    times: dict[str, list[float]] = {k: [] for k in names}
    with tempfile.TemporaryDirectory() as tmp:
        grids = f"{tmp}/grids"
        plain = bags(args.root, grids, None, args.slides)
        patches = sum(len(b) for b in plain)
        for r in range(args.repeats):
            store = f"{tmp}/store{r}"
            stored = bags(args.root, grids, store, args.slides)
            times["decode"].append(epoch(plain, embedder, head, args.chunk_size))
            times["fill"].append(epoch(stored, embedder, head, args.chunk_size))
            times["store"].append(epoch(stored, embedder, head, args.chunk_size))
            times["x_decode"].append(extraction(plain, embedder, args.chunk_size))
            times["x_store"].append(extraction(stored, embedder, args.chunk_size))
            times["s_decode"].append(extraction(plain, embedder, args.chunk_size, patches // 2))
            times["s_store"].append(extraction(stored, embedder, args.chunk_size, patches // 2))
        size = sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file())
        alone = reads(plain, stored)
    med = {k: float(np.median(v)) for k, v in times.items()}

    def ratio(k: str, base: str) -> float:
        return float(np.median(np.array(times[k]) / np.array(times[base])))

    print(
        f"{args.slides} slides, {patches} patches of 64 px, chunk {args.chunk_size}, threads={torch.get_num_threads()}"
        f", {args.repeats} rounds (medians); the store: {size / 2**20:.1f} MiB, {size / patches / 1024:.1f} KiB a patch"
    )
    rows = [
        ("training epoch, decoding the slides", "decode", "decode"),
        ("training epoch, storing as it decodes", "fill", "decode"),
        ("training epoch, reading the store", "store", "decode"),
        ("re-extraction, decoding the slides", "x_decode", "x_decode"),
        ("re-extraction, reading the store", "x_store", "x_decode"),
        ("half as many random patches, decoding", "s_decode", "s_decode"),
        ("half as many random patches, from the store", "s_store", "s_decode"),
    ]
    print(f"{'':44} {'seconds':>8} {'ratio':>7}")
    for text, key, base in rows:
        print(f"{text:44} {med[key]:>8.2f} {ratio(key, base):>6.2f}x")
    print("reading alone, ms a patch:")
    for text, ms in alone.items():
        print(f"  {text:42} {ms:>8.3f}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
