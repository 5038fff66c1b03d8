"""Samplers whose order is a function of where a run is (seed, epoch, rank), never of how it got there."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, Sampler

from .claims import SlideClaims

__all__ = ["EpochShuffle", "SlideShardSampler", "balanced_owners", "evaluation_sampler"]


class EpochShuffle(Sampler[int]):
    """A permutation of range(n) that is a function of (seed, epoch) only: a run resumed from a checkpoint at epoch k
    sees the orders an uninterrupted run would (a seeded `torch.Generator` would restart from epoch 0's order).
    Lightning calls `set_epoch` before each training epoch (and under DDP shards this sampler per process)."""

    def __init__(self, n: int, seed: int, epoch: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())

    def __len__(self) -> int:
        return self.n


def evaluation_sampler(dataset: Dataset, trainer: pl.Trainer | None) -> Sampler | None:
    """Under DDP each process evaluates every world_size-th item, none twice: Lightning's default sampler would pad
    with repeated slides, which metrics and predictions.csv would count twice. None (in order) on one process."""
    if trainer is None or trainer.world_size <= 1:
        return None
    return UnrepeatedDistributedSampler(
        dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
    )


def balanced_owners(sizes: list[int], parts: int) -> list[int]:
    """Which of `parts` shares each item goes to, balancing the sum of `sizes` (largest first to the lightest share;
    ties to the lower share): the same answer in every process that has the same sizes."""
    loads = [0] * parts
    owners = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        owner = owners[index] = loads.index(min(loads))
        loads[owner] += sizes[index]
    return owners


class SlideShardSampler(Sampler[int]):
    """Whole slides per process (balanced by patch count), in order: each rank writes complete slides under DDP.

    `dataset` is a `PatchDataset` (anything with `slide_ranges()`). With `claims`, a slide is served only once this
    process holds its claim (taken as the loader reaches it, in the main process), so that extractions running at
    once on one cache each embed different slides; `len` then counts every slide this rank could get."""

    def __init__(self, dataset, rank: int = 0, world_size: int = 1, claims: SlideClaims | None = None) -> None:
        ranges = dataset.slide_ranges()
        owners = balanced_owners([end - start for _, start, end in ranges], world_size)
        self.slides = [r for r, owner in zip(ranges, owners, strict=True) if owner == rank]
        self.claims = claims
        self.num_slides = len(self.slides)

    def __iter__(self):
        for slide_id, start, end in self.slides:
            if self.claims is None or self.claims.claim(slide_id):
                yield from range(start, end)

    def __len__(self) -> int:
        return sum(end - start for _, start, end in self.slides)
