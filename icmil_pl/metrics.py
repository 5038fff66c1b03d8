"""Slide-level metrics, one definition per task for every model, and the names they are logged under.

classification: AUROC, accuracy, F1, balanced accuracy; multilabel: macro and per-label AUROC, accuracy, F1;
regression: MAE, Pearson and Spearman r, R^2; survival: Harrell's c-index and Uno's IPCW c-index (scikit-survival).
A metric that returns one value per label is named `<metric>_per_label` and logged as `<metric>_<label>`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelAUROC,
    MultilabelF1Score,
)
from torchmetrics.regression import MeanAbsoluteError, PearsonCorrCoef, R2Score, SpearmanCorrCoef

__all__ = [
    "METRIC_NAMES",
    "TASK_METRICS",
    "ConcordanceIndex",
    "flatten_per_label",
    "multilabel_metrics",
    "regression_metrics",
    "slide_metrics",
    "survival_metrics",
]

TASK_METRICS = {
    "classification": ("auroc", "accuracy", "f1", "balanced_accuracy"),
    "multilabel": ("auroc", "accuracy", "f1"),
    "regression": ("mae", "pearson", "spearman", "r2"),
    "survival": ("c_index", "c_index_ipcw"),
}
METRIC_NAMES = tuple(dict.fromkeys(name for names in TASK_METRICS.values() for name in names))
PER_LABEL = "_per_label"


class PositiveClassF1(BinaryF1Score):
    """F1 of class 1 from (N, 2) probabilities: the F1 that binary slide-classification papers report."""

    def update(self, preds: Tensor, target: Tensor) -> None:
        super().update(preds[:, 1], target)


def slide_metrics(num_classes: int) -> MetricCollection:
    """Metrics over (probabilities (N, C), labels (N,)). For two classes the macro AUROC equals the binary AUROC."""
    return MetricCollection(
        {
            "auroc": MulticlassAUROC(num_classes=num_classes),
            "accuracy": MulticlassAccuracy(num_classes=num_classes, average="micro"),
            "f1": PositiveClassF1() if num_classes == 2 else MulticlassF1Score(num_classes=num_classes),
            "balanced_accuracy": MulticlassAccuracy(num_classes=num_classes, average="macro"),
        }
    )


def multilabel_metrics(num_labels: int) -> MetricCollection:
    """Over (probabilities (N, K), 0/1 targets (N, K)): macro AUROC and each label's, mean per-label accuracy and
    macro F1 at 0.5."""
    return MetricCollection(
        {
            "auroc": MultilabelAUROC(num_labels=num_labels, average="macro"),
            f"auroc{PER_LABEL}": MultilabelAUROC(num_labels=num_labels, average=None),
            "accuracy": MultilabelAccuracy(num_labels=num_labels, average="macro"),
            "f1": MultilabelF1Score(num_labels=num_labels, average="macro"),
        }
    )


class _AtLeastTwo(R2Score):
    """R^2, NaN below two slides (torchmetrics raises there: a one-slide validation under fast_dev_run)."""

    def compute(self) -> Tensor:
        return super().compute() if int(self.total) >= 2 else torch.tensor(math.nan)


def regression_metrics() -> MetricCollection:
    """Over (predictions (N,), targets (N,)) in the target's own units."""
    return MetricCollection(
        {"mae": MeanAbsoluteError(), "pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef(), "r2": _AtLeastTwo()}
    )


class ConcordanceIndex(Metric):
    """Concordance of a risk score with (time, event) over a whole stage: Harrell's c-index, or with `ipcw` Uno's
    inverse-probability-of-censoring weighted one (censoring distribution estimated on the same slides, since a
    checkpoint carries no training times). NaN where no pair is comparable (no events)."""

    full_state_update = False

    def __init__(self, ipcw: bool = False) -> None:
        super().__init__()
        self.ipcw = ipcw
        self.add_state("risk", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, risk: Tensor, target: Tensor) -> None:
        self.risk.append(risk.detach().reshape(-1).float())
        self.target.append(target.detach().reshape(-1, 2).float())

    def compute(self) -> Tensor:
        from sksurv.metrics import concordance_index_censored, concordance_index_ipcw
        from sksurv.util import Surv

        risk = _cat(self.risk).cpu().numpy().astype(np.float64)
        target = _cat(self.target).cpu().numpy().astype(np.float64)
        time, event = target[:, 0], target[:, 1] > 0.5
        if len(risk) < 2 or not event.any():
            return torch.tensor(math.nan)
        try:
            if self.ipcw:
                survival = Surv.from_arrays(event, time)
                value = concordance_index_ipcw(survival, survival, risk)[0]
            else:
                value = concordance_index_censored(event, time, risk)[0]
        except ValueError:  # no comparable pair, or a censoring distribution that reaches 0 before the last time
            return torch.tensor(math.nan)
        return torch.tensor(float(value))


def _cat(values: list[Tensor] | Tensor) -> Tensor:
    return torch.cat(values) if isinstance(values, list) else values


def survival_metrics() -> MetricCollection:
    """Over (risk (N,), (time, event) (N, 2)): higher risk, earlier event."""
    return MetricCollection({"c_index": ConcordanceIndex(), "c_index_ipcw": ConcordanceIndex(ipcw=True)})


def flatten_per_label(values: dict[str, Tensor], labels: list[str]) -> dict[str, Tensor]:
    """`<stage>/<metric>_per_label` (one value per label) -> `<stage>/<metric>_<label>` each; others as they are."""
    out = {}
    for name, value in values.items():
        if name.endswith(PER_LABEL):
            base = name.removesuffix(PER_LABEL)
            out.update({f"{base}_{label}": v for label, v in zip(labels, value.reshape(-1), strict=True)})
        else:
            out[name] = value
    return out
