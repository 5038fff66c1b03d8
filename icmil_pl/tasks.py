"""What a slide model learns: each task owns its loss, its head size, its metrics, the metric that selects
checkpoints (`monitor`), what its outputs are called and the figures of a test run. A task is a component of every
slide model (`BagClassifier`, `EndToEndMIL`, ICMIL's couplings), chosen in YAML:

    task: {class_path: Survival, init_args: {bins: 4}}

Its data must say the same (`data.init_args.targets.task: survival`, `data_modules.targets`): the data reads the
CSV columns, the task learns from them. A task is an `nn.Module` so that what it fits on the training targets (the
survival time bins, the regression target scale) is saved in the checkpoint.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn
from torchmetrics import MetricCollection

from data_modules.targets import NO_LABELS, TaskKind

from .aggregators import MILOutput
from .metrics import TASK_METRICS, multilabel_metrics, regression_metrics, slide_metrics, survival_metrics
from .plots import (
    confusion_figure,
    kaplan_meier_figure,
    multilabel_roc_figure,
    prediction_title,
    roc_figure,
    scatter_figure,
)

__all__ = ["Classification", "MultiLabel", "Regression", "Survival", "Task", "check_data", "cox_loss"]


class Task(nn.Module):
    """The base of the four tasks. `names` are what the data calls the head's outputs (classes, labels, target
    columns: `BagDataModule.classes`)."""

    kind: ClassVar[TaskKind]
    monitor: ClassVar[str]  # the headline validation metric: tables, the by-iteration figure, checkpoint selection
    mode: ClassVar[Literal["max", "min"]] = "max"
    needs_several_bags: ClassVar[bool] = False  # a loss defined over several bags at once (Cox)

    def head_size(self, n_names: int) -> int:
        """The aggregator's `num_classes` for data with `n_names` outputs."""
        return n_names

    @property
    def selects_by(self) -> tuple[str, Literal["max", "min"]]:
        """The validation metric (without `val/`) and direction that select a bag classifier's checkpoint."""
        return self.monitor, self.mode

    def fit_targets(self, targets: Tensor) -> None:
        """Learn what the loss needs from the training split's targets (stacked); nothing by default."""

    @property
    def metric_names(self) -> tuple[str, ...]:
        return TASK_METRICS[self.kind]

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


class Classification(Task):
    """One class per slide: softmax cross entropy; AUROC selects; outputs are class probabilities."""

    kind = "classification"
    monitor = "auroc"

    def bag_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits.unsqueeze(0), target.view(1).long())

    def metrics(self, names: list[str]) -> MetricCollection:
        return slide_metrics(len(names))

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


class MultiLabel(Task):
    """Several labels per slide, each present or not: a sigmoid per label and binary cross entropy; macro AUROC
    selects; outputs are per-label probabilities, and the call is the labels above `threshold`."""

    kind = "multilabel"
    monitor = "auroc"

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        if not 0 < threshold < 1:
            raise ValueError(f"threshold: expected a float in (0, 1), got {threshold}")
        self.threshold = threshold

    def bag_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, target.float())

    def metrics(self, names: list[str]) -> MetricCollection:
        return multilabel_metrics(len(names))

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


class Regression(Task):
    """A number per slide: MSE or Huber loss on the target standardised by the training split's mean and standard
    deviation (`standardize`; the scale is kept in the checkpoint), predictions in the target's units; MAE selects."""

    kind = "regression"
    monitor = "mae"
    mode = "min"

    def __init__(
        self, loss: Literal["mse", "huber"] = "mse", standardize: bool = True, huber_delta: float = 1.0
    ) -> None:
        super().__init__()
        if loss not in ("mse", "huber"):
            raise ValueError(f"loss: expected 'mse' or 'huber', got {loss!r}")
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


class Survival(Task):
    """Time to an event, right-censored. `loss: nll` (default): discrete-time survival, the head gives a hazard
    logit per time bin, bins cut at quantiles of the training split's event times, negative log-likelihood of each
    bag on its own (so it trains one bag per step and under the chunked backward); the risk is minus the expected
    number of bins survived. `loss: cox`: one log-risk per slide and Cox's partial likelihood (Breslow ties) over the
    bags of a step, which needs several bags per step (`BagClassifier.bags_per_step`).

    `select_by` picks checkpoints: "loss" (the default under nll) is the validation NLL, which moves smoothly with
    every bag; "c_index" (the default, and the only choice, under cox, which has no loss of one bag) ranks a
    validation split of a dozen patients, whose pair order flips with one bag. On the task configs' cohort
    selecting by loss tested better (see benchmarks/RESULTS.md, "Tasks on a synthetic cohort")."""

    kind = "survival"
    monitor = "c_index"

    def __init__(
        self,
        bins: int = 4,
        loss: Literal["nll", "cox"] = "nll",
        select_by: Literal["loss", "c_index"] | None = None,
    ) -> None:
        super().__init__()
        if loss not in ("nll", "cox"):
            raise ValueError(f"loss: expected 'nll' or 'cox', got {loss!r}")
        if bins < 1:
            raise ValueError(f"bins: expected an int >= 1, got {bins}")
        select_by = select_by or ("loss" if loss == "nll" else "c_index")
        if select_by not in ("loss", "c_index") or (loss == "cox" and select_by == "loss"):
            allowed = (
                "'c_index' (a Cox loss has no validation loss of one bag)" if loss == "cox" else "'loss' or 'c_index'"
            )
            raise ValueError(f"select_by: expected {allowed}, got {select_by!r}")
        self.select_by = select_by
        self.bins = bins if loss == "nll" else 1
        self.loss_name = loss
        self.register_buffer("cuts", torch.zeros(max(self.bins - 1, 0)))  # interior bin edges, time units

    @property
    def needs_several_bags(self) -> bool:  # type: ignore[override]
        return self.loss_name == "cox"

    @property
    def selects_by(self) -> tuple[str, Literal["max", "min"]]:
        return ("loss", "min") if self.select_by == "loss" else ("c_index", "max")

    def head_size(self, n_names: int) -> int:
        return self.bins

    def fit_targets(self, targets: Tensor) -> None:
        if self.loss_name != "nll" or self.bins == 1:
            return
        times, events = targets[:, 0].double(), targets[:, 1] > 0.5
        observed = times[events] if events.any() else times
        quantiles = torch.linspace(0, 1, self.bins + 1, dtype=torch.float64)[1:-1]
        self.cuts.copy_(torch.quantile(observed, quantiles).float())

    def bag_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.loss_name == "cox":
            raise ValueError("Survival(loss='cox') has no loss for one bag: it compares the bags of a step")
        time, event = target.float().reshape(2)
        k = torch.bucketize(time.reshape(1), self.cuts, right=True).reshape(())  # the bin the time falls in
        log_survive = F.logsigmoid(-logits)  # log(1 - h_j)
        survived_before = log_survive[:k].sum()
        if event > 0.5:
            return -(survived_before + F.logsigmoid(logits[k]))
        return -(survived_before + log_survive[k])

    def loss(self, out: MILOutput, target: Tensor, aux_weight: float) -> Tensor:
        if self.loss_name == "cox":
            raise ValueError("Survival(loss='cox') has no loss for one bag: it compares the bags of a step")
        return super().loss(out, target, aux_weight)

    def loss_of_bags(self, outs: list[MILOutput], targets: list[Tensor], aux_weight: float) -> Tensor:
        if self.loss_name == "nll":
            return super().loss_of_bags(outs, targets, aux_weight)
        risk = torch.stack([o.logits.float().reshape(()) for o in outs])
        target = torch.stack([t.float().reshape(2) for t in targets])
        return cox_loss(risk, target[:, 0], target[:, 1])

    def metrics(self, names: list[str]) -> MetricCollection:
        return survival_metrics()

    def outputs(self, logits: Tensor) -> Tensor:
        """The risk, (..., 1): minus the expected number of bins survived (nll), or the log-risk (cox)."""
        logits = logits.float()
        if self.loss_name == "cox":
            return logits[..., :1]
        survival = torch.cumprod(torch.sigmoid(-logits), dim=-1)
        return -survival.sum(-1, keepdim=True)

    def output_names(self, names: list[str]) -> list[str]:
        return ["risk"]

    def metric_input(self, outputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        return outputs.reshape(-1), target.float().reshape(-1, 2)

    def describe_target(self, target: Tensor | None, names: list[str]) -> str:
        if target is None:
            return ""
        time, event = target.reshape(2).tolist()
        return f"{time:g} ({'event' if event > 0.5 else 'censored'})"

    def describe_call(self, outputs: Tensor, names: list[str]) -> str:
        return f"risk {float(outputs.reshape(-1)[0]):.4g}"

    def test_figures(self, targets: Tensor, outputs: Tensor, names: list[str]) -> dict[str, Figure]:
        t = targets.reshape(-1, 2).numpy()
        return {"test_km.png": kaplan_meier_figure(t[:, 0], t[:, 1] > 0.5, outputs.reshape(-1).numpy(), "test")}


def cox_loss(risk: Tensor, time: Tensor, event: Tensor) -> Tensor:
    """Cox's negative log partial likelihood, Breslow's ties, averaged over events (0 where there is none)."""
    order = torch.argsort(time, descending=True)
    risk, time, event = risk[order], time[order], event[order]
    log_cumulative = torch.logcumsumexp(risk, dim=0)  # log sum over the risk set {j: t_j >= t_i} when times differ
    # ties: every slide tied at t_i is in its risk set, so use the value at the last index of each tied group
    last = torch.searchsorted(-time, -time, right=True) - 1
    log_risk_set = log_cumulative[last]
    n_events = event.sum()
    if n_events == 0:
        return risk.sum() * 0.0
    return -((risk - log_risk_set) * event).sum() / n_events


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
