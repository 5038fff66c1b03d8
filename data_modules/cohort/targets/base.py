"""What every kind of target does with a labels CSV: the columns it reads, the checks on each parsed row, the names
of the head's outputs, the encoding a batch holds, and the strata splits are stratified by. One subclass per task
kind, registered by its `name` (the `targets.task` setting) when its module is imported."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from ..labels import SlideLabel

if TYPE_CHECKING:
    from . import Targets

__all__ = ["KINDS", "REGRESSION_STRATA", "TargetKind", "class_index", "quantile_strata"]

REGRESSION_STRATA = 4  # numeric targets are stratified by quartile
KINDS: dict[str, type[TargetKind]] = {}  # targets.task -> its kind, filled as each kind's module is imported


def class_index(
    rows: Sequence[SlideLabel], path: str | os.PathLike, classes: Sequence[str] | None = None
) -> dict[str, int]:
    """Class name -> index: `classes` in their order, else the labels present, sorted. Every model and data module
    of a run indexes classes by this one rule, so index k means the same class in each phase."""
    names = list(classes) if classes else sorted({row.label for row in rows if row.label is not None})
    unknown = next((row for row in rows if row.label is not None and row.label not in names), None)
    if unknown is not None:
        raise ValueError(
            f"{path}:{unknown.line}: slide {unknown.slide_id!r} has label {unknown.label!r}, not one of the classes "
            f"{names}"
        )
    return {name: i for i, name in enumerate(names)}


def quantile_strata(values: Sequence[float | None]) -> list[str | None]:
    """The quartile of each value among the known ones (`q1` .. `q4`; None stays None): how numeric targets are
    stratified, by the cohort's splits and by a coupling's hold-out alike."""
    known = np.array([v for v in values if v is not None])
    edges = np.quantile(known, np.linspace(0, 1, REGRESSION_STRATA + 1)[1:-1]) if len(known) else []
    return [None if v is None else f"q{int(np.searchsorted(edges, v, 'right')) + 1}" for v in values]


class TargetKind:
    """One task kind's reading of the CSV under the settings of `targets` (its columns, labels, separator)."""

    name: ClassVar[str]
    column_count: ClassVar[int | None] = None  # the number of columns it reads, where fixed
    stratum: ClassVar[str] = "stratum"  # how errors name a stratum
    min_strata: ClassVar[int] = 1  # how many strata (classes) a training cohort must hold at least: checked above 1
    default_columns: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            KINDS[cls.name] = cls

    def __init__(self, targets: Targets) -> None:
        self.targets = targets
        count, columns = self.column_count, targets.columns
        if count is not None and columns is not None and len(columns) != count:
            raise ValueError(f"targets.columns: {self.name} reads {count or 'no'} column(s), got {columns}")

    @property
    def target_columns(self) -> list[str]:
        """The CSV columns this kind reads besides the standard ones."""
        return list(self.targets.columns or self.default_columns)

    @property
    def uses_label_column(self) -> bool:
        return False

    def check_numbers(self, where: str, cells: dict[str, str | None], numbers: list[float]) -> None:
        """Refuse a parsed row's numbers this kind cannot hold (`where` is file:line); any finite number by default."""

    def names(self, rows: Sequence[SlideLabel], path: str | os.PathLike, classes: Sequence[str] | None) -> list[str]:
        """What the head's outputs are called."""
        return self.target_columns

    def encode(self, row: SlideLabel, names: Sequence[str]) -> torch.Tensor | None:
        """The slide's target as a batch holds it; None when unknown."""
        return None if row.target is None else torch.tensor(row.target, dtype=torch.float32)

    def strata(self, rows: Sequence[SlideLabel]) -> list[str | None]:
        """What splits are stratified by, per row; None for an unlabelled row."""
        raise NotImplementedError

    def required_strata(self, strata: Sequence[str | None]) -> list[str]:
        """The strata every split must hold; none by default."""
        return []

    def missing(self, split: Sequence[SlideLabel], cohort: Sequence[SlideLabel]) -> tuple[list[str], list[str]]:
        """What a split of `cohort` lacks that every split needs, and what it holds instead, as errors name them."""
        required = self.required_strata([row.stratum for row in cohort])
        present = sorted({row.stratum for row in split if row.stratum is not None})
        return [repr(s) for s in required if s not in present], [repr(s) for s in present]
