"""Several labels per slide, each present or not."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MultilabelAccuracy, MultilabelAUROC, MultilabelF1Score

from data_modules.cohort.targets import NO_LABELS
from data_modules.io import check

from ..outputs.plots import multilabel_roc_figure
from .base import PER_LABEL, Task

__all__ = ["MultiLabel", "multilabel_metrics"]


class MultiLabel(Task):
    """Several labels per slide, each present or not: a sigmoid per label and binary cross entropy; macro AUROC
    selects; outputs are per-label probabilities, and the call is the labels above `threshold`."""

    kind = "multilabel"
    metric_names = ("auroc", "accuracy", "f1")
    monitor = "auroc"
    probabilities = "sigmoid"

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        check("threshold", 0 < threshold < 1, "a float in (0, 1)", threshold)
        self.threshold = threshold

    def bag_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, target.float())

    def metrics(self, names: list[str]) -> MetricCollection:
        return multilabel_metrics(len(names))

    def strata(self, targets: Sequence[Tensor]) -> list[str]:
        """The set of labels a slide has."""
        return ["".join(str(int(x)) for x in t.reshape(-1).tolist()) for t in targets]

    def outputs(self, logits: Tensor) -> Tensor:
        return logits.float().sigmoid()

    def output_names(self, names: list[str]) -> list[str]:
        return [f"prob_{n}" for n in names]

    def metric_input(self, outputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        return outputs, target.round().long()

    def describe_target(self, target: Tensor | None, names: list[str]) -> str:
        return "" if target is None else _joined([n for n, t in zip(names, target.tolist(), strict=True) if t > 0.5])

    def describe_call(self, outputs: Tensor, names: list[str]) -> str:
        return _joined([n for n, p in zip(names, outputs.tolist(), strict=True) if p > self.threshold])

    def test_figures(self, targets: Tensor, outputs: Tensor, names: list[str]) -> dict[str, Figure]:
        return {"test_roc.png": multilabel_roc_figure(targets.numpy(), outputs.numpy(), names, "test ROC per label")}


def _joined(names: list[str]) -> str:
    return ";".join(names) or NO_LABELS


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
