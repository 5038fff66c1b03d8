"""A cohort's patches without labels, as augmented views: the data of self-supervised pretraining."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
from lightly.transforms.multi_view_transform import MultiViewTransform
from torch.utils.data import DataLoader

from ..annotations import annotations_of
from ..io import check
from .patches import PatchSampleDataModule, SlidePatchDataModule

__all__ = ["UnlabelledPatchDataModule"]


class UnlabelledPatchDataModule(pl.LightningDataModule):
    """Every tissue patch of `cohort` (its slides and tiling; no label is read), each with the views `views` makes
    of it (lightly's `SimCLRTransform`, `BYOLTransform`, ...: computed in the loader's workers).

    A fixed, seeded `val_fraction` of the patches validates; each epoch trains on a fresh seeded draw of
    `patches_per_epoch` of the rest, or on all of them in a fresh order when null (the trainer reloads the train
    loader every epoch). Where every held-out patch's slide has annotations (`cohort.slide_annotations`), `val_truth`
    gives each held-out patch's tumour label, for the linear probe of `SSLPretrain`.
    """

    def __init__(
        self,
        cohort: SlidePatchDataModule,
        views: MultiViewTransform,
        patches_per_epoch: int | None = None,
        val_fraction: float = 0.1,
        batch_size: int = 256,
        num_workers: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check("val_fraction", 0 < val_fraction < 1, "a float in (0, 1)", val_fraction)
        check("batch_size", batch_size >= 2, "an int >= 2 (contrastive losses compare patches)", batch_size)
        self.cohort = cohort
        self.views = views
        self.patches_per_epoch = patches_per_epoch
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.samples: PatchSampleDataModule | None = None
        self._truth: tuple | None = None  # (val_truth(),) once computed

    def prepare_data(self) -> None:
        self.cohort.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.samples is None:
            self.cohort.setup()
            self.samples = PatchSampleDataModule(
                self.cohort.slide_patches,
                patches_per_epoch=self.patches_per_epoch,
                val_fraction=self.val_fraction,
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                seed=self.seed,
                views=self.views,
            )
        self.samples.trainer = self.trainer  # the epoch seeds each training draw

    def train_dataloader(self) -> DataLoader:
        return self.samples.train_dataloader()

    def val_dataloader(self) -> DataLoader:
        return self.samples.val_dataloader()

    def val_truth(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(tumour label, slide index) of each held-out patch in validation order, or None without ground truth.
        Computed once: the held-out patches are fixed, and the probe asks every epoch."""
        if self._truth is None:
            self._truth = (self._val_truth(),)
        return self._truth[0]

    def _val_truth(self) -> tuple[np.ndarray, np.ndarray] | None:
        dataset = self.samples.dataset
        slide_of, local = dataset.locate(self.samples.val_indices)
        truth = np.zeros(len(local), bool)
        for k in np.unique(slide_of):
            entry, rows = dataset.slides[k], slide_of == k
            annotations = annotations_of(self.cohort.slide_annotations, entry.slide_id)
            if annotations is None:
                return None
            truth[rows] = annotations.patch_truth(entry.grid.coords[local[rows]], entry.grid.level0_size)
        return truth, slide_of
