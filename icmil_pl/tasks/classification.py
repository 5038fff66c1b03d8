"""One class per slide."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryF1Score, MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score

from data_modules.io import check

from ..outputs.plots import confusion_figure, prediction_title, roc_figure
from .base import Task

__all__ = ["Classification", "slide_metrics"]


class Classification(Task):
    """One class per slide: softmax cross entropy; AUROC selects; outputs are class probabilities."""

    kind = "classification"
    metric_names = ("auroc", "accuracy", "f1", "balanced_accuracy")
    monitor = "auroc"
    probabilities = "softmax"

    def bag_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits.unsqueeze(0), target.view(1).long())

    def metrics(self, names: list[str]) -> MetricCollection:
        return slide_metrics(len(names))

    def strata(self, targets: Sequence[Tensor]) -> list[str]:
        return [str(int(t)) for t in targets]

    def check_targets(self, targets: Mapping[str, Tensor], head_size: int) -> None:
        classes = self.name_count(head_size)
        bad = {k: int(v) for k, v in targets.items() if not 0 <= int(v) < classes}
        check("labels", not bad, f"class indices in [0, {classes})", bad)

    def outputs(self, logits: Tensor) -> Tensor:
        return logits.float().softmax(-1)

    def output_names(self, names: list[str]) -> list[str]:
        return [f"prob_{n}" for n in names]

    def metric_input(self, outputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        return outputs, target.long().view(-1)

    def describe_target(self, target: Tensor | None, names: list[str]) -> str:
        return "" if target is None else names[int(target)]

    def describe_call(self, outputs: Tensor, names: list[str]) -> str:
        return names[int(outputs.argmax())]

    def title(self, slide_id: str, target: Tensor | None, outputs: Tensor, names: list[str]) -> str:
        return prediction_title(slide_id, names, None if target is None else int(target), outputs.tolist())

    def test_figures(self, targets: Tensor, outputs: Tensor, names: list[str]) -> dict[str, Figure]:
        labels = targets.long().view(-1).tolist()
        probs = outputs.numpy()
        figures = {"test_confusion.png": confusion_figure(labels, probs.argmax(1), names, "test confusion matrix")}
        if len(names) == 2 and len(set(labels)) == 2:
            figures["test_roc.png"] = roc_figure(labels, probs[:, 1], "test ROC")
        return figures


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
