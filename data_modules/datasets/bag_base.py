"""The base of every slide-level data module: one loader factory, one bag per batch, and labels + splits."""

from __future__ import annotations

import functools
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ..annotations import locate_annotations
from ..cohort import SlideLabel, read_labels, require_labels
from ..cohort.splits import SPLITS, SplitConfig, check_classes, make_splits
from ..cohort.targets import Targets
from ..io import check_choice
from .patient_bags import BagLevel, PatientBags, patient_groups
from .samplers import EpochShuffle, evaluation_sampler

__all__ = ["BagDataModule", "BagLoaders"]


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
        trainer = getattr(self, "trainer", None)
        return DataLoader(
            dataset,
            batch_size=None,  # one bag per step: no collation, no padding
            sampler=EpochShuffle(len(dataset), self.seed, _epoch(trainer))
            if shuffle
            else evaluation_sampler(dataset, trainer),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


class BagDataModule(BagLoaders):
    """Slides of a `slide_id,label[,patient_id][,split]` CSV as train/val/test bags, one bag per batch; `targets`
    says what the slides are labelled with (default: a class in `label`; see `data_modules.cohort.targets`), and a bag's
    "label" is its encoded target (`Targets.encode`). `bag_level: patient` makes all slides of a patient one bag
    (`data_modules.datasets.patient_bags`; splits are by patient already).

    Splits are `split_ids` when given (e.g. an ICMIL run's `splits.json`), else the CSV's `split` column, else
    `splits` (a seeded, stratified, patient-grouped k-fold); a model trained on them saves them as `splits.json`.
    Subclasses say how a list of slides becomes a dataset of bags (`bag_dataset`). `annotations`: a folder of
    `<slide_id>.geojson` (QuPath) or `.xml` (ASAP) ground truth, for slides whose row has no `annotations` cell.
    """

    def __init__(
        self,
        labels: str,
        classes: list[str] | None = None,
        splits: SplitConfig = SplitConfig(),
        split_ids: dict[str, list[str]] | None = None,
        num_workers: int = 0,
        targets: Targets = Targets(),
        bag_level: BagLevel = "slide",
        annotations: str | None = None,
    ) -> None:
        super().__init__()
        check_choice("bag_level", bag_level, BagLevel)
        self.labels_path = Path(labels)
        self.targets = targets
        self.bag_level = bag_level
        self.rows: list[SlideLabel] = read_labels(self.labels_path, targets)
        self.annotations = annotations
        self.classes = targets.names(self.rows, self.labels_path, classes)  # what the head's outputs are
        self.split_config = splits
        self.seed = splits.seed
        self.num_workers = num_workers
        self.splits: dict[str, list[str]] | None = None if split_ids is None else self._known(split_ids)
        self.skipped: dict[str, str] = {}  # slide id -> why it is left out (on_slide_error: skip)
        self._unlisted: dict[str, list[str]] = {}  # split -> slides of a restored split this CSV does not list

    @functools.cached_property
    def slide_annotations(self) -> dict[str, Path]:
        """Slide id -> its ground truth file (`data_modules.annotations`: the `annotations` cell, else the
        `annotations` folder), for the heatmaps' and the viewer's outlines; looked up on first use."""
        return locate_annotations(self.rows, self.labels_path, self.annotations)

    @property
    def num_classes(self) -> int | None:
        """None for a cohort without labels (predict only): the model knows its classes."""
        return len(self.classes) or None

    def target(self, row: SlideLabel) -> torch.Tensor | None:
        """The slide's encoded target (None: unlabelled)."""
        return self.targets.encode(row, self.classes)

    @abstractmethod
    def bag_dataset(self, rows: list[SlideLabel]) -> Dataset:
        """A dataset whose item i is the bag of `rows[i]` (a dict with at least `label` and `slide_id`)."""

    def restore(self, classes: Sequence[str], splits: Mapping[str, Sequence[str]] | None) -> None:
        """Encode targets and split slides as a trained model was (its run record), never by what today's CSV
        holds: `classes` in the model's order (a label it does not know is refused by file and row; a cohort of one
        class, or of none, is scored as such) and its `splits`. A split that lost slides from the CSV is refused
        when asked for, naming them; slides the model never saw are in no split (predict scores them)."""
        self.classes = self.targets.names(self.rows, self.labels_path, list(classes))
        if splits is not None:
            listed = {row.slide_id for row in self.rows}
            self.splits = {name: [s for s in splits.get(name, []) if s in listed] for name in SPLITS}
            gone = {name: [s for s in splits.get(name, []) if s not in listed | set(self.skipped)] for name in SPLITS}
            self._unlisted = gone  # unreadable slides (on_slide_error: skip) stay out, as when the model was fitted

    @property
    def unseen(self) -> list[str]:
        """Slides of the CSV in none of the splits: after `restore`, those the model never saw."""
        split = {s for ids in (self.splits or {}).values() for s in ids}
        return [row.slide_id for row in self.rows if row.slide_id not in split]

    def setup(self, stage: str | None = None) -> None:
        _ = self.slide_annotations  # a missing annotations file fails here, before any work
        if self.splits is None and stage != "predict":  # predict scores every listed slide: no splits, no labels
            require_labels(self.rows, self.labels_path, "splitting into train/val/test")
            self.splits = make_splits(self.rows, self.split_config, self.labels_path, self.targets)

    def skip(self, skipped: dict[str, str]) -> None:
        """Leave out slides that could not be read (on_slide_error: skip), keeping why; given splits lose them too and
        must still hold every class."""
        listed = {row.slide_id for row in self.rows}
        skipped = {k: v for k, v in skipped.items() if k in listed}
        if not skipped:
            return
        self.skipped.update(skipped)
        self.rows = [row for row in self.rows if row.slide_id not in skipped]
        if self.splits is not None:
            self.splits = {name: [s for s in ids if s not in skipped] for name, ids in self.splits.items()}
            try:
                check_classes(self.splits, self.rows, "the splits", targets=self.targets)
            except ValueError as error:
                raise ValueError(f"{self.labels_path}: without the skipped slides, {error}") from None

    def split_rows(self, split: str) -> list[SlideLabel]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.setup()
        if self._unlisted.get(split):
            gone = self._unlisted[split]
            raise ValueError(
                f"{self.labels_path}: the model's {split} split holds {len(gone)} slide(s) this CSV does not list "
                f"({', '.join(map(repr, gone[:3]))}); {split} scores the split the model was fitted with, whole "
                "(predict scores any slides)"
            )
        ids = set(self.splits[split])
        rows = [row for row in self.rows if row.slide_id in ids]
        require_labels(rows, self.labels_path, f"scoring the {split} split")  # restored splits: a CSV without labels
        return rows

    def dataset(self, split: str) -> Dataset:
        return self._bags(self.split_rows(split))

    def bag_targets(self, split: str) -> list[torch.Tensor]:
        """The targets of `split`'s bags (a patient's once), for what a task fits on the training targets."""
        rows = self.split_rows(split)
        targets = [self.target(r) for r in rows]
        if self.bag_level == "patient":
            targets = [targets[index[0]] for _, index in patient_groups(rows, targets, self.labels_path)]
        return [t for t in targets if t is not None]

    def predict_dataloader(self) -> DataLoader:
        """Every slide (or patient) of the labels CSV, labelled or not, in CSV order."""
        return self._loader(self._bags(self.rows))

    def _bags(self, rows: list[SlideLabel]) -> Dataset:
        slides = self.bag_dataset(rows)
        if self.bag_level == "slide":
            return slides
        return PatientBags(slides, patient_groups(rows, [self.target(r) for r in rows], self.labels_path))

    def _known(self, split_ids: dict[str, list[str]]) -> dict[str, list[str]]:
        listed = {row.slide_id for row in self.rows}
        unknown = sorted({s for ids in split_ids.values() for s in ids} - listed)
        if unknown or set(split_ids) != set(SPLITS):
            raise ValueError(
                f"split_ids: expected {{train, val, test}} of slides in {self.labels_path}, got splits "
                f"{sorted(split_ids)}" + (f" and unknown slides {unknown[:3]}" if unknown else "")
            )
        return {split: list(split_ids[split]) for split in SPLITS}


def _epoch(trainer: pl.Trainer | None) -> int:
    """The epoch a loader made now is first iterated in: a resumed fit makes its train loader once, before it sets
    the sampler's epoch, and iterates it at once (its first batch is prefetched), so the order must be right from
    the start."""
    return trainer.fit_loop.epoch_progress.current.processed if trainer is not None else 0
