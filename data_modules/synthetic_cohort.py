"""A synthetic slide cohort as a data module: written on first use, then read like any cohort on disk.

The demo and the benchmarks need a cohort that exists nowhere yet; `SyntheticCohortDataModule` writes it with
`make_cohort` in `prepare_data` (once: a complete cohort with the same parameters is reused, other parameters are an
error) and is otherwise a `SlidePatchDataModule` over `root/labels.csv` and `root/slides`.
"""

from __future__ import annotations

from .cohort import TilingConfig
from .patches import SlidePatchDataModule
from .synthetic import Flavour, make_cohort

__all__ = ["SyntheticCohortDataModule"]


class SyntheticCohortDataModule(SlidePatchDataModule):
    """`n_slides` generated slides under `root` (see `data_modules.synthetic.make_cohort` for the parameters)."""

    def __init__(
        self,
        root: str = "data/synthetic/demo",
        n_slides: int = 48,
        seed: int = 0,
        size: tuple[int, int] = (2048, 2048),
        slide_mpp: float = 0.5,
        flavours: tuple[Flavour, ...] = ("svs", "tiff"),
        tumour_contrast: float = 0.5,
        tumour_area: tuple[float, float] = (0.01, 0.05),
        tiling: TilingConfig = TilingConfig(),
        grid_cache: str = "runs/grids",
        batch_size: int = 64,
        num_workers: int = 2,
    ) -> None:
        super().__init__(f"{root}/labels.csv", f"{root}/slides", tiling, grid_cache, batch_size, num_workers)
        self.root = root
        self.spec = dict(n_slides=n_slides, seed=seed, size=tuple(size), mpp=slide_mpp, flavours=tuple(flavours),
                         tumour_contrast=tumour_contrast, tumour_area=tuple(tumour_area))  # fmt: skip

    def prepare_data(self) -> None:
        make_cohort(self.root, **self.spec)
