"""What a slide model was trained on, kept in its checkpoint: the class encoding (label values in index order), the
splits, and the features' fingerprint (embedder architecture, weights digest, tiling mpp and patch size).

`test`, `predict` and a resumed fit use the record (`restore`), never re-derive it from the CSV at hand: labels
re-encoded by the sort order of another CSV scored AUROC 0.333 for 0.667, a k-fold recomputed after a row was removed
tested on training slides, and features of another embedder of the same width gave p = 1.000 for every slide.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from data_modules.datasets.bag_base import BagDataModule
from data_modules.datasets.feature_bags import FeatureBagDataModule

__all__ = [
    "ARCHITECTURE_KEY",
    "RECORD_KEY",
    "architecture",
    "check_architecture",
    "check_record",
    "load_checkpoint",
    "read_record",
    "record_of",
    "restore",
]

RECORD_KEY = "run_record"  # where a checkpoint keeps it
ARCHITECTURE_KEY = "architecture"  # the model's classes as `architecture` names them, for errors


def record_of(data: BagDataModule) -> dict[str, Any]:
    """The record of a model fitted on `data` (after its setup: the splits are made)."""
    features = data.cache.fingerprint() if isinstance(data, FeatureBagDataModule) else None
    return {"task": data.targets.task, "classes": list(data.classes), "splits": data.splits, "features": features}


def load_checkpoint(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint file's contents, its tensors memory-mapped rather than read."""
    return torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)


def read_record(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The record in a checkpoint file (None for checkpoints written before records)."""
    return load_checkpoint(checkpoint).get(RECORD_KEY)


def check_architecture(saved: dict[str, Any], model: torch.nn.Module, checkpoint: str | os.PathLike) -> None:
    """Refuse a checkpoint (`saved`, read from `checkpoint`) whose weights are not `model`'s (another aggregator,
    width or task head) in one line naming both, before Lightning lists every key of the state dict that differs."""
    theirs = {k: tuple(v.shape) for k, v in saved.get("state_dict", {}).items()}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    differ = sorted(k for k in theirs.keys() & ours.keys() if theirs[k] != ours[k])
    missing, unknown = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
    if not (differ or missing or unknown):
        return
    first = (
        f"{differ[0]} is {theirs[differ[0]]} there, {ours[differ[0]]} here"
        if differ
        else f"{len(missing)} weights missing (e.g. {missing[0]})"
        if missing
        else f"{len(unknown)} weights unknown here (e.g. {unknown[0]})"
    )
    theirs_named = saved.get(ARCHITECTURE_KEY) or saved.get("hyper_parameters", {}).get("_class_path", "another model")
    raise ValueError(
        f"{checkpoint}: the weights of {str(theirs_named).rsplit('.', 1)[-1]}, not of this config's "
        f"{architecture(model)} ({first}); evaluate it with the config it was trained with (its run's config.yaml)"
    )


def architecture(model: torch.nn.Module) -> str:
    """A model's class and its parts' (`BagClassifier(ABMIL, Classification)`), as errors name a model."""
    parts = [type(m).__name__ for m in model.children() if type(m).__module__.startswith("icmil_pl")]
    return f"{type(model).__name__}({', '.join(parts)})" if parts else type(model).__name__


def restore(record: dict[str, Any], data: BagDataModule, source: str | os.PathLike) -> None:
    """Make `data` encode and split as the model of `source` (its checkpoint) was trained, and refuse features that
    are not the ones it was trained on."""
    data.restore(record["classes"], record["splits"])
    check_record(record, data, source)


def check_record(record: dict[str, Any], data: BagDataModule, source: str | os.PathLike) -> None:
    """Refuse `data` whose class encoding or features differ from what the model of `source` was trained on."""
    if record["task"] != data.targets.task or list(record["classes"]) != list(data.classes):
        raise ValueError(
            f"{data.labels_path}: {data.targets.task} targets {list(data.classes)}, but {source} was trained on "
            f"{record['task']} targets {list(record['classes'])}; evaluate it through the command line, which "
            "encodes the CSV as the model was trained (or give data.init_args.classes in that order)"
        )
    theirs = record.get("features")
    ours = data.cache.fingerprint() if isinstance(data, FeatureBagDataModule) else None
    if theirs and ours and theirs != ours:
        raise ValueError(
            f"{data.cache.path}: features of {_describe(ours)}, but {source} was trained on features of "
            f"{_describe(theirs)}; extract features with that embedder and geometry, or train a model on these"
        )


def _describe(fingerprint: dict[str, Any]) -> str:
    f = fingerprint
    cut = f"cut after {f['truncate_after']}" if f.get("truncate_after") else "whole"
    weights = str(f.get("weights_hash") or "?")[:12]
    return f"{f.get('backbone')} ({cut}, output {f.get('output')}, weights {weights}; {f.get('mpp')} um/px, " + (
        f"{f.get('patch_size_px')} px patches)"
    )
