"""Exact end-to-end MIL gradients over bags too large for one forward graph.

A bag of N patches goes through the embedder in chunks twice: pass 1 without a graph builds the (N, D) embedding
matrix H, the bag loss and its backward run once on H (aggregator gradients and dL/dH), and pass 2 re-embeds each
chunk with a graph and back-propagates its slice of dL/dH. Peak memory then follows `chunk_size`, not N, and the
gradient is the exact gradient of the loss that pass 1 computed: each chunk replays the random state it saw in
pass 1, so dropout and drop-path draw the same masks.

Pure PyTorch on purpose (no Lightning): `EndToEndMIL` and the ICMIL coupling phase call it from manual optimization.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Bag", "LazyBag", "bag_backward", "bag_backward_sharded", "embed_chunked"]

# exchanged between processes as a number: every process's (N, D) matrix must share the dtype of the embeddings
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class LazyBag(Protocol):
    """A bag read on demand, e.g. patches cut from a slide: `bag[a:b]` returns an (b - a, C, H, W) tensor."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: slice, /) -> torch.Tensor: ...


Bag = torch.Tensor | LazyBag


@dataclass(frozen=True)
class _RandomState:
    """The generators a chunk may draw from: the CPU one, and the embedder's accelerator one when it has one."""

    cpu: torch.Tensor
    accelerator: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> _RandomState:
        accelerator = None
        if device.type != "cpu":
            accelerator = torch.get_device_module(device).get_rng_state(device)
        return cls(torch.get_rng_state(), accelerator)

    def restore(self, device: torch.device) -> None:
        torch.set_rng_state(self.cpu)
        if self.accelerator is not None:
            torch.get_device_module(device).set_rng_state(self.accelerator, device)


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def _check_bag(patches: Bag, chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
    if isinstance(patches, torch.Tensor) and patches.ndim < 2:
        raise ValueError(f"patches: expected an (N, C, H, W) tensor, got shape {tuple(patches.shape)}")
    if not (hasattr(patches, "__len__") and hasattr(patches, "__getitem__")):
        kind = type(patches).__name__
        raise ValueError(f"patches: expected a tensor or a lazy bag with len() and slicing, got {kind}")
    n = len(patches)
    if n == 0:
        raise ValueError("patches: expected a non-empty bag, got 0 instances")
    return n


def _read(patches: Bag, a: int, b: int, item_shape: torch.Size | None, device: torch.device) -> torch.Tensor:
    """Reads patches[a:b] onto `device`, checking it holds b - a items shaped like the first chunk's."""
    chunk = patches[a:b]
    if not isinstance(chunk, torch.Tensor):
        raise ValueError(f"patches[{a}:{b}]: expected a tensor, got {type(chunk).__name__}")
    expected = (b - a, *(chunk.shape[1:] if item_shape is None else item_shape))
    if tuple(chunk.shape) != expected:
        raise ValueError(f"patches[{a}:{b}]: expected shape {expected} like the first chunk, got {tuple(chunk.shape)}")
    if device.type == "cuda" and chunk.device.type == "cpu" and not chunk.is_pinned():
        chunk = chunk.pin_memory()
    return chunk.to(device, non_blocking=True)


def _check_embedding(out: torch.Tensor, a: int, b: int, dim: int | None) -> None:
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != b - a:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"embedder output for patches[{a}:{b}]: expected shape ({b - a}, D), got {shape}")
    if dim is not None and out.shape[1] != dim:
        raise ValueError(
            f"embedder output for patches[{a}:{b}]: expected D={dim} like the first chunk, got {out.shape[1]}"
        )


def _embed_chunks(
    embedder: nn.Module,
    patches: Bag,
    chunk_size: int,
    before_read: Callable[[int], None],
    chunks: Sequence[int] | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yields (a, b, embedder(patches[a:b])) chunk by chunk (`chunks`: these chunk indices only), calling
    `before_read(i)` before chunk i is read.

    The hook runs before the read, not after, so that draws a lazy bag makes (augmentations) are replayed too.
    """
    n = _check_bag(patches, chunk_size)
    device = _device_of(embedder)
    item_shape: torch.Size | None = None
    dim: int | None = None
    for i in range(math.ceil(n / chunk_size)) if chunks is None else chunks:
        a = i * chunk_size
        b = min(a + chunk_size, n)
        before_read(i)
        chunk = _read(patches, a, b, item_shape, device)
        item_shape = chunk.shape[1:]
        out = embedder(chunk)
        _check_embedding(out, a, b, dim)
        dim = out.shape[1]
        yield a, b, out


def _embed(embedder: nn.Module, patches: Bag, chunk_size: int, before_read: Callable[[int], None]) -> torch.Tensor:
    h: torch.Tensor | None = None
    with torch.no_grad():
        for a, b, out in _embed_chunks(embedder, patches, chunk_size, before_read):
            if h is None:
                h = out.new_empty((len(patches), out.shape[1]))
            h[a:b] = out
    assert h is not None
    return h


def embed_chunked(embedder: nn.Module, patches: Bag, chunk_size: int) -> torch.Tensor:
    """Embeds a bag chunk by chunk without a graph (evaluation), returning (N, D) on the embedder's device."""
    return _embed(embedder, patches, chunk_size, lambda i: None)


@contextmanager
def _frozen_train_buffers(embedder: nn.Module) -> Iterator[None]:
    """Keeps the buffers of train-mode modules as they are on entry.

    Pass 2 replays forwards that pass 1 already made, so anything a forward writes into a buffer (BatchNorm running
    mean/var and num_batches_tracked, InstanceNorm with tracked stats, a custom EMA) would be written twice. Snapshot
    and restore covers every such module, not just the BatchNorm classes we know, costs one copy of those buffers
    per bag (kilobytes for a ResNet) and nothing for an eval-mode embedder, and leaves the forward itself untouched.
    """
    buffers = [buf for m in embedder.modules() if m.training for buf in m.buffers(recurse=False)]
    with torch.no_grad():
        saved = [buf.clone() for buf in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in zip(buffers, saved, strict=True):
                buf.copy_(value)


def _seeded(chunk_seed: int) -> Callable[[int], None]:
    """Seeds torch's generators for chunk i from one bag seed: the masks a chunk draws then depend on the bag and the
    chunk alone, so any process that embeds it, in either pass, draws the same."""
    return lambda i: torch.manual_seed((chunk_seed * 1_000_003 + i) % 2**63)


def _loss_and_grad(
    h: torch.Tensor,
    bag_loss: Callable[[torch.Tensor], torch.Tensor],
    scale_loss: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The bag loss on the (N, D) embeddings, back-propagated once (aggregator gradients), and dL/dH."""
    h.requires_grad_()
    with torch.enable_grad():
        loss = bag_loss(h)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"bag_loss: expected a scalar tensor, got {shape}")
        if not loss.requires_grad:
            raise ValueError("bag_loss: expected a loss computed from the embeddings (with a graph), got a constant")
        (loss if scale_loss is None else scale_loss(loss)).backward()
    return loss.detach(), h.grad


def bag_backward(
    embedder: nn.Module,
    bag_loss: Callable[[torch.Tensor], torch.Tensor],
    patches: Bag,
    chunk_size: int,
    *,
    scale_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk_seed: int | None = None,
) -> torch.Tensor:
    """Accumulates into `.grad` the exact gradient of `bag_loss(embedder(patches))` and returns that loss detached.

    `bag_loss` maps the (N, D) embeddings to a scalar (it closes over the aggregator and the target). `scale_loss`
    (e.g. a GradScaler's `scale`) is applied once, to the loss that is back-propagated, so both the aggregator and the
    embedder gradients carry the scale exactly once. Runs in the caller's autocast context. Pass 1 and the loss use
    the global random stream as a plain chunked forward would; afterwards the stream continues from where `bag_loss`
    left it. A lazy bag must return the same patches when read twice (augmentations may draw from torch's global
    generator, which is replayed; other generators are not). With `chunk_seed`, each chunk draws from generators
    seeded by the bag's seed and its index instead, and the loss from the caller's stream as it was on entry: the
    gradient then equals `bag_backward_sharded`'s with that seed, on any number of processes.
    """
    device = _device_of(embedder)
    states: list[_RandomState] = []
    on_entry = _RandomState.capture(device)
    first = _seeded(chunk_seed) if chunk_seed is not None else lambda i: states.append(_RandomState.capture(device))
    h = _embed(embedder, patches, chunk_size, first)
    if chunk_seed is not None:
        on_entry.restore(device)
    with torch.enable_grad():
        loss, grad = _loss_and_grad(h, bag_loss, scale_loss)
        after_loss = _RandomState.capture(device)
        del h
        again = _seeded(chunk_seed) if chunk_seed is not None else lambda i: states[i].restore(device)
        if grad is not None and any(p.requires_grad for p in embedder.parameters()):
            with _frozen_train_buffers(embedder):
                for a, b, out in _embed_chunks(embedder, patches, chunk_size, again):
                    torch.autograd.backward(out, grad[a:b].to(out.dtype))
    after_loss.restore(device)
    return loss


def bag_backward_sharded(
    embedder: nn.Module,
    bag_loss: Callable[[torch.Tensor], torch.Tensor],
    patches: Bag,
    chunk_size: int,
    group: dist.ProcessGroup | None = None,
    *,
    scale_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk_seed: int | None = None,
) -> torch.Tensor:
    """`bag_backward` of one bag spread over the processes of `group` (default: every process), each holding the
    same bag and the same modules: process r embeds chunks r, r + R, ... without a graph; the (N, D) matrix is summed
    across processes (each row from the one process that embedded it, so the sum is exact); every process computes
    the bag loss and dL/dH on it (its aggregator gradients are then the same everywhere); each re-embeds its own
    chunks with a graph, and the embedder gradients of all chunks are summed across processes once, then added to
    `.grad`. Afterwards every process's `.grad` equals single-process `bag_backward`'s: exactly (in float64) for a
    deterministic embedder; with dropout, when both are given the same `chunk_seed`, which makes a chunk's masks
    independent of which process embeds it. Memory per process: its chunks' activations plus N x D; time about
    1/R of one process's. Train-mode BatchNorm statistics see each process's chunks only, as under DDP without
    SyncBatchNorm. The caller's random stream must be the same on every process (the loss draws from it).
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = _check_bag(patches, chunk_size)
    device = _device_of(embedder)
    mine = [i for i in range(math.ceil(n / chunk_size)) if i % world == rank]
    on_entry = _RandomState.capture(device)
    states: dict[int, _RandomState] = {}
    chunk_seeded = _seeded(chunk_seed) if chunk_seed is not None else None
    first = chunk_seeded or (lambda i: states.__setitem__(i, _RandomState.capture(device)))
    h: torch.Tensor | None = None
    with torch.no_grad():
        for a, b, out in _embed_chunks(embedder, patches, chunk_size, first, mine) if mine else ():
            if h is None:
                h = out.new_zeros((n, out.shape[1]))
            h[a:b] = out
    meta = torch.tensor([0, 0] if h is None else [h.shape[1], _DTYPES.index(h.dtype) + 1], device=device)
    dist.all_reduce(meta, dist.ReduceOp.MAX, group)  # a process without a chunk learns D and the dtype
    if h is None:
        h = torch.zeros((n, int(meta[0])), dtype=_DTYPES[int(meta[1]) - 1], device=device)
    dist.all_reduce(h, dist.ReduceOp.SUM, group)
    on_entry.restore(device)  # the loss draws alike on every process
    loss, grad = _loss_and_grad(h, bag_loss, scale_loss)
    after_loss = _RandomState.capture(device)
    del h
    params = [p for p in embedder.parameters() if p.requires_grad]
    if grad is not None and params:
        summed = [torch.zeros_like(p) for p in params]
        used = torch.zeros(len(params), device=device)  # a parameter no chunk reaches keeps `.grad` None, as alone
        again = chunk_seeded or (lambda i: states[i].restore(device))
        with torch.enable_grad(), _frozen_train_buffers(embedder):
            for a, b, out in _embed_chunks(embedder, patches, chunk_size, again, mine):
                grads = torch.autograd.grad(out, params, grad[a:b].to(out.dtype), allow_unused=True)
                for k, (total, g) in enumerate(zip(summed, grads, strict=True)):
                    if g is not None:
                        total += g
                        used[k] = 1
        dist.all_reduce(used, dist.ReduceOp.MAX, group)
        for dtype in {t.dtype for t in summed}:  # one collective per dtype: the gradients flattened
            same = [t for t in summed if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1) for t in same])
            dist.all_reduce(flat, dist.ReduceOp.SUM, group)
            for t, part in zip(same, flat.split([t.numel() for t in same]), strict=True):
                t.copy_(part.view_as(t))
        for p, g, reached in zip(params, summed, used.tolist(), strict=True):
            if reached:
                p.grad = g if p.grad is None else p.grad + g
    after_loss.restore(device)
    return loss
