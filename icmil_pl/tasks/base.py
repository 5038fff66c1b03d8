"""What every task owns and offers: its loss, head size, metrics, selection, outputs and figures, and the
capabilities the rest of the framework asks for instead of comparing task kinds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from torchmetrics import MetricCollection

from ..aggregators import MILOutput

__all__ = ["PER_LABEL", "TASKS", "Task", "check_data", "flatten_per_label"]

PER_LABEL = "_per_label"  # a metric giving one value per label is named <metric>_per_label, logged <metric>_<label>
TASKS: dict[str, type[Task]] = {}  # kind -> task, filled as each task's module is imported (`icmil_pl.tasks`)


class Task(nn.Module):
    """The base of every task. `names` are what the data calls the head's outputs (classes, labels, target
    columns: `BagDataModule.classes`). Code outside `tasks/` asks a task what it can do (`probabilities`,
    `strata`, `check_targets`, ...), never which kind it is; `kind` only names it, as the data's targets do."""

    kind: ClassVar[str]  # as `data.init_args.targets.task` names it
    metric_names: ClassVar[tuple[str, ...]]  # what `metrics` computes and `results.json` records, `monitor` first
    monitor: ClassVar[str]  # the headline validation metric: tables, the by-iteration figure, checkpoint selection
    mode: ClassVar[Literal["max", "min"]] = "max"
    needs_several_bags: ClassVar[bool] = False  # a loss defined over several bags at once (Cox)
    # what the head's logits mean: a softmax over classes (a patch's call is its most probable class), a sigmoid each
    # (each label, or each ordinal threshold, a binary of its own), or None: a value or a risk, no pseudo-label
    probabilities: ClassVar[Literal["softmax", "sigmoid"] | None] = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            TASKS[cls.kind] = cls

    def head_size(self, n_names: int) -> int:
        """The aggregator's `num_classes` for data with `n_names` outputs."""
        return n_names

    def name_count(self, head_size: int) -> int:
        """How many names (classes, labels) a head of `head_size` outputs serves, where it is known without data."""
        return head_size

    @property
    def selects_by(self) -> tuple[str, Literal["max", "min"]]:
        """The validation metric (without `val/`) and direction that select a bag classifier's checkpoint."""
        return self.monitor, self.mode

    def fit_targets(self, targets: Tensor) -> None:
        """Learn what the loss needs from the training split's targets (stacked); nothing by default."""

    def strata(self, targets: Sequence[Tensor]) -> list[str]:
        """What a hold-out of bags with these encoded targets is stratified by, one stratum per bag (the data side's
        `Targets.strata` does the same for CSV rows); one stratum by default."""
        return ["all"] * len(targets)

    def check_targets(self, targets: Mapping[str, Tensor], head_size: int) -> None:
        """Refuse, in one line, encoded targets (slide id -> target) a head of `head_size` outputs cannot learn;
        nothing to check by default."""

    def bag_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """The loss of one bag's logits (K,) against its target."""
        raise NotImplementedError

    def loss(self, out: MILOutput, target: Tensor, aux_weight: float) -> Tensor:
        """The bag loss plus the mean loss of the aggregator's auxiliary predictions of the same bag target (DTFD
        tier-1 pseudo-bags, DSMIL's max instance)."""
        loss = self.bag_loss(out.logits.float(), target)
        if out.aux_logits is not None:
            aux = torch.stack([self.bag_loss(row.float(), target) for row in out.aux_logits]).mean()
            loss = loss + aux_weight * aux
        return loss

    def loss_of_bags(self, outs: list[MILOutput], targets: list[Tensor], aux_weight: float) -> Tensor:
        """The loss of a step of several bags: the mean of their losses (Cox couples them)."""
        return torch.stack([self.loss(o, t, aux_weight) for o, t in zip(outs, targets, strict=True)]).mean()

    def metrics(self, names: list[str]) -> MetricCollection:
        raise NotImplementedError

    def outputs(self, logits: Tensor) -> Tensor:
        """What a slide's (or, row-wise, a patch's) logits say, in the units people read: (..., len(output_names))."""
        raise NotImplementedError

    def output_names(self, names: list[str]) -> list[str]:
        """The columns of `outputs` in predictions.csv and per patch."""
        raise NotImplementedError

    def metric_input(self, outputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(predictions, targets) of a batch of slides as this task's metrics take them."""
        return outputs, target

    def describe_target(self, target: Tensor | None, names: list[str]) -> str:
        """The truth as predictions.csv's `label` cell."""
        raise NotImplementedError

    def describe_call(self, outputs: Tensor, names: list[str]) -> str:
        """The prediction as predictions.csv's `predicted` cell."""
        raise NotImplementedError

    def test_figures(self, targets: Tensor, outputs: Tensor, names: list[str]) -> dict[str, Figure]:
        """file name -> figure, for the test split's slides (`targets` and `outputs` stacked)."""
        raise NotImplementedError

    def title(self, slide_id: str, target: Tensor | None, outputs: Tensor, names: list[str]) -> str:
        """What a slide's figures say above it: the truth beside the call, so a miss is seen at a glance."""
        truth = "label unknown" if target is None else f"true {self.describe_target(target, names)}"
        return f"{slide_id} ({truth}): predicted {self.describe_call(outputs, names)}"


def check_data(task: Task, data_task: str, names: list[str], num_outputs: int) -> None:
    """The model's task and head against the data's targets: one line naming what to change."""
    if data_task != task.kind:
        raise ValueError(
            f"model task {task.kind!r}, but the data's targets are {data_task!r}: set data.init_args.targets.task: "
            f"{task.kind} (and its columns), or the model's task to match"
        )
    if names and task.head_size(len(names)) != num_outputs:
        raise ValueError(
            f"model aggregator num_classes={num_outputs}, but a {task.kind} task on {names} needs "
            f"{task.head_size(len(names))} outputs"
        )


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
