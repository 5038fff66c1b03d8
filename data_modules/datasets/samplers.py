"""Samplers whose order is a function of where a run is (seed, epoch, rank), never of how it got there."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, Sampler

__all__ = ["EpochShuffle", "SlideShardSampler", "evaluation_sampler"]


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


class SlideShardSampler(Sampler[int]):
    """Whole slides per process (balanced by patch count), in order: each rank writes complete slides under DDP.

    `dataset` is a `PatchDataset` (anything with `slide_ranges()`)."""

    def __init__(self, dataset, rank: int = 0, world_size: int = 1) -> None:
        loads = [0] * world_size
        mine: list[tuple[int, int]] = []
        for _, start, end in sorted(dataset.slide_ranges(), key=lambda r: r[1] - r[2]):  # largest first
            owner = loads.index(min(loads))
            loads[owner] += end - start
            if owner == rank:
                mine.append((start, end))
        self.indices = [i for start, end in sorted(mine) for i in range(start, end)]
        self.num_slides = len(mine)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
