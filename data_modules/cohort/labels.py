"""The ground floor of a cohort: one row of the labels CSV, its columns and the split names. Imports nothing of the
package, so targets, splits, the finder and the datasets all build on it without a cycle."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["COLUMNS", "SPLITS", "SlideLabel", "cell_number"]

COLUMNS = ("slide_id", "label", "patient_id", "split", "mpp", "path", "annotations")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SlideLabel:
    slide_id: str
    label: str | None  # the `label` cell; None: unknown (new slides to predict) or a task without that column
    patient_id: str
    split: str | None = None
    mpp: float | None = None  # level-0 microns per pixel of this slide's file, when its metadata lacks or misstates it
    path: str | None = None  # the `path` cell as written; `locate_slides` resolves it against the CSV's folder
    target: tuple[float, ...] | None = None  # the task's number columns (`Targets.parse`); None: unknown or none
    stratum: str | None = None  # what splits stratify by (`Targets.strata`); None: unlabelled
    line: int = 0  # the CSV line, for errors
    annotations: str | None = None  # the `annotations` cell as written: a GeoJSON or ASAP XML file of ground truth

    @property
    def labelled(self) -> bool:
        return self.label is not None or self.target is not None


def cell_number(text: str) -> float:
    """A number cell as written, a decimal comma included (`0,25`: a European spreadsheet's); ValueError if none."""
    if text.count(",") == 1 and "." not in text:
        text = text.replace(",", ".")
    return float(text)
