"""Everything that turns slide files into batches. Never imports `icmil_pl`.

Slide reading and tiling need no torch; the torch-based datasets are imported on first use, so tools such as
`python -m data_modules.synthetic` start fast.
"""

from importlib import import_module

from .slides import Slide, SlideError, open_slide
from .tiling import PatchGrid, SlidePatches, TilingConfig, TissueParams, patch_grid, tissue_mask

_LAZY = {"PatchDataset": "patches", "SlidePatchDataModule": "patches"}

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
