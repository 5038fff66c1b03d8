"""GPU figures for foundation-model MIL, in one run of a few minutes on one CUDA GPU (random weights, bf16):

1. extraction: patches/s of a ViT-L/16 (the `uni` preset: UNI-sized) embedding a generated slide through
   `PatchDataset` and DataLoader workers, against embedding the same patches already decoded on the GPU (the model's
   own ceiling), and their ratio;
2. end to end with LoRA (rank 8 on every block's qkv / proj / fc1 / fc2) and an ABMIL head: peak GPU memory and
   seconds per bag of the chunked exact backward at 4096 and 16384 patches (with and without activation
   checkpointing inside the ViT), against the plain full-bag backward where it fits (out-of-memory is reported, not
   fatal).

    python benchmarks/bench_gpu.py                 # on a machine without CUDA it says so and exits 0
    python benchmarks/bench_gpu.py --smoke         # the same code path on the CPU with tiny sizes (a check)

Imports only torch, timm, peft, tifffile, scipy, scikit-image, pytorch_lightning and this project (no zarr, no
imagecodecs: the slide is written with deflate tiles).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

GB = 1024**3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def embedder_for(args: argparse.Namespace, finetune=None, grad_checkpointing: bool = False):
    from icmil_pl.encoders import PatchEmbedder

    if args.smoke:  # a ViT of a few layers, same code path
        kwargs = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
        return PatchEmbedder(
            "vit_small_patch16_224", model_kwargs=kwargs, finetune=finetune, grad_checkpointing=grad_checkpointing
        )
    return PatchEmbedder("uni", finetune=finetune, grad_checkpointing=grad_checkpointing)


def extraction(args: argparse.Namespace, device: torch.device) -> None:
    from torch.utils.data import DataLoader

    from data_modules.datasets.patches import PatchDataset
    from data_modules.slides.tiling import SlidePatches, patch_grid
    from data_modules.synthetic import CohortSpec, make_cohort

    side = 2048 if args.smoke else args.slide_px
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        spec = CohortSpec(n_slides=1, seed=0, size=(side, side), mpp=0.5, flavours=("tiff",), compression="deflate")
        root = make_cohort(Path(tmp), spec)
        path = next((root / "slides").glob("*"))
        grid = patch_grid(path, mpp=0.5, patch_size=256, tissue_threshold=0.1)
        print(f"slide {side}x{side} px written and tiled in {time.perf_counter() - t0:.1f} s: {len(grid)} patches")
        dataset = PatchDataset([SlidePatches("slide", path, grid)])
        embedder = embedder_for(args).to(device).eval()
        amp = torch.autocast(device.type, dtype=torch.bfloat16)
        loader = DataLoader(
            dataset, batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda"
        )

        def from_slide() -> float:
            sync(device)
            start = time.perf_counter()
            with torch.no_grad(), amp:
                for batch in loader:
                    embedder(batch["image"].to(device, non_blocking=True))
            sync(device)
            return len(dataset) / (time.perf_counter() - start)

        decoded = torch.stack([dataset[i]["image"] for i in range(min(len(dataset), args.batch_size * 8))]).to(device)

        def from_tensors() -> float:
            sync(device)
            start = time.perf_counter()
            with torch.no_grad(), amp:
                for a in range(0, len(decoded), args.batch_size):
                    embedder(decoded[a : a + args.batch_size])
            sync(device)
            return len(decoded) / (time.perf_counter() - start)

        from_tensors()  # warm-up: kernels, cudnn autotuning
        slide_rate, tensor_rate = from_slide(), from_tensors()
        print(
            f"extraction, ViT-L/16 bf16, batch {args.batch_size}, {args.workers} workers: from the slide "
            f"{slide_rate:.0f} patches/s, from decoded tensors on the GPU {tensor_rate:.0f} patches/s "
            f"(slide / tensors {slide_rate / tensor_rate:.2f}x)"
        )


def end_to_end(args: argparse.Namespace, device: torch.device) -> None:
    size = 32 if args.smoke else 224
    sizes = [16, 64] if args.smoke else args.sizes
    patches = torch.randint(0, 256, (max(sizes), 3, size, size), dtype=torch.uint8)  # on the CPU, as slides are
    print(f"end to end, bags of {size} px uint8 patches on the CPU, ABMIL head, one step = forward + backward")
    print(f"{'variant':<30}{'N':>7}{'peak GB':>10}{'s/bag':>9}{'patch/s':>9}")
    bag_variant(args, device, patches, [args.full_size, *sizes], "full bag", None, False)
    bag_variant(args, device, patches, sizes, f"chunked {args.chunk}", args.chunk, False)
    bag_variant(args, device, patches, sizes, f"chunked {args.ckpt_chunk} + checkpointing", args.ckpt_chunk, True)


def bag_variant(
    args: argparse.Namespace,
    device: torch.device,
    patches: torch.Tensor,
    sizes: list[int],
    label: str,
    chunk: int | None,
    checkpointing: bool,
) -> None:
    """One training step per bag size (after a warm-up step); `chunk` None is the plain full-bag backward."""
    import torch.nn.functional as F

    from icmil_pl.aggregators import ABMIL
    from icmil_pl.chunked import bag_backward
    from icmil_pl.encoders import LoRA, trainable_parameter_count

    embedder = embedder_for(args, LoRA(rank=8, alpha=16.0), checkpointing).start_finetune().to(device).train()
    head = ABMIL(embedder.feature_dim).to(device)
    if chunk is None:
        total = sum(p.numel() for p in embedder.parameters())
        print(f"  LoRA: {trainable_parameter_count(embedder):,} trainable of {total:,} embedder parameters")
    target = torch.tensor([1], device=device)

    def bag_loss(h: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).logits[None].float(), target)

    def step(n: int) -> None:
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                if chunk is None:
                    bag_loss(embedder(patches[:n].to(device))).backward()
                else:
                    bag_backward(embedder, bag_loss, patches[:n], chunk)
        finally:
            embedder.zero_grad(set_to_none=True)
            head.zero_grad(set_to_none=True)

    step(min(sizes[0], chunk or 64))  # warm-up
    for n in sizes:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        try:
            step(n)
        except torch.OutOfMemoryError:
            print(f"{label:<30}{n:>7}{'out of memory':>19}  (larger bags skipped)")
            return
        sync(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else float("nan")
        print(f"{label:<30}{n:>7}{peak:>10.2f}{seconds:>9.2f}{n / seconds:>9.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script, no figures")
    parser.add_argument("--slide-px", type=int, default=16384, help="side of the generated slide (level 0)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--full-size", type=int, default=512, help="a full bag small enough to fit, for the ratio")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--ckpt-chunk", type=int, default=1024)
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing to measure (run it on a GPU machine, or --smoke to check it)")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.smoke:
        args.batch_size, args.workers, args.full_size, args.chunk, args.ckpt_chunk = 16, 1, 8, 8, 16
    device = torch.device("cpu" if args.smoke else "cuda")
    name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(device)
    print(f"device: {name}; torch {torch.__version__}")
    torch.backends.cuda.matmul.allow_tf32 = True
    start = time.perf_counter()
    extraction(args, device)
    end_to_end(args, device)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    main()
