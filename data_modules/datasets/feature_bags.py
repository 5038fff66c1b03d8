"""Bags of cached patch features with slide labels: our zarr cache, or CLAM/TRIDENT-style `.h5` files users bring."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..cohort import SlideLabel, locate_slides
from ..cohort.splits import SplitConfig
from ..cohort.targets import Targets
from ..io import check
from ..slides import open_slide
from .bag_base import BagDataModule
from .feature_cache import FeatureCache, SlideFeatures
from .patient_bags import BagLevel

__all__ = ["FeatureBagDataModule", "FeatureBagDataset", "KeptBags"]


class KeptBags:
    """Bags kept in this process's memory after their first read, up to `budget` bytes: reading a bag's files (and
    checking them) costs about as much as a training step on it (`benchmarks/bench_bag_phase.py`). Under loader
    workers each worker keeps its own."""

    def __init__(self, budget: int) -> None:
        self.budget, self.used = budget, 0
        self.bags: dict[str, SlideFeatures] = {}

    def read(self, cache: FeatureCache, slide_id: str) -> SlideFeatures:
        bag = self.bags.get(slide_id)
        if bag is None:
            bag = cache.read(slide_id)
            size = bag.features.nbytes + bag.coords.nbytes
            if self.used + size <= self.budget:
                self.bags[slide_id], self.used = bag, self.used + size
        return bag


class FeatureBagDataset(Dataset):
    """One item = one slide's whole bag: `{"features": (N, D), "label": target, "slide_id": str, "coords": (N, 2)}`
    (no "label" for an unlabelled slide; the target as `Targets.encode` gives it)."""

    def __init__(
        self,
        cache: FeatureCache,
        slides: list[SlideLabel],
        targets: list[torch.Tensor | None],
        kept: KeptBags | None = None,
    ) -> None:
        self.cache = cache
        self.slides = slides
        self.targets = targets
        self.kept = KeptBags(0) if kept is None else kept

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, index: int) -> dict:
        row = self.slides[index]
        bag = self.kept.read(self.cache, row.slide_id)
        item = {
            "features": torch.from_numpy(bag.features),
            "slide_id": row.slide_id,
            "coords": torch.from_numpy(bag.coords.astype(np.int64)),
        }
        if bag.patch_side is not None:
            item["patch_side"] = bag.patch_side
        if self.targets[index] is not None:
            item["label"] = self.targets[index]
        return item


class FeatureBagDataModule(BagDataModule):
    """Slide labels + a folder of per-slide features (our zarr cache or CLAM/TRIDENT `.h5`) -> bags of features.

    Every slide is checked before training starts (features exist, the bag is non-empty and finite, one feature
    dimension), so a bad cohort fails at once rather than mid-epoch. See `BagDataModule` for labels and splits;
    the slides are only needed for heatmaps: the labels CSV's `path` cells, else found below `slides` (a folder or a
    list of them, as `SlidePatchDataModule` takes it); a slide without a file gets no heatmap. `keep_in_memory_gb`:
    bags stay in memory after their first read, up to this much per process (0: read from the files every epoch).
    """

    def __init__(
        self,
        labels: str,
        features: str,
        classes: list[str] | None = None,
        splits: SplitConfig = SplitConfig(),
        split_ids: dict[str, list[str]] | None = None,
        num_workers: int = 0,
        slides: str | list[str] | None = None,
        targets: Targets = Targets(),
        bag_level: BagLevel = "slide",
        annotations: str | None = None,
        keep_in_memory_gb: float = 4.0,
    ) -> None:
        super().__init__(labels, classes, splits, split_ids, num_workers, targets, bag_level, annotations)
        check("keep_in_memory_gb", keep_in_memory_gb >= 0, "a number of GB >= 0", keep_in_memory_gb)
        self.kept = KeptBags(int(keep_in_memory_gb * 2**30))
        self.cache = FeatureCache.find(features)
        self.skip(self.cache.skipped())  # slides extraction could not read (on_slide_error: skip)
        self.slides = slides
        self.feature_dim: int | None = None

    @functools.cached_property
    def slide_paths(self) -> dict[str, Path]:
        """Slide id -> file of the slides found, for heatmaps: looked up on first use, so training never waits."""
        return locate_slides(self.rows, self.labels_path, self.slides, required=False)

    def prepare_data(self) -> None:
        self._check_bags()

    def setup(self, stage: str | None = None) -> None:
        if self.feature_dim is None:
            self._check_bags()
        super().setup(stage)

    def bag_dataset(self, rows: list[SlideLabel]) -> FeatureBagDataset:
        return FeatureBagDataset(self.cache, rows, [self.target(r) for r in rows], self.kept)

    def feature_stats(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and standard deviation over every instance of `split` (streamed, float64)."""
        total, total_sq, count = 0.0, 0.0, 0
        for row in self.split_rows(split):
            features = self.cache.read(row.slide_id).features.astype(np.float64)
            total, total_sq, count = total + features.sum(0), total_sq + (features**2).sum(0), count + len(features)
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
        return torch.from_numpy(mean).float(), torch.from_numpy(np.maximum(std, 1e-6)).float()

    def _check_bags(self) -> None:
        dims = set()
        for row in self.rows:
            try:
                bag = self.cache.read(row.slide_id)
            except ValueError as exc:
                raise ValueError(f"{self.labels_path}: {exc}") from None
            features = bag.features
            if len(features) == 0:
                raise ValueError(f"{self.labels_path}: slide {row.slide_id!r} has an empty bag (no patches)")
            if not np.isfinite(features).all():
                raise ValueError(f"{self.cache.path}: slide {row.slide_id!r} has NaN or infinite features")
            if bag.source is not None and bag.source.suffix == ".h5":  # ours come from our grids
                self._check_coords(bag)
            dims.add(features.shape[1])
        if len(dims) > 1:
            raise ValueError(f"{self.cache.path}: slides have different feature dimensions {sorted(dims)}")
        self.feature_dim = dims.pop()

    def _check_coords(self, bag: SlideFeatures) -> None:
        """Imported coords lie on their slide, where its file is found: coords of another slide, transposed or at
        another level would draw heatmaps on glass or nowhere."""
        path = self.slide_paths.get(bag.slide_id)
        if path is None:
            return
        with open_slide(path) as slide:
            width, height = slide.dimensions
        x, y = bag.coords[:, 0], bag.coords[:, 1]
        outside = np.flatnonzero((x < 0) | (y < 0) | (x >= width) | (y >= height))
        if outside.size:
            i = outside[0]
            raise ValueError(
                f"{bag.source}: {outside.size} of {len(x)} coords lie outside slide {bag.slide_id!r} ({path}, "
                f"{width} x {height} px at level 0), e.g. row {i}: ({x[i]}, {y[i]}); expected level-0 (x, y) corners"
            )
