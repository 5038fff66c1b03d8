"""Slide-level metrics, one definition for every model: AUROC, accuracy, F1, balanced accuracy."""

from __future__ import annotations

from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryF1Score, MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score

METRIC_NAMES = ("auroc", "accuracy", "f1", "balanced_accuracy")


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
