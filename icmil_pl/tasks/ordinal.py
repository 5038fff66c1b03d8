"""An ordered grade per slide (Gleason / ISUP-like): CORN's conditional binary losses, quadratic weighted kappa."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCohenKappa
from torchmetrics.regression import MeanAbsoluteError

from ..outputs.plots import confusion_figure
from .base import Task
from .classification import Classification

__all__ = ["Ordinal", "grade_metrics"]


class Ordinal(Classification):
    """K ordered grades from K - 1 logits, CORN (Shi et al., 2023): logit k is the conditional probability that the
    grade exceeds k given that it reaches k, trained (binary cross entropy) only on bags whose grade reaches k, so
    P(grade > k) = prod_{j <= k} sigmoid(logit_j) never rises with k (ranks stay consistent without tied weights).
    The call is the number of thresholds passed (P(grade > k) > 0.5); outputs are the K grade probabilities.
    Quadratic weighted kappa selects and heads the table, as PANDA reports it; accuracy and the mean absolute grade
    error beside it. The data's classes are the grades in order (`Targets(task="ordinal")`; give `classes` when
    their names do not sort in grade order); as classes, grades are stratified, checked, named and described."""

    kind = "ordinal"
    metric_names = ("qwk", "accuracy", "mae")
    monitor = "qwk"
    probabilities = "sigmoid"  # each logit is a binary (conditional) probability: what distillation teaches

    def head_size(self, n_names: int) -> int:
        return n_names - 1

    def name_count(self, head_size: int) -> int:
        return head_size + 1

    def exceeds(self, logits: Tensor) -> Tensor:
        """P(grade > k) for k = 0 .. K - 2, (..., K - 1)."""
        return torch.cumprod(logits.float().sigmoid(), dim=-1)

    def bag_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        grade = int(target)
        reached = logits.float()[: min(grade + 1, logits.shape[-1])]  # thresholds 0 .. grade: the bag reaches them
        passed = (torch.arange(len(reached), device=logits.device) < grade).float()
        return F.binary_cross_entropy_with_logits(reached, passed)

    def metrics(self, names: list[str]) -> MetricCollection:
        return grade_metrics(len(names))

    def outputs(self, logits: Tensor) -> Tensor:
        """Grade probabilities, (..., K): P(grade > k - 1) - P(grade > k)."""
        exceeds = self.exceeds(logits)
        ones, zeros = torch.ones_like(exceeds[..., :1]), torch.zeros_like(exceeds[..., :1])
        return torch.cat([ones, exceeds], -1) - torch.cat([exceeds, zeros], -1)

    def call(self, outputs: Tensor) -> Tensor:
        """The grade called from grade probabilities: how many thresholds have P(grade > k) > 0.5."""
        exceeds = 1 - outputs.cumsum(-1)[..., :-1]
        return (exceeds > 0.5).sum(-1)

    def metric_input(self, outputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        return self.call(outputs), target.long().view(-1)

    def describe_call(self, outputs: Tensor, names: list[str]) -> str:
        return names[int(self.call(outputs))]

    title = Task.title  # the call beside the truth; a class's title names the most probable grade, not the call

    def test_figures(self, targets: Tensor, outputs: Tensor, names: list[str]) -> dict[str, Figure]:
        grades, called = targets.long().view(-1).tolist(), self.call(outputs).tolist()
        return {"test_confusion.png": confusion_figure(grades, called, names, "test grades (true x called)")}


class _GradeError(MeanAbsoluteError):
    """The mean absolute error between called and true grade indices."""

    def update(self, preds: Tensor, target: Tensor) -> None:
        super().update(preds.float(), target.float())


def grade_metrics(num_grades: int) -> MetricCollection:
    """Over (called grades (N,), true grades (N,)), both indices."""
    return MetricCollection(
        {
            "qwk": MulticlassCohenKappa(num_classes=num_grades, weights="quadratic"),
            "accuracy": MulticlassAccuracy(num_classes=num_grades, average="micro"),
            "mae": _GradeError(),
        }
    )
