"""Per-epoch means of step losses, kept as tensors and logged once at the epoch's end.

Lightning's `self.log` costs about half a millisecond a call (a result object moved, detached and reduced each time):
on a small bag the step itself takes 2 ms, so logging every step was a quarter of the bag phase. A `.item()` per step
instead would stall a GPU's queue; a running sum on the device does neither.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch

__all__ = ["EpochMeans"]


class EpochMeans:
    """Weighted running sums by metric name (`train/loss`, `val/loss`, ...) until `log` hands them to Lightning."""

    def __init__(self) -> None:
        self._sums: dict[str, tuple[torch.Tensor, float]] = {}

    def add(self, name: str, value: torch.Tensor, weight: float = 1.0) -> None:
        """`value` (a scalar tensor; its graph is not kept) counted `weight` times."""
        value = value.detach().float() * weight
        total, count = self._sums.get(name, (0.0, 0.0))
        self._sums[name] = (value + total, count + weight)

    def log(self, module: pl.LightningModule, prefix: str, prog_bar: bool = False) -> None:
        """Log the mean of every name under `prefix` (averaged over the processes under DDP) and forget them."""
        for name in [n for n in self._sums if n.startswith(prefix)]:
            total, count = self._sums.pop(name)
            module.log(name, total / count, prog_bar=prog_bar and name.endswith("/loss"), sync_dist=True)
