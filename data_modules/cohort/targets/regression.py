"""A number per slide, in one column (`target` by default)."""

from __future__ import annotations

from collections.abc import Sequence

from ..labels import SlideLabel
from .base import TargetKind, quantile_strata

__all__ = ["NumberTargets"]


class NumberTargets(TargetKind):
    """Stratified by the quartile of the target among the labelled rows."""

    name = "regression"
    column_count = 1
    default_columns = ("target",)

    def strata(self, rows: Sequence[SlideLabel]) -> list[str | None]:
        return quantile_strata([None if r.target is None else r.target[0] for r in rows])
