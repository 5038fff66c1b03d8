"""A labelled slide cohort on disk: labels CSV + a slide folder -> slide files and their patch grids."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .splits import SlideLabel, read_labels
from .tiling import SlidePatches, TissueParams, patch_grid

__all__ = ["SLIDE_EXTENSIONS", "SlideCohort", "TilingConfig", "find_slide"]

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ome.tif", ".ome.tiff", ".ndpi")


@dataclass(frozen=True)
class TilingConfig:
    """How slides become patches: resolution, size, tissue rule. Shared by extraction and end-to-end bags."""

    mpp: float = 0.5
    patch_size: int = 256
    tissue_threshold: float = 0.5
    tissue: TissueParams = TissueParams()
    mpp_override: float | None = None


def find_slide(slides_dir: str | os.PathLike, slide_id: str) -> Path | None:
    """`<slides_dir>/<slide_id>.<ext>` for the first slide extension that exists, else None."""
    for ext in SLIDE_EXTENSIONS:
        path = Path(slides_dir) / f"{slide_id}{ext}"
        if path.is_file():
            return path
    return None


class SlideCohort:
    """Slide files of a labels CSV (`slide_id,label[,patient_id][,split]`), each found as `<slides>/<id>.<ext>`."""

    def __init__(self, labels: str | os.PathLike, slides: str | os.PathLike) -> None:
        self.labels_path, self.slides_dir = Path(labels), Path(slides)
        self.rows: list[SlideLabel] = read_labels(self.labels_path)
        self.paths = {row.slide_id: self._find(row.slide_id) for row in self.rows}

    def _find(self, slide_id: str) -> Path:
        path = find_slide(self.slides_dir, slide_id)
        if path is None:
            raise ValueError(
                f"{self.labels_path}: slide {slide_id!r} has no file in {self.slides_dir} "
                f"(looked for {slide_id}{{{','.join(SLIDE_EXTENSIONS)}}})"
            )
        return path

    def patches(self, tiling: TilingConfig, cache_dir: str | os.PathLike, slide_ids: list[str] | None = None) -> list[SlidePatches]:
        """Patch grids of the given slides (all by default), computed once and cached in `cache_dir`."""
        ids = [row.slide_id for row in self.rows] if slide_ids is None else slide_ids
        out = []
        for slide_id in tqdm(ids, desc="tiling", unit="slide", leave=False):
            grid = patch_grid(
                self.paths[slide_id],
                mpp=tiling.mpp,
                patch_size=tiling.patch_size,
                tissue_threshold=tiling.tissue_threshold,
                tissue=tiling.tissue,
                mpp_override=tiling.mpp_override,
                cache_dir=cache_dir,
            )
            out.append(SlidePatches(slide_id, self.paths[slide_id], grid, tiling.mpp_override))
        return out
