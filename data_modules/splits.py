"""Slide labels and train/val/test splits: stratified by label, grouped by patient, k-fold, seeded, saved.

No patient ever appears in two splits: slides of one patient share tissue, so splitting them leaks the test set.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

__all__ = ["SPLITS", "SlideLabel", "make_splits", "read_labels", "require_labels", "save_splits"]

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SlideLabel:
    slide_id: str
    label: str | None  # None: unknown (new slides to predict)
    patient_id: str
    split: str | None = None


def read_labels(path: str | os.PathLike) -> list[SlideLabel]:
    """Rows of a `slide_id[,label][,patient_id][,split]` CSV; a missing patient id means one patient per slide.

    Labels may be missing (no column, or empty cells) for slides that are only predicted; `require_labels` says
    where they are needed."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: labels CSV not found")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if "slide_id" not in (reader.fieldnames or ()):
            raise ValueError(f"{path}: missing column 'slide_id'; expected slide_id[,label][,patient_id][,split]")
        rows = []
        for line, row in enumerate(reader, start=2):
            slide_id, label = (row["slide_id"] or "").strip(), (row.get("label") or "").strip() or None
            if not slide_id:
                raise ValueError(f"{path}:{line}: empty slide_id")
            split = (row.get("split") or "").strip() or None
            if split is not None and split not in SPLITS:
                raise ValueError(f"{path}:{line}: split {split!r} is not one of {list(SPLITS)}")
            patient = (row.get("patient_id") or "").strip() or slide_id
            rows.append(SlideLabel(slide_id, label, patient, split))
    if not rows:
        raise ValueError(f"{path}: no slides listed")
    seen: set[str] = set()
    for row in rows:
        if row.slide_id in seen:
            raise ValueError(f"{path}: duplicate slide_id {row.slide_id!r}")
        seen.add(row.slide_id)
    return rows


def require_labels(rows: Sequence[SlideLabel], path: str | os.PathLike, purpose: str) -> None:
    """A clear error when a slide has no label but `purpose` (training, testing) needs one."""
    unlabelled = [row.slide_id for row in rows if row.label is None]
    if unlabelled:
        more = f" and {len(unlabelled) - 1} more" if len(unlabelled) > 1 else ""
        raise ValueError(f"{path}: slide {unlabelled[0]!r}{more} has no label, which {purpose} needs "
                         "(only predict runs on unlabelled slides)")  # fmt: skip


def make_splits(
    labels: Sequence[SlideLabel],
    *,
    folds: int = 5,
    fold: int = 0,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Slide ids per split: the CSV's `split` column when every row has one, else stratified grouped k-fold.

    Fold `fold` of `folds` is the test set; `val_fraction` of the remaining slides (by patient) is validation.
    A CSV that fixes only the test split (e.g. Camelyon16's official test set) gets its validation carved the same way.
    """
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in [0, {folds}), got {fold}")
    given = [row.split for row in labels]
    if all(s is not None for s in given):
        return {name: [row.slide_id for row in labels if row.split == name] for name in SPLITS}
    if any(s not in (None, "test") for s in given):
        raise ValueError("the `split` column must be filled for every slide, or only mark the test slides")
    rows = list(labels)
    if any(s == "test" for s in given):
        test = [row for row in rows if row.split == "test"]
        rest = [row for row in rows if row.split != "test"]
    else:
        rest, test = _grouped_split(rows, folds, fold, seed)
    n_val = max(1, round(1 / val_fraction)) if val_fraction > 0 else 0
    train, val = _grouped_split(rest, n_val, 0, seed + 1) if n_val > 1 else (rest, [])
    return {"train": _ids(train), "val": _ids(val), "test": _ids(test)}


def save_splits(splits: dict[str, list[str]], run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir) / "splits.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(splits, indent=1))
    return path


def _grouped_split(rows: list[SlideLabel], n_splits: int, index: int, seed: int) -> tuple[list, list]:
    """(rest, held-out): fold `index` of a stratified, patient-grouped `n_splits`-fold split."""
    labels = np.array([row.label for row in rows])
    groups = np.array([row.patient_id for row in rows])
    n_groups = len(set(groups))
    if n_groups < n_splits:
        raise ValueError(f"cannot make {n_splits} folds from {n_groups} patients; use fewer folds")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    try:
        rest_idx, held_idx = list(splitter.split(np.zeros(len(rows)), labels, groups))[index]
    except ValueError as exc:
        raise ValueError(f"cannot split {len(rows)} slides into {n_splits} stratified folds ({exc}); "
                         "use fewer folds or a larger val_fraction") from None
    return [rows[i] for i in rest_idx], [rows[i] for i in held_idx]


def _ids(rows: list[SlideLabel]) -> list[str]:
    return sorted(row.slide_id for row in rows)
