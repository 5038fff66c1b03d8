"""What slides are labelled with, from the labels CSV: a class, several labels, a number, or a survival time and
event. One `Targets` per cohort names the task and its columns; it reads and checks every cell (errors name the
file, row and column), gives each slide the stratum its splits are stratified by, and encodes targets as tensors.

CSV columns per task (besides `slide_id`, `patient_id`, `split`, `mpp`):
- classification: `label`, a class;
- multilabel: one 0/1 column per label (`columns: [a, b]`), or `label` holding the slide's labels joined by
  `separator` (`a;b`; `none` for a slide with none of them; `labels` lists the names, default: those present);
- regression: one number column (`columns: [target]` by default);
- survival: `time` (>= 0) and `event` (1: the event was observed at `time`, 0: censored) (`columns: [time, event]`).
An empty cell (every target cell of the row empty) means unknown: such a slide can be predicted, never trained on.
Any other column is refused (a misspelt `patient_id` must not pass unseen) unless `ignore` names it.

Each kind is a `TargetKind` in a module of this package, registered under its name; a new kind is a new module.
"""

from __future__ import annotations

import importlib
import math
import os
import pkgutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from ..labels import SlideLabel, cell_number
from .base import KINDS, REGRESSION_STRATA, TargetKind, class_index, quantile_strata
from .multilabel import NO_LABELS

__all__ = ["KINDS", "NO_LABELS", "REGRESSION_STRATA", "TargetKind", "Targets", "class_index", "quantile_strata"]

for _module in pkgutil.iter_modules(__path__):  # every kind registers itself in KINDS when imported
    importlib.import_module(f"{__name__}.{_module.name}")


@dataclass(frozen=True)
class Targets:
    """The task of a cohort's labels and the CSV columns that hold them (see the module docstring). `task`: a kind
    of `KINDS` (classification, multilabel, regression, survival, ...)."""

    task: str = "classification"
    columns: list[str] | None = None
    labels: list[str] | None = None
    separator: str = ";"
    ignore: list[str] | None = None  # other columns the CSV may hold and the task does not read (clinical data)

    def __post_init__(self) -> None:
        if self.task not in KINDS:
            raise ValueError(f"targets.task: expected one of {', '.join(sorted(KINDS))}, got {self.task!r}")
        _ = self.kind  # built now, so that its checks of the columns fail where the config is read

    @cached_property
    def kind(self) -> TargetKind:
        """The task kind's reading of the CSV under these settings."""
        return KINDS[self.task](self)

    @property
    def target_columns(self) -> list[str]:
        """The CSV columns this task reads besides the standard ones."""
        return self.kind.target_columns

    @property
    def allowed_columns(self) -> list[str]:
        """The columns a labels CSV may hold besides the standard ones: the task's, and those it is told to ignore."""
        return [*self.target_columns, *(c for c in self.ignore or [] if c not in self.target_columns)]

    @property
    def uses_label_column(self) -> bool:
        return self.kind.uses_label_column

    def parse(self, path: str | os.PathLike, line: int, cells: Mapping[str, str | None]) -> tuple[float, ...] | None:
        """The numeric target of one CSV row (None: unknown, or a task that keeps its `label` string)."""
        columns = self.target_columns
        if not columns:
            return None
        values = [cells.get(c) for c in columns]
        if all(v is None for v in values):
            return None
        where = f"{path}:{line}"
        empty = [c for c, v in zip(columns, values, strict=True) if v is None]
        if empty:
            raise ValueError(
                f"{where}: column {empty[0]!r} is empty while {', '.join(set(columns) - set(empty))} is set"
            )
        numbers = []
        for column, value in zip(columns, values, strict=True):
            try:
                number = cell_number(value)
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                raise ValueError(f"{where}: column {column!r} is {value!r}, not a number")
            numbers.append(number)
        self.kind.check_numbers(where, dict(cells), numbers)
        return tuple(numbers)

    def names(
        self, rows: Sequence[SlideLabel], path: str | os.PathLike, classes: Sequence[str] | None = None
    ) -> list[str]:
        """What the head's outputs are: class names (classification), label names (multilabel), else the columns.
        Classes are indexed by `class_index`'s one rule."""
        return self.kind.names(rows, path, classes)

    def encode(self, row: SlideLabel, names: Sequence[str]) -> torch.Tensor | None:
        """The slide's target as a batch holds it: a class index (long scalar), a (K,) 0/1 float vector, a (1,)
        number, or (time, event); None when unknown."""
        return self.kind.encode(row, names)

    def strata(self, rows: Sequence[SlideLabel]) -> list[str | None]:
        """What splits are stratified by, per row: the class; the set of labels; the quartile of the target among
        the labelled rows; whether the event was observed. None for an unlabelled row."""
        return self.kind.strata(rows)

    def required_strata(self, strata: Sequence[str | None]) -> list[str]:
        """The strata every split must hold: every class (a split of one class has no AUROC); for survival an
        observed event (a split without events has no c-index); none for regression and multilabel."""
        return self.kind.required_strata(strata)

    def missing(self, split: Sequence[SlideLabel], cohort: Sequence[SlideLabel]) -> tuple[list[str], list[str]]:
        """What a split of `cohort` lacks that every split needs, and what it holds instead, as errors name them (see
        `describe`)."""
        return self.kind.missing(split, cohort)

    def describe(self) -> str:
        """How errors name a stratum."""
        return self.kind.stratum
