"""An ordered grade per slide, in the `label` column: classes in grade order."""

from __future__ import annotations

from collections.abc import Sequence

from .classification import ClassTargets

__all__ = ["GradeTargets"]


class GradeTargets(ClassTargets):
    """Grades are classes indexed in order (`classes` in grade order, else the labels sorted: name grades so that
    they sort, e.g. 0-5); stratified by grade, but a split may lack a rare grade (kappa is defined without it)."""

    name = "ordinal"
    stratum = "grade"

    def required_strata(self, strata: Sequence[str | None]) -> list[str]:
        return []
