"""A number per slide."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.regression import MeanAbsoluteError, PearsonCorrCoef, R2Score, SpearmanCorrCoef

from data_modules.cohort.targets import REGRESSION_STRATA, quantile_strata
from data_modules.io import check_choice

from ..outputs.plots import scatter_figure
from .base import Task

__all__ = ["Regression", "regression_metrics"]


class Regression(Task):
    """A number per slide: MSE or Huber loss on the target standardised by the training split's mean and standard
    deviation (`standardize`; the scale is kept in the checkpoint), predictions in the target's units; MAE selects."""

    kind = "regression"
    metric_names = ("mae", "pearson", "spearman", "r2")
    monitor = "mae"
    mode = "min"

    def __init__(
        self, loss: Literal["mse", "huber"] = "mse", standardize: bool = True, huber_delta: float = 1.0
    ) -> None:
        super().__init__()
        check_choice("loss", loss, ("mse", "huber"))
        self.loss_name = loss
        self.standardize = standardize
        self.huber_delta = huber_delta
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))

    def head_size(self, n_names: int) -> int:
        return 1

    def fit_targets(self, targets: Tensor) -> None:
        if self.standardize:
            values = targets.float().reshape(-1)
            self.target_mean.copy_(values.mean())
            self.target_std.copy_(values.std().clamp_min(1e-6) if len(values) > 1 else torch.ones(()))

    def bag_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        scaled = (target.float().reshape(1) - self.target_mean) / self.target_std
        if self.loss_name == "huber":
            return F.huber_loss(logits.reshape(1), scaled, delta=self.huber_delta)
        return F.mse_loss(logits.reshape(1), scaled)

    def metrics(self, names: list[str]) -> MetricCollection:
        return regression_metrics()

    def strata(self, targets: Sequence[Tensor]) -> list[str]:
        """The quartile of the target, as the data's splits (`data_modules.cohort.targets.quantile_strata`), where
        there are bags enough for two a quartile (a hold-out needs two per stratum); one stratum below that."""
        if len(targets) < 2 * REGRESSION_STRATA:
            return super().strata(targets)
        return quantile_strata([float(t.reshape(-1)[0]) for t in targets])

    def outputs(self, logits: Tensor) -> Tensor:
        return logits.float() * self.target_std + self.target_mean

    def output_names(self, names: list[str]) -> list[str]:
        return [f"predicted_{names[0]}" if names else "predicted"]

    def metric_input(self, outputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        return outputs.reshape(-1), target.float().reshape(-1)

    def describe_target(self, target: Tensor | None, names: list[str]) -> str:
        return "" if target is None else f"{float(target.reshape(-1)[0]):.6g}"

    def describe_call(self, outputs: Tensor, names: list[str]) -> str:
        return f"{float(outputs.reshape(-1)[0]):.6g}"

    def test_figures(self, targets: Tensor, outputs: Tensor, names: list[str]) -> dict[str, Figure]:
        name = names[0] if names else "target"
        return {"test_scatter.png": scatter_figure(targets.reshape(-1), outputs.reshape(-1), name)}


class _AtLeastTwo(R2Score):
    """R^2, NaN below two slides (torchmetrics raises there: a one-slide validation under fast_dev_run)."""

    def compute(self) -> Tensor:
        return super().compute() if int(self.total) >= 2 else torch.tensor(math.nan)


def regression_metrics() -> MetricCollection:
    """Over (predictions (N,), targets (N,)) in the target's own units."""
    return MetricCollection(
        {"mae": MeanAbsoluteError(), "pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef(), "r2": _AtLeastTwo()}
    )
