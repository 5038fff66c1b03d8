"""Time and peak memory per process of one bag's exact gradient split over R processes (`bag_backward_sharded`),
against one process (`bag_backward`), measured in one run: the same embedder, head and lazy bag as
`bench_chunked.py` (ResNet-18 on 64 px patches, a gated-attention head), gloo on the CPU or NCCL on GPUs.

Each process count runs in fresh processes; each process is given `--threads` // R torch threads on the CPU (the
cores are shared, so the CPU measures the communication and bookkeeping, not a speed-up; GPUs are one per process).
Reported: seconds per bag (the slowest process, fastest of --steps after one warm-up step) and peak RSS per process.

    python benchmarks/bench_sharded.py [--size 256] [--chunk-size 32] [--processes 1 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_chunked import GatedAttention, SyntheticBag, make_embedder  # noqa: E402

from icmil_pl.chunked import bag_backward, bag_backward_sharded  # noqa: E402


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    torch.set_num_threads(max(1, args.threads // world))
    if world > 1:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    embedder, head = make_embedder("resnet18").to(device).eval(), GatedAttention().to(device)
    bag = SyntheticBag(args.size, 64)

    def bag_loss(h: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h)[None].float(), torch.tensor([1], device=device))

    times = []
    for _ in range(1 + args.steps):
        if args.device == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        if world > 1:
            bag_backward_sharded(embedder, bag_loss, bag, args.chunk_size)
        else:
            bag_backward(embedder, bag_loss, bag, args.chunk_size)
        if args.device == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if args.device == "cuda" else _peak_rss()
    out[rank] = {"seconds": min(times[1:]), "peak": peak}
    if world > 1:
        dist.destroy_process_group()


def _peak_rss() -> int:
    """This process's peak resident memory, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="patches in the bag")
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up; the fastest counts")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the processes")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rows = {}
    for world in args.processes:
        with mp.Manager() as manager:
            out = manager.dict()
            mp.spawn(_worker, args=(world, _free_port(), args, out), nprocs=world)
            rows[world] = {
                "seconds": max(r["seconds"] for r in out.values()),
                "peak": max(r["peak"] for r in out.values()),
            }
    first = rows[args.processes[0]]
    print(f"bag of {args.size} patches, chunks of {args.chunk_size}, {args.device}, {args.threads} threads in all")
    print(f"{'processes':>9} {'s/bag':>8} {'time ratio':>10} {'peak MiB/process':>17} {'memory ratio':>12}")
    for world, row in rows.items():
        print(
            f"{world:>9} {row['seconds']:>8.2f} {row['seconds'] / first['seconds']:>9.2f}x "
            f"{row['peak'] / 2**20:>17.0f} {row['peak'] / first['peak']:>11.2f}x"
        )


if __name__ == "__main__":
    main()
