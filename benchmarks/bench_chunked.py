"""Peak memory and time per bag of the chunked bag backward against full-bag backward and per-chunk checkpointing.

One training step (forward, loss, backward) of an embedder and a gated-attention ABMIL-like head on one bag. Embedders
(`--embedder`): `resnet18` (timm, random init, BatchNorm in eval mode) on 64x64 patches; `vit_small_lora` and
`vit_small_full` (a `PatchEmbedder` of timm's ViT-S/16 at 224 px, random init, LoRA rank 8 on every block's qkv / proj /
fc1 / fc2, or every weight trained; `--grad-checkpointing` recomputes block activations) on uint8 224x224 patches,
with the trainable parameters and Adam's state bytes of both fine-tuning modes. Each (variant, bag size) runs in a
fresh subprocess so that peak memory (max RSS on CPU, max allocated on CUDA) belongs to that configuration alone.
Patches come from a lazy bag that generates them on demand (a 16384-patch float bag would be 800 MB by itself).

`--variants evaluate` measures evaluation instead (validation, test, predict: no graph): the bag head's output and
every patch's instance logits (what heatmaps draw), after embedding the bag chunk by chunk (`chunked.embed_chunked`),
or with `--features-only D` on an (N, D) feature bag held in memory, as the bag phase reads it from the cache.
`--head` picks the aggregator (`icmil_pl.aggregators`, by name; `TransMIL-nystrom` for the paper's approximation).

Full-bag backward is run only while its estimated peak (its growth above the model's baseline, extrapolated linearly
from the largest size measured so far) fits --budget-gb; the worker also caps its address space on CPU, so a
misestimate reports OOM instead of taking the machine down. Timings are the fastest of --steps steps after one
warm-up step (bags larger than --large warm up on a --warmup-size bag and are timed once), over --rounds rounds.

    python benchmarks/bench_chunked.py [--sizes 256 1024 4096 16384] [--device cpu|cuda] [--precision 32|bf16]
    python benchmarks/bench_chunked.py --embedder vit_small_lora --chunk-size 32 --sizes 64 128 256 1024 8192
    python benchmarks/bench_chunked.py --variants evaluate --sizes 10000 50000 100000 [--features-only 1024] [--head X]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

VARIANTS = ("chunked", "full", "checkpoint", "evaluate")
HEADS = ("gated", "MeanPool", "MaxPool", "ABMIL", "CLAMSB", "DSMIL", "DTFDMIL", "TransMIL", "TransMIL-nystrom")
EMBEDDERS = ("resnet18", "vit_small_lora", "vit_small_full")
PATCH = {"resnet18": 64, "vit_small_lora": 224, "vit_small_full": 224}
GB = 1024**3


class SyntheticBag:
    """Deterministic patches generated on read: smooth per-patch patterns, no storage beyond one chunk (float in
    [-1, 1], or uint8 as slides are read)."""

    def __init__(self, n: int, patch: int = 64, uint8: bool = False) -> None:
        self.n, self.uint8 = n, uint8
        c, y, x = torch.meshgrid(torch.arange(3.0), torch.arange(patch * 1.0), torch.arange(patch * 1.0), indexing="ij")
        self.grid = 1.3 * c + 0.11 * y + 0.07 * x

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: slice) -> torch.Tensor:
        ids = torch.arange(*index.indices(self.n), dtype=torch.float32)
        patches = torch.sin(self.grid + 0.37 * ids[:, None, None, None])
        return ((patches + 1) * 127.5).to(torch.uint8) if self.uint8 else patches


def make_embedder(name: str, grad_checkpointing: bool = False) -> nn.Module:
    import timm

    if name == "resnet18":
        return timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    from icmil_pl.encoders import FullFinetune, LoRA, PatchEmbedder

    finetune = LoRA(rank=8, alpha=16.0) if name == "vit_small_lora" else FullFinetune()
    embedder = PatchEmbedder("vit_small_patch16_224", finetune=finetune, grad_checkpointing=grad_checkpointing)
    return embedder.start_finetune().eval()


def parameter_summary() -> None:
    """Trainable parameters and Adam's state (exp_avg, exp_avg_sq, step) after one step, LoRA vs full fine-tuning;
    for the large presets, built on the meta device, the counts and Adam's float32 state (8 bytes a parameter)."""
    from icmil_pl.encoders import LoRA, PatchEmbedder, trainable_parameter_count

    rows = {}
    for name in ("vit_small_lora", "vit_small_full"):
        embedder = make_embedder(name)
        params = [p for p in embedder.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer = torch.optim.Adam(params)
        optimizer.step()
        state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
        rows[name] = (sum(p.numel() for p in params), sum(p.numel() for p in embedder.parameters()), state)
    for name, (trainable, total, state) in rows.items():
        print(f"  {name}: {trainable:,} trainable of {total:,} parameters, Adam state {state / 2**20:.2f} MiB")
    lora, full = rows["vit_small_lora"], rows["vit_small_full"]
    print(f"  LoRA / full: trainable {lora[0] / full[0]:.4f}x, optimizer state {lora[2] / full[2]:.4f}x")
    for preset in ("uni", "uni2-h", "virchow2", "h-optimus-0"):
        with torch.device("meta"):
            base = sum(p.numel() for p in PatchEmbedder(preset).parameters())
            lora = trainable_parameter_count(PatchEmbedder(preset, finetune=LoRA(rank=8)).start_finetune())
        print(
            f"  {preset} + LoRA rank 8: {lora:,} trainable of {base:,} ({lora / base:.2%}), Adam state "
            f"{8 * lora / 2**20:.0f} MiB vs {8 * base / 2**30:.1f} GiB for full fine-tuning"
        )


class GatedAttention(nn.Module):
    def __init__(self, dim: int = 512, hidden: int = 128, classes: int = 2) -> None:
        super().__init__()
        self.v, self.u, self.w = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, 1)
        self.head = nn.Linear(dim, classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))), dim=0)
        return self.head((a * h).sum(0))


def make_head(name: str, dim: int) -> nn.Module:
    """The bench's own gated-attention head, or one of the project's aggregators (random init, evaluation mode)."""
    if name == "gated":
        return GatedAttention(dim)
    from icmil_pl import aggregators

    family, _, attention = name.partition("-")
    return getattr(aggregators, family)(dim, 2, **({"attention": attention} if attention else {})).eval()


def evaluate(embedder: nn.Module | None, head: nn.Module, bag, chunk: int) -> None:
    """What validation, test and predict do with one bag: embed without a graph (a lazy bag) or take the features,
    then the bag output and the per-patch instance logits."""
    from icmil_pl.chunked import embed_chunked

    with torch.inference_mode():
        h = bag if embedder is None else embed_chunked(embedder, bag, chunk)
        head(h)
        if hasattr(head, "instance_logits"):
            head.instance_logits(h)


def step(variant: str, embedder: nn.Module, head: nn.Module, bag: SyntheticBag, chunk: int, device: torch.device):
    from icmil_pl.chunked import bag_backward

    def bag_loss(h: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h)[None].float(), torch.tensor([1], device=device))

    if variant == "chunked":
        bag_backward(embedder, bag_loss, bag, chunk)
    elif variant == "full":
        bag_loss(embedder(bag[0 : len(bag)].to(device))).backward()
    else:
        from torch.utils.checkpoint import checkpoint

        parts = [
            checkpoint(embedder, bag[a : a + chunk].to(device), use_reentrant=False) for a in range(0, len(bag), chunk)
        ]
        bag_loss(torch.cat(parts)).backward()


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def vm_size_bytes() -> int:
    return _proc_status_bytes("VmSize")


def rss_bytes() -> int:
    return _proc_status_bytes("VmRSS")


def worker(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cpu":  # guard: an allocation past the budget raises instead of swapping the machine to death
        limit = vm_size_bytes() + int(1.5 * args.budget_gb * GB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.manual_seed(0)
    features = args.variant == "evaluate" and args.features_only
    embedder = None if features else make_embedder(args.embedder, args.grad_checkpointing).to(device)
    dim = args.features_only or getattr(embedder, "feature_dim", None) or embedder.num_features
    head = make_head(args.head, dim).to(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    large = args.size > args.large
    patch, uint8 = PATCH[args.embedder], args.embedder != "resnet18"
    warm_size = min(args.warmup_size, args.size) if large else args.size

    def make_bag(n: int):
        if features:  # in float32 as the model reads a cache, made in place (no second copy)
            return torch.empty(n, dim, device=device).uniform_(-1, 1, generator=torch.Generator(device).manual_seed(0))
        return SyntheticBag(n, patch, uint8)

    warmup, steps = make_bag(warm_size), 1 if large else args.steps

    def timed(bag) -> tuple[float, float]:
        """Wall seconds, and this process's CPU seconds (less sensitive to other jobs sharing the cores)."""
        for module in (embedder, head):
            if module is not None:
                module.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        with amp:
            if args.variant == "evaluate":
                evaluate(embedder, head, bag, args.chunk_size)
            else:
                step(args.variant, embedder, head, bag, args.chunk_size, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu_start

    try:
        timed(warmup)
        del warmup
        bag = make_bag(args.size)
        seconds, cpu_seconds = min(timed(bag) for _ in range(steps))
    except (RuntimeError, MemoryError) as err:
        if "memory" not in str(err).lower() and not isinstance(err, MemoryError):
            raise
        return {"status": "OOM"}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "status": "ok",
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "steps": steps,
        "peak_gb": peak / GB,
        "base_gb": base / GB,
        "warmup_size": warm_size,
    }


def run_config(args: argparse.Namespace, variant: str, size: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--variant", variant, "--size", str(size)]
    flags = ("device", "precision", "chunk_size", "steps", "budget_gb", "large", "warmup_size", "embedder", "head")
    for flag in (*flags, "features_only"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    cmd += ["--grad-checkpointing"] if args.grad_checkpointing else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        if proc.returncode in (-9, 137):  # killed by the kernel's OOM killer
            return {"status": "OOM"}
        raise RuntimeError(f"{variant} N={size} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratio(a: dict | None, b: dict | None, key: str) -> str:
    if a is None or b is None or a["status"] != "ok" or b["status"] != "ok":
        return "n/a"
    return f"{a[key] / b[key]:.2f}x"


def main(args: argparse.Namespace) -> None:
    sizes = sorted(args.sizes)
    results: dict[tuple[str, int], dict] = {}
    source = f"features_only={args.features_only}" if args.features_only else f"embedder={args.embedder}"
    print(
        f"{source} head={args.head} device={args.device} precision={args.precision} chunk_size={args.chunk_size} "
        f"patch={PATCH[args.embedder]}px threads={torch.get_num_threads()} budget={args.budget_gb} GB (full bag)"
        + (" grad_checkpointing" if args.grad_checkpointing else "")
    )
    if args.embedder != "resnet18" or args.summary_only:
        parameter_summary()
    if args.summary_only:
        return
    print(f"{'variant':<11}{'N':>7}{'peak GB':>10}{'(base)':>8}{'s/bag':>10}{'cpu s':>9}{'patch/s':>10}  note")
    largest_full: dict | None = None  # sizes ascend, so the full bag's estimate extrapolates from below
    for size in sizes:
        variants = list(args.variants)
        if "full" in variants and largest_full is not None:
            base = largest_full["base_gb"]
            estimate = base + (largest_full["peak_gb"] - base) * size / largest_full["size"]
            if estimate > args.budget_gb:
                variants.remove("full")
                results["full", size] = {"status": "skipped"}
                print(f"{'full':<11}{size:>7}{'OOM/skipped':>20}  estimated {estimate:.1f} GB > budget")
        # Each round runs every variant once, so jobs sharing the machine slow them about equally; fastest kept.
        runs = [{v: run_config(args, v, size) for v in variants} for _ in range(args.rounds)]
        for variant in variants:
            res = min((r[variant] for r in runs), key=lambda r: r.get("seconds", float("inf")))
            results[variant, size] = res
            if res["status"] != "ok":
                print(f"{variant:<11}{size:>7}{'OOM':>20}")
                continue
            if variant == "full":
                largest_full = {**res, "size": size}
            warm, steps = res["warmup_size"], f"{res['steps']} step(s) x {args.rounds} round(s)"
            note = f"fastest of {steps}" if warm == size else f"warm-up on {warm}, {steps}"
            print(
                f"{variant:<11}{size:>7}{res['peak_gb']:>10.2f}{res['base_gb']:>8.2f}{res['seconds']:>10.2f}"
                f"{res['cpu_seconds']:>9.1f}{size / res['seconds']:>10.1f}  {note}"
            )

    lo, hi = sizes[0], sizes[-1]
    if "evaluate" in args.variants:
        peaks = "  ".join(
            f"N={n}: {ratio(results.get(('evaluate', n)), results.get(('evaluate', lo)), 'peak_gb')}" for n in sizes
        )
        print(f"\nevaluation peak memory as a ratio of N={lo}'s: {peaks}")
        if args.variants == ["evaluate"]:
            return
    print(
        f"\nratios (time: wall, in brackets process CPU)\n  chunked peak memory N={hi} / N={lo}: "
        f"{ratio(results.get(('chunked', hi)), results.get(('chunked', lo)), 'peak_gb')}  (target <= 1.25x)"
    )
    for size in sizes:
        chunked, full, ckpt = (results.get((v, size)) for v in ("chunked", "full", "checkpoint"))
        print(
            f"  N={size:<6} chunked/full time {ratio(chunked, full, 'seconds')} ({ratio(chunked, full, 'cpu_seconds')})"
            f" [target <= 1.4x, floor ~4/3]; chunked/checkpoint time {ratio(chunked, ckpt, 'seconds')}"
            f" ({ratio(chunked, ckpt, 'cpu_seconds')}) [target <= 1.0x]; chunked/full peak memory"
            f" {ratio(chunked, full, 'peak_gb')}"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["32", "bf16"], default="32")
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration; the fastest is reported")
    parser.add_argument("--rounds", type=int, default=1, help="fresh subprocesses per configuration; fastest kept")
    parser.add_argument("--budget-gb", type=float, default=8.0, help="full-bag runs only while estimated to fit")
    parser.add_argument("--embedder", choices=EMBEDDERS, default="resnet18")
    parser.add_argument("--head", choices=HEADS, default="gated", help="the bag head (evaluate: any aggregator)")
    parser.add_argument("--features-only", type=int, default=0, metavar="D", help="evaluate on (N, D) features")
    parser.add_argument("--grad-checkpointing", action="store_true", help="ViTs: recompute block activations")
    parser.add_argument("--summary-only", action="store_true", help="print the fine-tuning parameter summary, exit")
    parser.add_argument(
        "--large", type=int, default=4096, help="bags larger than this warm up on a smaller bag and are timed once"
    )
    parser.add_argument("--warmup-size", type=int, default=256, help="the warm-up bag of bags larger than --large")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if any(size < 1 for size in args.sizes) or args.chunk_size < 1 or min(args.steps, args.rounds) < 1:
        parser.error("--sizes, --chunk-size, --steps and --rounds must be >= 1")
    return args


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up when redirected to a log
    arguments = parse_args()
    if arguments.worker:
        print(json.dumps(worker(arguments)))
    else:
        main(arguments)
