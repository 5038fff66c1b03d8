"""Everything that turns slide files into batches. Never imports `icmil_pl`.

Slide reading and tiling need no torch; the torch-based datasets are imported on first use, so tools such as
`python -m data_modules.synthetic` start fast.
"""

from importlib import import_module

from .aliases import alias_modules
from .slides import Slide, SlideError, open_slide
from .slides.tiling import PatchGrid, SlidePatches, TilingConfig, TissueParams, patch_grid, tissue_mask

_LAZY = {"PatchDataset": "datasets.patches", "SlidePatchDataModule": "datasets.patches"}
_DATASETS = ("augment", "bag_base", "digits", "feature_bags", "feature_cache", "patches", "patient_bags", "samplers")
alias_modules(
    __name__,
    {
        **{name: f"datasets.{name}" for name in (*_DATASETS, "slide_bags", "unlabelled_patches")},
        **{name: f"slides.{name}" for name in ("tiling", "outlines")},
        "slide_base": "slides.base",
        "tiff_slide": "slides.tiff_backend",
        "openslide_slide": "slides.openslide_backend",
        "splits": "cohort.splits",
        "targets": "cohort.targets",
        "checks": "io",
        "file_names": "io",
    },
)

__all__ = [
    "PatchDataset",
    "PatchGrid",
    "Slide",
    "SlideError",
    "SlidePatchDataModule",
    "SlidePatches",
    "TilingConfig",
    "TissueParams",
    "open_slide",
    "patch_grid",
    "tissue_mask",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
