"""A cohort: the labels CSV's rows (`labels`, the ground floor), their slide files (`finder`), the cohort itself
(`cohort`), every split rule (`splits`) and the task's targets (`targets`, one class per task kind)."""

from .cohort import OnSlideError, SlideCohort, name_classes, read_labels, require_labels
from .finder import SlideFinder, SlideFolders, find_slide, locate_slides, slide_roots
from .labels import COLUMNS, SPLITS, SlideLabel

__all__ = [
    "COLUMNS",
    "SPLITS",
    "OnSlideError",
    "SlideCohort",
    "SlideFinder",
    "SlideFolders",
    "SlideLabel",
    "find_slide",
    "locate_slides",
    "name_classes",
    "read_labels",
    "require_labels",
    "slide_roots",
]
