"""Every split rule: train/val/test by stratified, patient-grouped k-fold (or the CSV's `split` column), and the
seeded hold-out of a coupling phase. Seeded, so a run can be repeated; saved as `splits.json`.

No patient ever appears in two splits: slides of one patient share tissue, so splitting them leaks the test set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from ..io import check
from .labels import SPLITS, SlideLabel
from .targets import Targets

__all__ = [
    "SPLITS",
    "SPLITS_FILE",
    "SplitConfig",
    "check_classes",
    "hold_out",
    "make_splits",
    "save_splits",
    "split_of",
]

SPLITS_FILE = "splits.json"


@dataclass(frozen=True)
class SplitConfig:
    """A stratified, patient-grouped split: fold `fold` of `folds` is the test set, `val_fraction` of the rest (by
    patient) validates, `seed` shuffles. Used only where the labels CSV does not fix the splits itself."""

    folds: int = 5
    fold: int = 0
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        check("splits.folds", self.folds >= 1, "an int >= 1", self.folds)
        check("splits.fold", 0 <= self.fold < self.folds, f"an int in [0, {self.folds})", self.fold)
        check("splits.val_fraction", 0 <= self.val_fraction < 1, "a float in [0, 1)", self.val_fraction)


def make_splits(
    labels: Sequence[SlideLabel],
    config: SplitConfig = SplitConfig(),
    path: str | os.PathLike | None = None,
    targets: Targets | None = None,
) -> dict[str, list[str]]:
    """Slide ids per split: the CSV's `split` column when every row has one, else grouped k-fold stratified by each
    row's `stratum` (the class; for other tasks see `Targets.strata`).

    A CSV that fixes only the test split (e.g. Camelyon16's official test set) gets its validation carved the same way.
    Every split must hold every class (validation may be empty): a split of one class has no AUROC, and selecting a
    checkpoint on that constant, or training on one class, gives results that only look like results; a multilabel
    split must hold a slide with and one without each label, a survival split an observed event (`Targets.missing`).
    Errors name the labels file `path`.
    """
    try:
        splits = _make_splits(list(labels), config)
        given = "the `split` column" if all(row.split is not None for row in labels) else None
        check_classes(splits, labels, given, config, targets)
        _check_patients(splits, labels)
    except ValueError as error:
        raise ValueError(f"{path}: {error}" if path is not None else str(error)) from None
    return splits


def _make_splits(rows: list[SlideLabel], config: SplitConfig) -> dict[str, list[str]]:
    given = [row.split for row in rows]
    if all(s is not None for s in given):
        return {name: [row.slide_id for row in rows if row.split == name] for name in SPLITS}
    if any(s not in (None, "test") for s in given):
        raise ValueError("the `split` column must be filled for every slide, or only mark the test slides")
    if any(s == "test" for s in given):
        test = [row for row in rows if row.split == "test"]
        rest = [row for row in rows if row.split != "test"]
    else:
        what = f"the test folds (splits.folds={config.folds})"
        rest, test = _grouped_split(rows, config.folds, config.fold, config.seed, what, "use fewer folds")
    n_val = max(1, round(1 / config.val_fraction)) if config.val_fraction > 0 else 0
    what = f"the validation carve-out (splits.val_fraction={config.val_fraction}: 1 fold in {n_val} of the rest)"
    fix = "use a larger val_fraction, or 0 for no validation"
    train, val = _grouped_split(rest, n_val, 0, config.seed + 1, what, fix) if n_val > 1 else (rest, [])
    return {"train": _ids(train), "val": _ids(val), "test": _ids(test)}


def check_classes(
    splits: dict[str, list[str]],
    rows: Sequence[SlideLabel],
    given: str | None,
    config: SplitConfig | None = None,
    targets: Targets | None = None,
) -> None:
    """Every split holds what `targets` requires of each (`Targets.missing`: every class, both values of every label,
    an observed event; validation may be empty). `given` names where user-given splits came from (None: computed by
    `config`)."""
    targets = targets or Targets()
    by_id = {row.slide_id: row for row in rows}
    kind = targets.describe()
    need = targets.kind.min_strata
    present = sorted({row.stratum for row in rows if row.stratum is not None})
    if len(present) < need:
        held = f"every labelled slide is of {kind} {present[0]!r}" if present else f"no slide has a {kind}"
        raise ValueError(f"{held}; training needs at least {need} different ones (such a CSV can only be predicted)")
    for name in SPLITS:
        if not splits[name]:
            if name == "val":
                continue  # no validation: the last epoch is used
            raise ValueError(f"no {name} slides" + (f" in {given}" if given else ""))
        missing, present = targets.missing([by_id[s] for s in splits[name]], rows)
        if missing:
            cause = f"{given} gives it" if given else f"{config} gives it"
            fix = (
                f"give it slides of every {kind}" if given else "use fewer folds, a larger val_fraction or another seed"
            )
            raise ValueError(
                f"the {name} split has no slide of {kind} {', '.join(missing)} ({cause} only {', '.join(present)}): "
                f"{fix}"
            )


def _check_patients(splits: dict[str, list[str]], rows: Sequence[SlideLabel]) -> None:
    """No patient in two splits; computed splits never do it, a `split` column may."""
    where: dict[str, set[str]] = {}
    patient = {row.slide_id: row.patient_id for row in rows}
    for name, ids in splits.items():
        for slide_id in ids:
            where.setdefault(patient[slide_id], set()).add(name)
    for p, names in where.items():
        if len(names) > 1:
            ordered = [n for n in SPLITS if n in names]
            raise ValueError(
                f"patient {p!r} has slides in {' and '.join(ordered)} (the `split` column): a patient's slides share "
                "tissue, so give them one split"
            )


def save_splits(splits: dict[str, list[str]], folder: str | os.PathLike) -> Path:
    path = Path(folder) / SPLITS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(splits, indent=1))
    return path


def split_of(*folders: str | os.PathLike) -> dict[str, str]:
    """Slide id -> its split (train / val / test) from the first of `folders` with a `splits.json`; {} if none has."""
    for folder in folders:
        path = Path(folder) / SPLITS_FILE
        if path.is_file():
            return {slide: split for split, slides in json.loads(path.read_text()).items() for slide in slides}
    return {}


def hold_out(
    slide_ids: Sequence[str], labels: Mapping[str, int | str], fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """(train, val) ids in their given order: a seeded `fraction` held out, stratified by `labels` (a class or any
    stratum; at least one per stratum), or no validation when there are fewer than 4 slides or a stratum has fewer
    than 2. By stratum only: the slides are one split's already, and the splits did the patient grouping."""
    y = np.array([labels[s] for s in slide_ids])
    classes, counts = np.unique(y, return_counts=True)
    if len(slide_ids) < 4 or counts.min() < 2:
        return list(slide_ids), []
    rng = np.random.default_rng(seed)
    n_val = min(max(len(classes), round(fraction * len(slide_ids))), len(slide_ids) - len(classes))
    quota = np.maximum(1, np.round(n_val * counts / counts.sum())).astype(int)  # proportional, >= 1 per class
    quota = np.minimum(quota, counts - 1)  # and >= 1 left for training
    val = {int(i) for c, q in zip(classes, quota, strict=True) for i in rng.permutation(np.flatnonzero(y == c))[:q]}
    return [s for i, s in enumerate(slide_ids) if i not in val], [s for i, s in enumerate(slide_ids) if i in val]


def _grouped_split(
    rows: list[SlideLabel], n_splits: int, index: int, seed: int, what: str, fix: str
) -> tuple[list, list]:
    """(rest, held-out): fold `index` of a stratified, patient-grouped `n_splits`-fold split, for `what`; errors end
    with `fix`, what to change."""
    labels = np.array([row.stratum for row in rows])
    groups = np.array([row.patient_id for row in rows])
    n_groups = len(set(groups))
    if n_groups < n_splits:
        raise ValueError(f"{what} needs {n_splits} folds, but there are {n_groups} patients; {fix}")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    try:
        rest_idx, held_idx = list(splitter.split(np.zeros(len(rows)), labels, groups))[index]
    except ValueError as exc:
        raise ValueError(
            f"{what}: cannot split {len(rows)} slides into {n_splits} stratified folds ({exc}); {fix}"
        ) from None
    return [rows[i] for i in rest_idx], [rows[i] for i in held_idx]


def _ids(rows: list[SlideLabel]) -> list[str]:
    return sorted(row.slide_id for row in rows)
