"""Patches of many slides as a map-style dataset (one sample = one patch, slides opened lazily in each worker), and
the two data modules that serve them: every patch for extraction, seeded samples for ICMIL's distillation."""

from __future__ import annotations

import functools
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import zarr
from torch.utils.data import DataLoader, Dataset, Subset

from ..annotations import locate_annotations
from ..cohort import OnSlideError, SlideCohort
from ..cohort.targets import Targets
from ..io import check
from ..slides import Resample, Slide, SlideError, open_slide
from ..slides.tiling import SlidePatches, TilingConfig
from .claims import SlideClaims
from .patch_store import CHUNK, PatchStore
from .samplers import SlideShardSampler, balanced_owners

__all__ = ["PatchDataset", "PatchSampleDataModule", "SlidePatchDataModule", "parse_shard"]


class PatchDataset(Dataset):
    """Patches of `slides` as uint8 (C, H, W) tensors with their slide id and level-0 coordinates.

    Holds only paths and coordinates, so it pickles cheaply into DataLoader workers; each process opens a slide the
    first time it needs it (handles are never shared across processes). Normalisation is the embedder's job. With
    `skip_errors`, a patch that cannot be read (a broken tile) comes back blank with its `SlideError` message in
    `error` (empty for every good patch), so the consumer can drop its slide and go on. `views` (e.g. lightly's
    `SimCLRTransform`) adds `views`, its list of augmented views of the patch, computed in the loader's workers.
    A slide whose patches a patch store holds decoded is read from there (`patch_store.PatchStore`).
    """

    def __init__(
        self,
        slides: Sequence[SlidePatches],
        resample: Resample = "bilinear",
        max_open_slides: int = 8,
        skip_errors: bool = False,
        views: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
    ) -> None:
        self.slides = list(slides)
        self.views = views
        self.resample = resample
        self.max_open_slides = max_open_slides
        self.skip_errors = skip_errors
        counts = np.array([len(s.grid) for s in self.slides], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        self._open: OrderedDict[int, Slide] = OrderedDict()
        self._stores: dict[int, zarr.Array | None] = {}  # stored patches by slide index, looked up once each
        self._chunk: tuple[int, int, np.ndarray] | None = None  # (slide index, first patch, patches) last read
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"patch index {index} out of range for {len(self)} patches")
        slide_idx, local = (int(v[0]) for v in self.locate(np.array([index])))
        entry = self.slides[slide_idx]
        x, y = (int(v) for v in entry.grid.coords[local])
        size = entry.grid.patch_size
        item = {"slide_id": entry.slide_id, "coords": torch.tensor([x, y], dtype=torch.int32)}
        stored = self._stored(slide_idx)
        if stored is not None:
            image = torch.from_numpy(self._stored_patch(slide_idx, stored, local))
        else:
            try:
                pixels = self._slide(slide_idx).read_at_mpp((x, y), (size, size), entry.grid.mpp, self.resample)
            except SlideError as error:
                if not self.skip_errors:
                    raise
                return {**item, "image": torch.zeros(3, size, size, dtype=torch.uint8), "error": str(error)}
            image = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        if self.views is not None:
            item["views"] = self.views(image)
        return {**item, "image": image, **({"error": ""} if self.skip_errors else {})}

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slide index, patch index within its slide) of each dataset index."""
        slide = np.searchsorted(self._offsets, indices, side="right") - 1
        return slide, np.asarray(indices) - self._offsets[slide]

    def slide_ranges(self) -> list[tuple[str, int, int]]:
        """(slide id, first, end) index ranges, for samplers and writers that work slide by slide."""
        return [
            (s.slide_id, int(a), int(b))
            for s, a, b in zip(self.slides, self._offsets[:-1], self._offsets[1:], strict=True)
        ]

    def _stored(self, slide_idx: int) -> zarr.Array | None:
        """The slide's patches where a patch store holds them decoded (`SlidePatches.patch_store`), else None."""
        if slide_idx not in self._stores:
            entry = self.slides[slide_idx]
            store = PatchStore(entry.patch_store) if entry.patch_store is not None else None
            self._stores[slide_idx] = store.open(entry, self.resample) if store is not None else None
        return self._stores[slide_idx]

    def _stored_patch(self, slide_idx: int, stored: zarr.Array, local: int) -> np.ndarray:
        """One stored patch, from the last chunk read where it holds it: extraction reads a slide in order, and one
        patch alone costs a whole chunk's read."""
        first = local // CHUNK * CHUNK
        if self._chunk is None or self._chunk[:2] != (slide_idx, first):
            self._chunk = (slide_idx, first, stored[first : first + CHUNK])
        return self._chunk[2][local - first]

    def _slide(self, slide_idx: int) -> Slide:
        if os.getpid() != self._pid:  # forked into a worker: handles inherited from the parent are not ours
            self._open = OrderedDict()
            self._pid = os.getpid()
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
        state["_stores"], state["_chunk"] = {}, None
        return state

    def __del__(self) -> None:
        for slide in getattr(self, "_open", {}).values():
            slide.close()


class SlidePatchDataModule(pl.LightningDataModule):
    """Every tissue patch of a cohort's slides, in slide order, for `predict` (feature extraction).

    `slides`: the folder (or list of folders) the slides are found in, searched recursively (`SlideCohort`); none is
    needed when every row of the labels CSV has a `path`.
    Grids are computed once per slide and cached in `grid_cache`. `exclude` sets the slides that need no work (the
    feature writer passes those already in its cache), so a rerun only embeds what is missing. `on_slide_error`:
    `raise` stops at a slide that cannot be read (naming it); `skip` leaves it out, and `skipped` (slide id -> error)
    records it: here the slides that could not be tiled, the feature writer adds those with a broken tile.
    `targets` says which columns of the labels CSV hold the slides' targets (ICMIL trains its bag phase on them).
    `annotations`: a folder of `<slide_id>.geojson` / `.xml` ground truth for rows without an `annotations` cell.
    `shard` (`i/n`, e.g. `${oc.env:SLURM_ARRAY_TASK_ID}/8`): this process takes the i-th of n fixed shares of the
    slides (balanced by patch count), for schedulers whose tasks cannot share claims on one filesystem; where they can,
    running the same extraction n times needs no shard (the feature writer's claims split the slides as they go).
    `patch_store`: a folder where the patches are kept decoded, written by the first extraction (the feature writer)
    or a lazy slide bag's first read, from where every later read takes them (ICMIL's couplings, re-extraction, end
    to end; `patch_store.PatchStore`); about the size of the slides at the tiling's mpp. None: every epoch decodes
    the slides again.
    """

    def __init__(
        self,
        labels: str,
        slides: str | list[str] | None = None,
        tiling: TilingConfig = TilingConfig(),
        grid_cache: str = "runs/grids",
        batch_size: int = 64,
        num_workers: int = 2,
        on_slide_error: OnSlideError = "raise",
        targets: Targets = Targets(),
        annotations: str | None = None,
        shard: str | None = None,
        patch_store: str | None = None,
    ) -> None:
        super().__init__()
        self.shard = parse_shard(shard)
        self.patch_store = patch_store
        self.labels = labels
        self.annotations = annotations
        self.targets = targets
        self.slides = slides
        self.tiling = tiling
        self.grid_cache = grid_cache
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.on_slide_error = on_slide_error
        self.slide_patches: list[SlidePatches] | None = None
        self.skipped: dict[str, str] = {}
        self._excluded: set[str] = set()
        self.claims: SlideClaims | None = None  # set by the feature writer: slides are served once claimed

    @functools.cached_property
    def cohort(self) -> SlideCohort:
        """Read on first use, so that `prepare_data` may write the cohort first."""
        return SlideCohort(self.labels, self.slides, self.targets)

    @functools.cached_property
    def slide_annotations(self) -> dict[str, Path]:
        """Slide id -> its ground truth file (`data_modules.annotations`), as `BagDataModule.slide_annotations`."""
        return locate_annotations(self.cohort.rows, self.cohort.labels_path, self.annotations)

    def setup(self, stage: str | None = None) -> None:
        _ = self.slide_annotations  # a missing annotations file fails here, before any slide is read
        if self.slide_patches is None:
            skipped = self.skipped if self.on_slide_error == "skip" else None
            self.slide_patches = self.cohort.patches(self.tiling, self.grid_cache, skipped, self.patch_store)

    def exclude(self, slide_ids: set[str]) -> None:
        self._excluded = set(slide_ids)

    @property
    def slide_ids(self) -> list[str]:
        return [row.slide_id for row in self.cohort.rows]

    def dataset(self) -> PatchDataset:
        """The patches still to embed: this shard's slides, less the excluded."""
        self.setup()
        slides = self.slide_patches
        if self.shard is not None:
            index, parts = self.shard
            owners = balanced_owners([len(s.grid) for s in slides], parts)
            slides = [s for s, owner in zip(slides, owners, strict=True) if owner == index]
        slides = [s for s in slides if s.slide_id not in self._excluded]
        return PatchDataset(slides, skip_errors=self.on_slide_error == "skip")

    def predict_dataloader(self) -> DataLoader:
        dataset = self.dataset()
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=SlideShardSampler(dataset, rank, world, self.claims),
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """`"i/n"` as (i, n), 0 <= i < n."""
    if shard is None:
        return None
    index, _, parts = str(shard).partition("/")
    ok = index.strip().isdigit() and parts.strip().isdigit() and 0 <= int(index) < int(parts)
    check("data.shard", ok, "i/n with 0 <= i < n (e.g. 0/4)", shard)
    return int(index), int(parts)


class PatchSampleDataModule(pl.LightningDataModule):
    """Patches of the given slides: a fixed seeded held-out part validates; each epoch trains on a fresh seeded
    draw of `patches_per_epoch` of the rest (the Trainer reloads the train loader every epoch).

    With `patches_per_epoch`, validation costs what it would with full epochs: the held-out part is cut to
    `val_fraction` of an epoch's work. `views` is `PatchDataset`'s."""

    def __init__(
        self,
        slides: Sequence[SlidePatches],
        *,
        patches_per_epoch: int | None,
        val_fraction: float,
        batch_size: int,
        num_workers: int,
        seed: int,
        views: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
    ) -> None:
        super().__init__()
        self.dataset = PatchDataset(slides, views=views)
        n = len(self.dataset)
        n_val = max(1, round(val_fraction * n))
        check("train", n - n_val >= 1, f"slides with at least 2 patches in all (val_fraction={val_fraction})", n)
        order = np.random.default_rng(seed).permutation(n)
        self.pool = order[n_val:]
        if patches_per_epoch is not None:
            n_val = min(n_val, math.ceil(patches_per_epoch * val_fraction / (1 - val_fraction)))
        self.val_indices = np.sort(order[:n_val])
        self.patches_per_epoch = patches_per_epoch
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        rng = np.random.default_rng([self.seed, epoch])
        k = len(self.pool) if self.patches_per_epoch is None else min(self.patches_per_epoch, len(self.pool))
        return self._loader(rng.choice(self.pool, size=k, replace=False))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_indices)

    def _loader(self, indices: np.ndarray) -> DataLoader:
        return DataLoader(
            Subset(self.dataset, indices.tolist()),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )
