"""One class per slide, in the `label` column."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..labels import SlideLabel
from .base import TargetKind, class_index

__all__ = ["ClassTargets"]


class ClassTargets(TargetKind):
    """Classes indexed by `class_index`'s one rule; every split must hold every class (one class has no AUROC)."""

    name = "classification"
    column_count = 0
    stratum = "class"
    min_strata = 2  # one class has nothing to tell apart

    @property
    def uses_label_column(self) -> bool:
        return True

    def names(self, rows: Sequence[SlideLabel], path: str | os.PathLike, classes: Sequence[str] | None) -> list[str]:
        return list(class_index(rows, path, classes))

    def encode(self, row: SlideLabel, names: Sequence[str]) -> torch.Tensor | None:
        return None if row.label is None else torch.tensor(list(names).index(row.label))

    def strata(self, rows: Sequence[SlideLabel]) -> list[str | None]:
        return [row.label for row in rows]

    def required_strata(self, strata: Sequence[str | None]) -> list[str]:
        return sorted({s for s in strata if s is not None})
