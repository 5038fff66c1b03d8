"""Whole slides as lazy bags of patches, for end-to-end training: a bag is read chunk by chunk, never all at once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset

from ..cohort import OnSlideError, SlideCohort, SlideLabel
from ..cohort.splits import SplitConfig
from ..cohort.targets import Targets
from ..slides import Resample, Slide, open_slide
from ..slides.tiling import SlidePatches, TilingConfig
from .bag_base import BagDataModule, BagLoaders
from .patch_store import PatchStore
from .patient_bags import BagLevel, PatientBags, patient_groups

__all__ = ["PatchBagDataModule", "SlideBag", "SlideBagDataModule", "SlideBagDataset", "SlideBagSplits"]


class SlideBag:
    """All tissue patches of one slide (or a selection of them): `bag[a:b]` -> uint8 (b - a, 3, S, S).

    This is the lazy bag `chunked.bag_backward` expects: it stays on the CPU and reads only the chunk asked for,
    decoding patches on `threads` threads (the JPEG decoder releases the GIL). The slide is opened in the process that
    reads, on first use; pickling drops the handle. Where the tiling names a patch store (`SlidePatches.patch_store`),
    the first read stores every patch decoded and all reads after come from there (`patch_store.PatchStore`).
    """

    def __init__(
        self,
        patches: SlidePatches,
        indices: np.ndarray | None = None,
        resample: Resample = "bilinear",
        threads: int = 4,
    ) -> None:
        self.patches = patches
        self.indices = np.arange(len(patches.grid)) if indices is None else np.asarray(indices)
        self.resample = resample
        self.threads = threads
        self._slide: Slide | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._store: zarr.Array | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: slice) -> torch.Tensor:
        if not isinstance(index, slice):
            raise TypeError(
                f"SlideBag supports slices (bag[a:b]), got {type(index).__name__}; use select() for indices"
            )
        picked = self.indices[index]
        stored = self._stored()
        if stored is None:
            return self._decode(self.patches.grid.coords[picked])
        if len(picked) and (np.diff(picked) == 1).all():  # a run of patches, as a bag's chunks are
            return torch.from_numpy(stored[int(picked[0]) : int(picked[-1]) + 1])
        return torch.from_numpy(stored.oindex[picked])

    def _decode(self, coords: np.ndarray) -> torch.Tensor:
        """The patches at `coords`, read from the slide and resampled to the tiling's mpp."""
        if self._slide is None:
            self._slide = open_slide(self.patches.path, mpp=self.patches.mpp_override)
            self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        size, mpp = self.patches.grid.patch_size, self.patches.grid.mpp

        def read(xy: np.ndarray) -> np.ndarray:
            return self._slide.read_at_mpp((int(xy[0]), int(xy[1])), (size, size), mpp, self.resample)

        images = list(self._pool.map(read, coords)) if self._pool is not None else [read(xy) for xy in coords]
        out = np.stack(images) if images else np.empty((0, size, size, 3), np.uint8)
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

    def _stored(self) -> zarr.Array | None:
        """The slide's decoded patches where the tiling keeps a patch store: stored whole on first use (every patch
        of the grid, also for a selection), read from there since."""
        if self.patches.patch_store is None:
            return None
        if self._store is None:
            store = PatchStore(self.patches.patch_store)
            self._store = store.open(self.patches, self.resample)
            if self._store is None:
                self._store = store.fill(self.patches, self.resample, lambda coords: self._decode(coords).numpy())
        return self._store

    def select(self, indices: np.ndarray) -> SlideBag:
        """A bag of some of these patches (within-bag sampling), sharing nothing open."""
        return SlideBag(self.patches, self.indices[np.asarray(indices)], self.resample, self.threads)

    @property
    def coords(self) -> np.ndarray:
        return self.patches.grid.coords[self.indices]

    def close(self, wait: bool = True) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait)
        if self._slide is not None:
            self._slide.close()
        self._slide = self._pool = self._store = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_slide": None, "_pool": None, "_store": None}

    def __del__(self) -> None:
        self.close(wait=False)  # the collector may run this in one of the pool's own threads, which cannot join itself


class SlideBagDataset(Dataset):
    """Slides as bags: a fresh `SlideBag` per item, so a slide's handle and tile cache live only as long as its step
    does. A label of None (an unlabelled slide, predict only) leaves "label" out of the item."""

    def __init__(self, slides: Sequence[SlidePatches], labels: Sequence[torch.Tensor | None], threads: int = 4) -> None:
        self.slides = list(slides)
        self.labels = list(labels)
        self.threads = threads

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, index: int) -> dict:
        slide, label = self.slides[index], self.labels[index]
        bag = SlideBag(slide, threads=self.threads)
        coords = torch.from_numpy(bag.coords.astype(np.int64))
        item = {"patches": bag, "slide_id": slide.slide_id, "coords": coords, "patch_side": slide.grid.level0_size}
        if label is not None:
            item["label"] = torch.as_tensor(label)
        return item


class SlideBagDataModule(BagDataModule):
    """Slides of a cohort as lazy bags of all their tissue patches (end-to-end MIL on slides).

    `slides` is where the slides are, as `SlidePatchDataModule` takes it.
    `on_slide_error: skip` leaves out a slide that cannot be tiled, and the model skips a bag with a broken tile
    (`SlideTask`), both recorded in `skipped`. `patch_store`: a folder where the bags keep their patches decoded after
    the first epoch (`patch_store.PatchStore`; None: every epoch decodes the slides)."""

    def __init__(
        self,
        labels: str,
        slides: str | list[str] | None = None,
        tiling: TilingConfig = TilingConfig(),
        grid_cache: str = "runs/grids",
        read_threads: int = 4,
        classes: list[str] | None = None,
        splits: SplitConfig = SplitConfig(),
        split_ids: dict[str, list[str]] | None = None,
        on_slide_error: OnSlideError = "raise",
        targets: Targets = Targets(),
        bag_level: BagLevel = "slide",
        annotations: str | None = None,
        patch_store: str | None = None,
    ) -> None:
        super().__init__(labels, classes, splits, split_ids, 0, targets, bag_level, annotations)
        self.patch_store = patch_store
        self.on_slide_error = on_slide_error
        self.cohort = SlideCohort(self.labels_path, slides, targets)
        self.tiling = tiling
        self.grid_cache = grid_cache
        self.read_threads = read_threads
        self._patches: dict[str, SlidePatches] | None = None

    @property
    def slide_paths(self) -> dict[str, Path]:
        """Slide id -> file, for heatmaps."""
        return self.cohort.paths

    def setup(self, stage: str | None = None) -> None:
        if self._patches is None:
            skipped: dict[str, str] | None = {} if self.on_slide_error == "skip" else None
            patches = self.cohort.patches(self.tiling, self.grid_cache, skipped, self.patch_store)
            self._patches = {p.slide_id: p for p in patches}
            self.skip(skipped or {})
        super().setup(stage)

    def bag_dataset(self, rows: list[SlideLabel]) -> SlideBagDataset:
        slides = [self._patches[r.slide_id] for r in rows]
        return SlideBagDataset(slides, [self.target(r) for r in rows], self.read_threads)


class PatchBagDataModule(SlideBagDataModule):
    """The former name of `SlideBagDataModule`, kept so that configs naming it still run."""


class SlideBagSplits(BagLoaders):
    """Given slides per split as lazy bags with their encoded targets (ICMIL's `BagGradient` coupling: its training
    slides and the ones it holds out); training order seeded by epoch. With `patients` (slide id -> patient id), a
    bag is all slides of a patient (`data_modules.datasets.patient_bags`)."""

    def __init__(
        self,
        splits: Mapping[str, Sequence[SlidePatches]],
        labels: Mapping[str, torch.Tensor],
        threads: int,
        seed: int,
        patients: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.slides = splits
        self.labels = labels
        self.patients = patients
        self.threads = threads
        self.seed = seed
        self.num_workers = 0

    def dataset(self, split: str) -> Dataset:
        slides = list(self.slides.get(split, []))
        targets = [self.labels[s.slide_id] for s in slides]
        bags = SlideBagDataset(slides, targets, self.threads)
        if self.patients is None:
            return bags
        rows = [SlideLabel(s.slide_id, None, self.patients[s.slide_id]) for s in slides]
        groups = patient_groups(rows, [torch.as_tensor(t) for t in targets], "the coupling's slides")
        return PatientBags(bags, groups)
