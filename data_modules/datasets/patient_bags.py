"""Patient-level bags: all slides of a patient as one bag, for any slide-bag dataset (cached features or lazy slides).

A patient bag is its slides' bags concatenated in slide order (CSV order): features or patches one after the other,
coordinates kept as they are (each in its own slide's level-0 pixels), and `slides` saying which rows belong to which
slide, so heatmaps are still drawn per slide. Its id is the patient id and its target the slides' one, which must be
the same for every slide of the patient.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from ..cohort import SlideLabel

__all__ = ["BagLevel", "ConcatBag", "PatientBags", "patient_groups"]

BagLevel = Literal["slide", "patient"]  # what one bag is: a slide, or all slides of a patient


def patient_groups(
    rows: Sequence[SlideLabel], targets: Sequence[torch.Tensor | None], path: str | os.PathLike
) -> list[tuple[str, list[int]]]:
    """(patient id, the indices of its rows in order) in order of first appearance; a patient whose slides have
    different targets is refused, naming the patient and two of its slides."""
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.patient_id, []).append(i)
    for patient, index in groups.items():
        first = targets[index[0]]
        for j in index[1:]:
            other = targets[j]
            same = (first is None and other is None) or (
                first is not None and other is not None and torch.equal(first, other)
            )
            if not same:
                a, b = rows[index[0]].slide_id, rows[j].slide_id
                raise ValueError(
                    f"{path}: patient {patient!r} has slides with different targets ({a!r} and {b!r}); a patient bag "
                    "needs one target per patient (bag_level: slide keeps them apart)"
                )
    return list(groups.items())


class ConcatBag:
    """Lazy slide bags one after the other: `bag[a:b]` reads across their boundaries, `select` keeps the order."""

    def __init__(self, bags: Sequence) -> None:
        self.bags = list(bags)
        self.offsets = np.cumsum([0, *(len(b) for b in self.bags)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: slice) -> torch.Tensor:
        if not isinstance(index, slice):
            raise TypeError(f"ConcatBag supports slices (bag[a:b]), got {type(index).__name__}; use select()")
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("ConcatBag slices have step 1")
        parts = []
        for k, bag in enumerate(self.bags):
            lo, hi = max(start, self.offsets[k]), min(stop, self.offsets[k + 1])
            if lo < hi:
                parts.append(bag[int(lo - self.offsets[k]) : int(hi - self.offsets[k])])
        if not parts:
            return self.bags[0][0:0]
        return torch.cat(parts)

    def select(self, indices: np.ndarray) -> ConcatBag:
        """Some of the patches (sorted indices), each slide's through its own `select`."""
        indices = np.asarray(indices)
        parts = []
        for k, bag in enumerate(self.bags):
            mine = indices[(indices >= self.offsets[k]) & (indices < self.offsets[k + 1])] - self.offsets[k]
            if len(mine):
                parts.append(bag.select(mine))
        return ConcatBag(parts)

    def close(self, wait: bool = True) -> None:
        for bag in self.bags:
            if hasattr(bag, "close"):
                bag.close(wait=wait)


class PatientBags(Dataset):
    """Item i = the bags of patient i's slides in `slides` (a dataset of slide bags) merged into one."""

    def __init__(self, slides: Dataset, groups: Sequence[tuple[str, list[int]]]) -> None:
        self.slides = slides
        self.groups = list(groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> dict:
        patient, members = self.groups[index]
        items = [self.slides[j] for j in members]
        bag: dict = {
            "slide_id": patient,
            "coords": torch.cat([item["coords"] for item in items]),
            "slides": [(item["slide_id"], len(item["coords"])) for item in items],
        }
        if "features" in items[0]:
            bag["features"] = torch.cat([item["features"] for item in items])
        if "patches" in items[0]:
            bag["patches"] = ConcatBag([item["patches"] for item in items])
        if "label" in items[0]:
            bag["label"] = items[0]["label"]
        if "patch_side" in items[0]:  # a patient's slides share one tiling
            bag["patch_side"] = items[0]["patch_side"]
        return bag
