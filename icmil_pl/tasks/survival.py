"""Time to an event, right-censored: discrete-time NLL or Cox's partial likelihood; Harrell's and Uno's c-index."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from data_modules.io import check, check_choice

from ..aggregators import MILOutput
from ..outputs.plots import kaplan_meier_figure
from .base import Task

__all__ = ["ConcordanceIndex", "Survival", "cox_loss", "survival_metrics"]


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
    metric_names = ("c_index", "c_index_ipcw")
    monitor = "c_index"

    def __init__(
        self,
        bins: int = 4,
        loss: Literal["nll", "cox"] = "nll",
        select_by: Literal["loss", "c_index"] | None = None,
    ) -> None:
        super().__init__()
        check_choice("loss", loss, ("nll", "cox"))
        check("bins", bins >= 1, "an int >= 1", bins)
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

    def strata(self, targets: Sequence[Tensor]) -> list[str]:
        """Whether the event was observed."""
        return [str(int(t.reshape(-1)[1])) for t in targets]

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
