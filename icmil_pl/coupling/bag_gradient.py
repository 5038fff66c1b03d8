"""Coupling with the exact slide-level gradient: fine-tune a copy of E_i through the frozen bag head on whole slides,
with the chunked backward of end-to-end training (`chunked.bag_backward`)."""

# Annotations are evaluated here (no postponed annotations): LightningCLI reads the settings from the dataclass's
# generated __init__, whose postponed annotations it cannot resolve, and would then neither validate nor document them.

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pytorch_lightning as pl
from torch import Tensor

from data_modules.cohort.splits import hold_out
from data_modules.datasets.augment import StainJitter
from data_modules.datasets.slide_bags import SlideBagSplits
from data_modules.io import check, check_choices

from ..encoders import PatchEmbedder
from ..end_to_end import EndToEndMIL
from ..slide_task import take_trainer_clipping
from ..tasks import Task
from .base import (
    CouplingRun,
    CouplingStrategy,
    StandardizedHead,
    check_optimizer,
    coupling_checkpoint,
    fit_best,
    trainable_copy,
)

__all__ = ["BagGradient", "BagGradientModule", "hold_out_bags"]


class BagGradientModule(EndToEndMIL):
    """EndToEndMIL over the (frozen) standardised bag head; checkpoint selection is `BagGradient`'s."""

    def configure_callbacks(self) -> list[pl.Callback]:
        return []


@dataclass(frozen=True)
class BagGradient(CouplingStrategy):
    """Couple with the exact slide-level gradient: fine-tune a copy of E_i through the frozen bag head on whole slides.

    Each step embeds every patch of a training slide (`SlideBag`, read lazily) and back-propagates the bag loss
    (the task's loss of the standardised head's bag output against the slide's target, plus its auxiliary terms as in
    `SlideTask.loss`) exactly, in `chunk_size` chunks (`EndToEndMIL` with `chunked.bag_backward`: DDP averaging and
    clipping included; `max_instances` samples patches per slide instead; `stain_jitter` augments the patches).
    `train_head` lets a copy of the head learn too (it is discarded: the next bag phase retrains the head on new
    features).

    Needs `labels` (slide id -> encoded target) in `fit`. Validation: a stratified, seeded `val_fraction` of the
    training slides is held out (`data_modules.cohort.splits.hold_out`) and the best epoch by `val/{select_by}` wins
    ("loss": the bag loss, min, smooth even on a few slides; "auroc": max; "monitor": the task's own metric). Any task
    couples: the bag loss is the task's (`icmil_pl.tasks`), survival and regression included. With `patients`, patients
    are held out whole (slides of one patient share tissue: one on each side would select epochs on leaked validation);
    with `patient_bags` too, a bag is a patient's slides. With fewer than 4 bags, or a class of one bag, all slides
    train and the training loss selects. A Trainer `gradient_clip_val` clips by norm (`take_trainer_clipping`).
    `shard_bags` splits each slide's chunks over the DDP processes instead of giving each process its own
    slides (`EndToEndMIL.shard_bags`): one slide too large for one GPU's step.
    """

    needs_labels = True

    lr: float = 1e-5
    weight_decay: float = 1e-4
    chunk_size: int = 64
    train_head: bool = False
    max_instances: int | None = None
    bags_per_step: int = 1
    val_fraction: float = 0.1
    select_by: Literal["loss", "auroc", "monitor"] = "loss"
    read_threads: int = 4
    max_epochs: int = 5
    stain_jitter: StainJitter | None = None
    shard_bags: bool = False

    def __post_init__(self) -> None:
        check_choices(self)
        check_optimizer(self.lr, self.weight_decay, self.max_epochs)
        check("chunk_size", self.chunk_size >= 1, "an int >= 1", self.chunk_size)
        check(
            "max_instances",
            self.max_instances is None or self.max_instances >= 1,
            "an int >= 1 or null",
            self.max_instances,
        )
        check("bags_per_step", self.bags_per_step >= 1, "an int >= 1", self.bags_per_step)
        check("val_fraction", 0 < self.val_fraction < 1, "a float in (0, 1)", self.val_fraction)
        check("read_threads", self.read_threads >= 1, "an int >= 1", self.read_threads)

    def _fit(self, run: CouplingRun) -> PatchEmbedder:
        bag, labels, patients, root, seed = run.bag, run.labels, run.patients, run.root, run.seed
        trainer_kwargs = run.trainer_kwargs
        by_id = {s.slide_id: s for s in run.train}
        fit_ids, val_ids = hold_out_bags(list(by_id), labels, patients, bag.task, self.val_fraction, seed)
        module = BagGradientModule(
            trainable_copy(run.embedder),
            StandardizedHead(bag, frozen=not self.train_head),
            chunk_size=self.chunk_size,
            max_instances=self.max_instances,
            bags_per_step=self.bags_per_step,
            lr=self.lr,
            weight_decay=self.weight_decay,
            task=copy.deepcopy(bag.task),  # its fitted bins or target scale included
            stain_jitter=self.stain_jitter,
            shard_bags=self.shard_bags,
        )
        take_trainer_clipping(module, trainer_kwargs)
        overrides: dict[str, Any] = {"max_epochs": self.max_epochs}
        if self.shard_bags:  # every process is given every bag, whose chunks it splits with the others
            overrides["use_distributed_sampler"] = False
        if val_ids:
            task = bag.task
            metric, mode = {"loss": ("loss", "min"), "auroc": ("auroc", "max")}.get(
                self.select_by, (task.monitor, task.mode)
            )
            check("select_by", metric == "loss" or metric in task.metric_names, f"a metric of {task.kind}", metric)
            checkpoint = coupling_checkpoint(root, f"val/{metric}", mode)
        else:
            checkpoint = coupling_checkpoint(root, "train/loss", "min", save_on_train_epoch_end=True)
            overrides["limit_val_batches"] = 0
        splits = {"train": [by_id[s] for s in fit_ids], "val": [by_id[s] for s in val_ids]}
        data = SlideBagSplits(splits, labels, self.read_threads, seed, patients if run.patient_bags else None)
        fit_best(module, data, checkpoint, trainer_kwargs, root, seed, **overrides)
        return module.embedder


def hold_out_bags(
    slide_ids: list[str],
    labels: Mapping[str, Tensor],
    patients: Mapping[str, str] | None,
    task: Task,
    fraction: float,
    seed: int,
) -> tuple[list[str], list[str]]:
    """(fit, val) slide ids: `data_modules.cohort.splits.hold_out` over bags stratified by the task (`Task.strata`),
    so a patient's slides stay together."""
    members: dict[str, list[str]] = {}  # a bag: a slide, or a patient's slides
    for slide_id in slide_ids:
        members.setdefault(patients[slide_id] if patients else slide_id, []).append(slide_id)
    bags = list(members)
    strata = dict(zip(bags, task.strata([labels[members[bag][0]] for bag in bags]), strict=True))
    fit, val = hold_out(bags, strata, fraction, seed)
    return [s for bag in fit for s in members[bag]], [s for bag in val for s in members[bag]]
