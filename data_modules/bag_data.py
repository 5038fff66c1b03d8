"""The base of every slide-level data module: labels CSV, classes, saved splits, one bag per batch."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler

from .splits import SPLITS, SlideLabel, make_splits, read_labels, require_labels, save_splits

__all__ = ["BagDataModule", "BagLoaders", "EpochShuffle"]


class EpochShuffle(Sampler[int]):
    """A permutation of range(n) that is a function of (seed, epoch) only: a run resumed from a checkpoint at epoch k
    sees the orders an uninterrupted run would (a seeded `torch.Generator` would restart from epoch 0's order).
    Lightning calls `set_epoch` before each training epoch (and under DDP shards this sampler per process)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())

    def __len__(self) -> int:
        return self.n


class BagLoaders(pl.LightningDataModule):
    """Train/val/test/predict loaders over `self.dataset(split)`, one bag per batch, training order seeded.

    Subclasses set `seed` and `num_workers` and implement `dataset`.
    """

    seed: int
    num_workers: int

    @abstractmethod
    def dataset(self, split: str) -> Dataset:
        """The bags of `split` ("train", "val" or "test")."""

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("train"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"))

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"))

    def _loader(self, dataset: Dataset, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=None,  # one bag per step: no collation, no padding
            sampler=EpochShuffle(len(dataset), self.seed) if shuffle else self._evaluation_sampler(dataset),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _evaluation_sampler(self, dataset: Dataset) -> Sampler | None:
        """Under DDP each process evaluates every world_size-th slide, none twice: Lightning's default sampler would
        pad with repeated slides, which metrics and predictions.csv would count twice."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size <= 1:
            return None
        return UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                            shuffle=False)  # fmt: skip


class BagDataModule(BagLoaders):
    """Slides of a `slide_id,label[,patient_id][,split]` CSV as train/val/test bags, one bag per batch.

    Splits come from the CSV's `split` column, else a seeded, stratified, patient-grouped k-fold (`fold` of `folds`
    is the test set, `val_fraction` of the rest validates); they are saved as `splits.json` in the run directory.
    Subclasses say how a list of slides becomes a dataset of bags (`bag_dataset`).
    """

    def __init__(
        self,
        labels: str,
        classes: list[str] | None = None,
        folds: int = 5,
        fold: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.labels_path = Path(labels)
        self.rows: list[SlideLabel] = read_labels(self.labels_path)
        labels = {row.label for row in self.rows if row.label is not None}
        self.classes = list(classes) if classes else sorted(labels)
        unknown = next((row for row in self.rows if row.label is not None and row.label not in self.classes), None)
        if unknown is not None:
            raise ValueError(
                f"{self.labels_path}: slide {unknown.slide_id!r} has label {unknown.label!r}, "
                f"not one of classes {self.classes}"
            )
        self.class_index = {name: i for i, name in enumerate(self.classes)}
        self.folds, self.fold, self.val_fraction, self.seed = folds, fold, val_fraction, seed
        self.num_workers = num_workers
        self.splits: dict[str, list[str]] | None = None

    @property
    def num_classes(self) -> int | None:
        """None for a cohort without labels (predict only): the model knows its classes."""
        return len(self.classes) or None

    def label_index(self, row: SlideLabel) -> int | None:
        return None if row.label is None else self.class_index[row.label]

    @abstractmethod
    def bag_dataset(self, rows: list[SlideLabel]) -> Dataset:
        """A dataset whose item i is the bag of `rows[i]` (a dict with at least `label` and `slide_id`)."""

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None and stage != "predict":  # predict scores every listed slide: no splits, no labels
            require_labels(self.rows, self.labels_path, "splitting into train/val/test")
            self.splits = make_splits(
                self.rows, folds=self.folds, fold=self.fold, val_fraction=self.val_fraction, seed=self.seed
            )
            if self.trainer is not None:
                run_dir = self.trainer.log_dir or self.trainer.default_root_dir  # a collective: every process asks
                if self.trainer.is_global_zero:
                    save_splits(self.splits, run_dir)

    def split_rows(self, split: str) -> list[SlideLabel]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.setup()
        ids = set(self.splits[split])
        return [row for row in self.rows if row.slide_id in ids]

    def dataset(self, split: str) -> Dataset:
        return self.bag_dataset(self.split_rows(split))

    def predict_dataloader(self) -> DataLoader:
        """Every slide of the labels CSV, labelled or not, in CSV order."""
        return self._loader(self.bag_dataset(self.rows))
