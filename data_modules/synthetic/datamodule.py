"""A synthetic slide cohort as a data module: written on first use, then read like any cohort on disk."""

from __future__ import annotations

from typing import Literal

from data_modules.cohort import OnSlideError
from data_modules.cohort.targets import Targets
from data_modules.datasets.patches import SlidePatchDataModule
from data_modules.slides.tiling import TilingConfig

from .cohort import make_cohort
from .spec import CohortSpec

__all__ = ["SyntheticCohortDataModule"]


class SyntheticCohortDataModule(SlidePatchDataModule):
    """A `SlidePatchDataModule` over `root/<labels_file>` and `root/slides`, whose `prepare_data` writes the `cohort`
    there first (once: a complete cohort of the same spec is reused, another spec is an error). The demo and the
    benchmarks need a cohort that exists nowhere yet. `labels_file`: `labels.csv` (normal / tumour),
    `targets.csv` (every task's columns, `make_cohort`) or `grades.csv` (a grade, ordinal), read with `targets`."""

    def __init__(
        self,
        root: str = "data/synthetic/demo",
        cohort: CohortSpec = CohortSpec(),
        tiling: TilingConfig = TilingConfig(),
        grid_cache: str = "runs/grids",
        batch_size: int = 64,
        num_workers: int = 2,
        on_slide_error: OnSlideError = "raise",
        labels_file: Literal["labels.csv", "targets.csv", "grades.csv"] = "labels.csv",
        targets: Targets = Targets(),
        patch_store: str | None = None,
    ) -> None:
        super().__init__(
            f"{root}/{labels_file}",
            f"{root}/slides",
            tiling,
            grid_cache,
            batch_size,
            num_workers,
            on_slide_error,
            targets,
            patch_store=patch_store,
        )
        self.root, self.spec = root, cohort

    def prepare_data(self) -> None:
        make_cohort(self.root, self.spec)
