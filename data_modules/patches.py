"""Patches of many slides as a map-style dataset: one sample = one patch, slides opened lazily in each worker."""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .slides import Resample, Slide, open_slide
from .cohort import SlideCohort, TilingConfig
from .tiling import SlidePatches

__all__ = ["PatchDataset", "SlidePatchDataModule", "SlidePatches", "SlideShardSampler"]


class PatchDataset(Dataset):
    """Patches of `slides` as uint8 (C, H, W) tensors with their slide id and level-0 coordinates.

    Holds only paths and coordinates, so it pickles cheaply into DataLoader workers; each process opens a slide the
    first time it needs it (handles are never shared across processes). Normalisation is the embedder's job; an
    optional `transform` maps the uint8 tensor to whatever the model expects.
    """

    def __init__(
        self,
        slides: Sequence[SlidePatches],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        resample: Resample = "bilinear",
        max_open_slides: int = 8,
    ) -> None:
        self.slides = list(slides)
        self.transform = transform
        self.resample = resample
        self.max_open_slides = max_open_slides
        counts = np.array([len(s.grid) for s in self.slides], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        self._open: OrderedDict[int, Slide] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"patch index {index} out of range for {len(self)} patches")
        slide_idx = int(np.searchsorted(self._offsets, index, side="right") - 1)
        entry = self.slides[slide_idx]
        x, y = (int(v) for v in entry.grid.coords[index - self._offsets[slide_idx]])
        size = entry.grid.patch_size
        pixels = self._slide(slide_idx).read_at_mpp((x, y), (size, size), entry.grid.mpp, self.resample)
        image = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "slide_id": entry.slide_id, "coords": torch.tensor([x, y], dtype=torch.int32)}

    def slide_ranges(self) -> list[tuple[str, int, int]]:
        """(slide id, first, end) index ranges, for samplers and writers that work slide by slide."""
        return [(s.slide_id, int(a), int(b)) for s, a, b in zip(self.slides, self._offsets[:-1], self._offsets[1:])]

    def _slide(self, slide_idx: int) -> Slide:
        if os.getpid() != self._pid:  # forked into a worker: handles inherited from the parent are not ours
            self._open, self._pid = OrderedDict(), os.getpid()
        slide = self._open.get(slide_idx)
        if slide is not None:
            self._open.move_to_end(slide_idx)
            return slide
        if len(self._open) >= self.max_open_slides:  # bound open files and tile caches per worker
            self._open.popitem(last=False)[1].close()
        entry = self.slides[slide_idx]
        slide = self._open[slide_idx] = open_slide(entry.path, mpp=entry.mpp_override)
        return slide

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def __del__(self) -> None:
        for slide in getattr(self, "_open", {}).values():
            slide.close()


class SlideShardSampler(Sampler[int]):
    """Whole slides per process (balanced by patch count), in order: each rank writes complete slides under DDP."""

    def __init__(self, dataset: PatchDataset, rank: int = 0, world_size: int = 1) -> None:
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


class SlidePatchDataModule(pl.LightningDataModule):
    """Every tissue patch of a cohort's slides, in slide order, for `predict` (feature extraction).

    Grids are computed once per slide and cached in `grid_cache`. `exclude` sets the slides that need no work (the
    feature writer passes those already in its cache), so a rerun only embeds what is missing.
    """

    def __init__(
        self,
        labels: str,
        slides: str,
        tiling: TilingConfig = TilingConfig(),
        grid_cache: str = "runs/grids",
        batch_size: int = 64,
        num_workers: int = 2,
    ) -> None:
        super().__init__()
        self.labels, self.slides = labels, slides
        self.tiling, self.grid_cache = tiling, grid_cache
        self.batch_size, self.num_workers = batch_size, num_workers
        self.slide_patches: list[SlidePatches] | None = None
        self._excluded: set[str] = set()

    @functools.cached_property
    def cohort(self) -> SlideCohort:
        """Read on first use, so that `prepare_data` may write the cohort first."""
        return SlideCohort(self.labels, self.slides)

    def setup(self, stage: str | None = None) -> None:
        if self.slide_patches is None:
            self.slide_patches = self.cohort.patches(self.tiling, self.grid_cache)

    def exclude(self, slide_ids: set[str]) -> None:
        self._excluded = set(slide_ids)

    @property
    def slide_ids(self) -> list[str]:
        return [row.slide_id for row in self.cohort.rows]

    def dataset(self) -> PatchDataset:
        self.setup()
        return PatchDataset([s for s in self.slide_patches if s.slide_id not in self._excluded])

    def predict_dataloader(self) -> DataLoader:
        dataset = self.dataset()
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=SlideShardSampler(dataset, rank, world),
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )
