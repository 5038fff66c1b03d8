"""A survival time and whether the event was observed (`time`, `event` by default)."""

from __future__ import annotations

from collections.abc import Sequence

from ..labels import SlideLabel
from .base import TargetKind

__all__ = ["SurvivalTargets"]

EVENT, CENSORED = "event", "censored"


class SurvivalTargets(TargetKind):
    """Time >= 0 and event 1 (observed at `time`) or 0 (censored); every split must hold an observed event (a split
    without one has no c-index)."""

    name = "survival"
    column_count = 2
    stratum = "kind of outcome"
    default_columns = ("time", "event")

    def check_numbers(self, where: str, cells: dict[str, str | None], numbers: list[float]) -> None:
        (time_col, event_col), (time, event) = self.target_columns, numbers
        if time < 0:
            raise ValueError(f"{where}: column {time_col!r} is {time:g}, a negative survival time")
        if event not in (0.0, 1.0):
            raise ValueError(
                f"{where}: column {event_col!r} is {cells[event_col]!r}; events are 1 (observed) or 0 (censored)"
            )

    def strata(self, rows: Sequence[SlideLabel]) -> list[str | None]:
        return [None if r.target is None else (EVENT if r.target[1] else CENSORED) for r in rows]

    def required_strata(self, strata: Sequence[str | None]) -> list[str]:
        return [EVENT]
