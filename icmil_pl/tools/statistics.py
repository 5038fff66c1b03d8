"""Means with confidence intervals over seeds or folds: the form in which the project states any claim that one
setting learns better than another."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats

__all__ = ["MeanInterval", "mean_interval"]


@dataclass(frozen=True)
class MeanInterval:
    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def mean_interval(values: Sequence[float], level: float = 0.95) -> MeanInterval:
    """The mean and its Student-t interval (n - 1 degrees of freedom): with 5 seeds, mean +- 2.78 standard errors.
    One value has no interval (low = high = the value); paired differences go in as the per-seed differences."""
    n = len(values)
    if n == 0:
        raise ValueError("values: expected at least one value")
    mean = sum(values) / n
    if n == 1:
        return MeanInterval(mean, mean, mean, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return MeanInterval(mean, mean - half, mean + half, n)
