"""One bag's exact gradient over several processes (gloo, on the CPU): `bag_backward_sharded` on 2 processes leaves
every process's `.grad` equal to single-process `bag_backward`'s, for a CNN and a ViT with LoRA, in float64."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_chunked import GatedAttention, make_embedder
from test_finetune import HEAD, tiny_vit

from icmil_pl.aggregators import ABMIL
from icmil_pl.chunked import bag_backward, bag_backward_sharded
from icmil_pl.encoders import LoRA

N, CHUNK = 11, 2  # 6 chunks: 3 on each of 2 processes, the last one short


def _cnn() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    embedder, head = make_embedder(dropout=0.3).double(), GatedAttention().double()
    embedder.train()  # dropout live; BatchNorm in eval: its running statistics would see each process's chunks only
    for m in embedder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    return embedder, head, torch.randn(N, 3, 16, 16, dtype=torch.float64)


def _vit() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    embedder = tiny_vit(LoRA(rank=4)).double()
    embedder.start_finetune().eval()
    for name, p in embedder.named_parameters():  # B starts at 0, which would hide A's gradient
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    torch.manual_seed(1)
    head = ABMIL(**HEAD).double()
    return embedder, head, torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8)


MODELS = {"cnn": _cnn, "vit_lora": _vit}


def _grads(model: str, sharded: bool, chunk_seed: int | None) -> dict[str, torch.Tensor]:
    embedder, head, patches = MODELS[model]()
    target = torch.tensor(1)

    def bag_loss(h: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        logits = getattr(logits, "logits", logits)
        return torch.nn.functional.cross_entropy(logits.reshape(1, -1), target.reshape(1))

    torch.manual_seed(7)  # the caller's stream: the same on every process
    run = bag_backward_sharded if sharded else bag_backward
    run(embedder, bag_loss, patches, CHUNK, chunk_seed=chunk_seed)
    named = [*embedder.named_parameters(), *(("head." + n, p) for n, p in head.named_parameters())]
    return {name: p.grad.clone() for name, p in named if p.grad is not None}


def _worker(rank: int, world: int, port: int, model: str, chunk_seed: int | None, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out[rank] = _grads(model, sharded=True, chunk_seed=chunk_seed)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded(model: str, chunk_seed: int | None, world: int = 2) -> dict[int, dict[str, torch.Tensor]]:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), model, chunk_seed, out), nprocs=world)
        return dict(out)


@pytest.mark.parametrize("model", list(MODELS))
def test_every_process_holds_the_single_process_gradient(model):
    """The CNN with live dropout and a per-bag chunk seed; the ViT + LoRA deterministic (no seed needed)."""
    seed = 5 if model == "cnn" else None
    alone = _grads(model, sharded=False, chunk_seed=seed)
    assert any("lora_A" in k for k in alone) or model == "cnn"
    for rank, grads in _sharded(model, seed).items():
        assert grads.keys() == alone.keys(), rank
        for name in alone:
            torch.testing.assert_close(grads[name], alone[name], rtol=0, atol=1e-10, msg=f"rank {rank}: {name}")


def test_a_chunk_seed_makes_the_masks_the_bag_s_and_the_chunk_s():
    """With dropout, a chunk's masks follow its seed: another seed, another gradient; the same seed, the same one."""
    a, b, c = (_grads("cnn", sharded=False, chunk_seed=s) for s in (5, 5, 6))
    assert all(torch.equal(a[k], b[k]) for k in a) and any(not torch.allclose(a[k], c[k]) for k in a)
