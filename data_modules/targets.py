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
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from .cohort import SlideLabel

__all__ = ["NO_LABELS", "TaskKind", "Targets", "class_index"]

TaskKind = Literal["classification", "multilabel", "regression", "survival"]
NO_LABELS = "none"  # a separator-joined multilabel cell for a slide with none of the labels
REGRESSION_STRATA = 4  # regression splits are stratified by quartile of the target
EVENT, CENSORED = "event", "censored"


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


@dataclass(frozen=True)
class Targets:
    """The task of a cohort's labels and the CSV columns that hold them (see the module docstring)."""

    task: TaskKind = "classification"
    columns: list[str] | None = None
    labels: list[str] | None = None
    separator: str = ";"
    ignore: list[str] | None = None  # other columns the CSV may hold and the task does not read (clinical data)

    def __post_init__(self) -> None:
        if self.task not in ("classification", "multilabel", "regression", "survival"):
            raise ValueError(
                f"targets.task: expected classification, multilabel, regression or survival, got {self.task!r}"
            )
        need = {"classification": 0, "regression": 1, "survival": 2}.get(self.task)
        if need is not None and self.columns is not None and len(self.columns) != need:
            raise ValueError(f"targets.columns: {self.task} reads {need or 'no'} column(s), got {self.columns}")
        if self.task == "multilabel" and self.columns is not None and len(self.columns) < 1:
            raise ValueError("targets.columns: expected one 0/1 column per label, got none")

    @property
    def target_columns(self) -> list[str]:
        """The CSV columns this task reads besides the standard ones."""
        if self.task == "regression":
            return list(self.columns or ["target"])
        if self.task == "survival":
            return list(self.columns or ["time", "event"])
        if self.task == "multilabel":
            return list(self.columns or [])
        return []

    @property
    def allowed_columns(self) -> list[str]:
        """The columns a labels CSV may hold besides the standard ones: the task's, and those it is told to ignore."""
        return [*self.target_columns, *(c for c in self.ignore or [] if c not in self.target_columns)]

    @property
    def uses_label_column(self) -> bool:
        return self.task == "classification" or (self.task == "multilabel" and not self.columns)

    # -- reading one row ---------------------------------------------------------------------------------------------
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
                number = float(value)
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                raise ValueError(f"{where}: column {column!r} is {value!r}, not a number")
            numbers.append(number)
        if self.task == "survival":
            (time_col, event_col), (time, event) = columns, numbers
            if time < 0:
                raise ValueError(f"{where}: column {time_col!r} is {time:g}, a negative survival time")
            if event not in (0.0, 1.0):
                raise ValueError(
                    f"{where}: column {event_col!r} is {values[1]!r}; events are 1 (observed) or 0 (censored)"
                )
        if self.task == "multilabel":
            bad = next((c for c, n in zip(columns, numbers, strict=True) if n not in (0.0, 1.0)), None)
            if bad is not None:
                raise ValueError(f"{where}: column {bad!r} is {cells[bad]!r}; a label column holds 1 (present) or 0")
        return tuple(numbers)

    # -- the cohort --------------------------------------------------------------------------------------------------
    def names(
        self, rows: Sequence[SlideLabel], path: str | os.PathLike, classes: Sequence[str] | None = None
    ) -> list[str]:
        """What the head's outputs are: class names (classification), label names (multilabel), else the columns.
        Classification indexes classes by `cohort.class_index`'s one rule."""
        if self.task == "classification":
            return list(class_index(rows, path, classes))
        if self.task == "multilabel" and not self.columns:
            present = sorted({name for row in rows for name in self._joined(row)})
            names = list(self.labels or classes or present)
            for row in rows:
                unknown = next((n for n in self._joined(row) if n not in names), None)
                if unknown is not None:
                    raise ValueError(
                        f"{path}:{row.line}: column 'label' names {unknown!r}, not one of the labels {names}"
                    )
            return names
        return self.target_columns

    def encode(self, row: SlideLabel, names: Sequence[str]) -> torch.Tensor | None:
        """The slide's target as a batch holds it: a class index (long scalar), a (K,) 0/1 float vector, a (1,)
        number, or (time, event); None when unknown."""
        if self.task == "classification":
            return None if row.label is None else torch.tensor(list(names).index(row.label))
        if self.task == "multilabel" and not self.columns:
            if row.label is None:
                return None
            present = set(self._joined(row))
            return torch.tensor([float(n in present) for n in names])
        return None if row.target is None else torch.tensor(row.target, dtype=torch.float32)

    def strata(self, rows: Sequence[SlideLabel]) -> list[str | None]:
        """What splits are stratified by, per row: the class; the set of labels; the quartile of the target among
        the labelled rows; whether the event was observed. None for an unlabelled row."""
        if self.task == "classification":
            return [row.label for row in rows]
        if self.task == "multilabel":
            if not self.columns:
                return [None if r.label is None else self.separator.join(sorted(self._joined(r))) for r in rows]
            return [None if r.target is None else "".join(str(int(v)) for v in r.target) for r in rows]
        if self.task == "survival":
            return [None if r.target is None else (EVENT if r.target[1] else CENSORED) for r in rows]
        known = np.array([r.target[0] for r in rows if r.target is not None])
        edges = np.quantile(known, np.linspace(0, 1, REGRESSION_STRATA + 1)[1:-1]) if len(known) else []
        return [None if r.target is None else f"q{int(np.searchsorted(edges, r.target[0], 'right')) + 1}" for r in rows]

    def required_strata(self, strata: Sequence[str | None]) -> list[str]:
        """The strata every split must hold: every class (a split of one class has no AUROC); for survival an
        observed event (a split without events has no c-index); none for regression and multilabel."""
        present = sorted({s for s in strata if s is not None})
        if self.task == "classification":
            return present
        if self.task == "survival":
            return [EVENT]
        return []

    def missing(self, split: Sequence[SlideLabel], cohort: Sequence[SlideLabel]) -> tuple[list[str], list[str]]:
        """What a split of `cohort` lacks that every split needs, and what it holds instead, as errors name them (see
        `describe`): every class (`required_strata`); for multilabel both values of every label, 1 (a slide with it)
        and 0 (one without): a label with one value has no AUROC, recorded as 0, which halves the macro AUROC."""
        if self.task != "multilabel":
            required = self.required_strata([row.stratum for row in cohort])
            present = sorted({row.stratum for row in split if row.stratum is not None})
            return [repr(s) for s in required if s not in present], [repr(s) for s in present]
        names = self.target_columns or self.labels or sorted({name for row in cohort for name in self._joined(row)})
        held = [self._held(row, names) for row in split if row.labelled]
        lacks, holds = [], []
        for name in names:
            values = {int(name in labels) for labels in held}
            if values != {0, 1}:
                lacks += [f"{name!r} = {value}" for value in (1, 0) if value not in values]
                holds += [f"{name!r} = {value}" for value in sorted(values)]
        return lacks, holds

    def describe(self) -> str:
        """How errors name a stratum."""
        names = {"classification": "class", "survival": "kind of outcome", "multilabel": "label value"}
        return names.get(self.task, "stratum")

    def _held(self, row: SlideLabel, names: Sequence[str]) -> set[str]:
        """The labels a multilabel slide has."""
        if self.columns:
            return {name for name, value in zip(names, row.target or (), strict=False) if value}
        return set(self._joined(row))

    def _joined(self, row: SlideLabel) -> list[str]:
        if row.label is None or row.label == NO_LABELS:
            return []
        return [name.strip() for name in row.label.split(self.separator) if name.strip()]
