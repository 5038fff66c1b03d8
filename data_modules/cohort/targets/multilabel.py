"""Several labels per slide: one 0/1 column per label, or `label` holding a slide's labels joined by `separator`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..labels import SlideLabel
from .base import TargetKind

if TYPE_CHECKING:
    from . import Targets

__all__ = ["NO_LABELS", "LabelSetTargets"]

NO_LABELS = "none"  # a separator-joined multilabel cell for a slide with none of the labels


class LabelSetTargets(TargetKind):
    """Label names from the columns, `labels`, the run's classes or those present; stratified by the set of labels;
    every split must hold both values of every label (one value has no AUROC, recorded as 0, which halves the macro
    AUROC)."""

    name = "multilabel"
    stratum = "label value"

    def __init__(self, targets: Targets) -> None:
        super().__init__(targets)
        if targets.columns is not None and len(targets.columns) < 1:
            raise ValueError("targets.columns: expected one 0/1 column per label, got none")

    @property
    def uses_label_column(self) -> bool:
        return not self.targets.columns

    def check_numbers(self, where: str, cells: dict[str, str | None], numbers: list[float]) -> None:
        bad = next((c for c, n in zip(self.target_columns, numbers, strict=True) if n not in (0.0, 1.0)), None)
        if bad is not None:
            raise ValueError(f"{where}: column {bad!r} is {cells[bad]!r}; a label column holds 1 (present) or 0")

    def names(self, rows: Sequence[SlideLabel], path: str | os.PathLike, classes: Sequence[str] | None) -> list[str]:
        if self.targets.columns:
            return self.target_columns
        present = sorted({name for row in rows for name in self._joined(row)})
        names = list(self.targets.labels or classes or present)
        for row in rows:
            unknown = next((n for n in self._joined(row) if n not in names), None)
            if unknown is not None:
                raise ValueError(f"{path}:{row.line}: column 'label' names {unknown!r}, not one of the labels {names}")
        return names

    def encode(self, row: SlideLabel, names: Sequence[str]) -> torch.Tensor | None:
        if self.targets.columns:
            return super().encode(row, names)
        if row.label is None:
            return None
        present = set(self._joined(row))
        return torch.tensor([float(n in present) for n in names])

    def strata(self, rows: Sequence[SlideLabel]) -> list[str | None]:
        if not self.targets.columns:
            separator = self.targets.separator
            return [None if r.label is None else separator.join(sorted(self._joined(r))) for r in rows]
        return [None if r.target is None else "".join(str(int(v)) for v in r.target) for r in rows]

    def missing(self, split: Sequence[SlideLabel], cohort: Sequence[SlideLabel]) -> tuple[list[str], list[str]]:
        names = (
            self.target_columns or self.targets.labels or sorted({name for row in cohort for name in self._joined(row)})
        )
        held = [self._held(row, names) for row in split if row.labelled]
        lacks, holds = [], []
        for name in names:
            values = {int(name in labels) for labels in held}
            if values != {0, 1}:
                lacks += [f"{name!r} = {value}" for value in (1, 0) if value not in values]
                holds += [f"{name!r} = {value}" for value in sorted(values)]
        return lacks, holds

    def _held(self, row: SlideLabel, names: Sequence[str]) -> set[str]:
        """The labels a slide has."""
        if self.targets.columns:
            return {name for name, value in zip(names, row.target or (), strict=False) if value}
        return set(self._joined(row))

    def _joined(self, row: SlideLabel) -> list[str]:
        if row.label is None or row.label == NO_LABELS:
            return []
        return [name.strip() for name in row.label.split(self.targets.separator) if name.strip()]
