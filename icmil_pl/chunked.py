"""Exact end-to-end MIL gradients over bags too large for one forward graph.

A bag of N patches goes through the embedder in chunks twice: pass 1 without a graph builds the (N, D) embedding
matrix H, the bag loss and its backward run once on H (aggregator gradients and dL/dH), and pass 2 re-embeds each
chunk with a graph and back-propagates its slice of dL/dH. Peak memory then follows `chunk_size`, not N, and the
gradient is the exact gradient of the loss that pass 1 computed: each chunk replays the random state it saw in
pass 1, so dropout and drop-path draw the same masks.

Pure PyTorch on purpose (no Lightning): `EndToEndMIL` and the ICMIL coupling phase call it from manual optimization.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


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
    embedder: nn.Module, patches: Bag, chunk_size: int, before_read: Callable[[int], None]
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yields (a, b, embedder(patches[a:b])) chunk by chunk, calling `before_read(i)` before chunk i is read.

    The hook runs before the read, not after, so that draws a lazy bag makes (augmentations) are replayed too.
    """
    n = _check_bag(patches, chunk_size)
    device = _device_of(embedder)
    item_shape: torch.Size | None = None
    dim: int | None = None
    for i, a in enumerate(range(0, n, chunk_size)):
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


def bag_backward(
    embedder: nn.Module,
    bag_loss: Callable[[torch.Tensor], torch.Tensor],
    patches: Bag,
    chunk_size: int,
    *,
    scale_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Accumulates into `.grad` the exact gradient of `bag_loss(embedder(patches))` and returns that loss detached.

    `bag_loss` maps the (N, D) embeddings to a scalar (it closes over the aggregator and the target). `scale_loss`
    (e.g. a GradScaler's `scale`) is applied once, to the loss that is back-propagated, so both the aggregator and the
    embedder gradients carry the scale exactly once. Runs in the caller's autocast context. Pass 1 and the loss use
    the global random stream as a plain chunked forward would; afterwards the stream continues from where `bag_loss`
    left it. A lazy bag must return the same patches when read twice (augmentations may draw from torch's global
    generator, which is replayed; other generators are not).
    """
    device = _device_of(embedder)
    states: list[_RandomState] = []
    h = _embed(embedder, patches, chunk_size, lambda i: states.append(_RandomState.capture(device)))
    h.requires_grad_()
    with torch.enable_grad():
        loss = bag_loss(h)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"bag_loss: expected a scalar tensor, got {shape}")
        if not loss.requires_grad:
            raise ValueError("bag_loss: expected a loss computed from the embeddings (with a graph), got a constant")
        after_loss = _RandomState.capture(device)
        (loss if scale_loss is None else scale_loss(loss)).backward()
        grad = h.grad
        del h
        if grad is not None and any(p.requires_grad for p in embedder.parameters()):
            with _frozen_train_buffers(embedder):
                for a, b, out in _embed_chunks(embedder, patches, chunk_size, lambda i: states[i].restore(device)):
                    torch.autograd.backward(out, grad[a:b].to(out.dtype))
    after_loss.restore(device)
    return loss.detach()
