"""`CohortSpec`: every setting of the synthetic cohort generator, in one frozen, validated dataclass.

`make_cohort`, `write_slide`, `SyntheticCohortDataModule` and the command line (`python -m data_modules.synthetic`,
whose options are generated from these fields) all take it, so a setting is added, documented and checked once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from data_modules.io import check

__all__ = ["CLASSES", "EXTENSIONS", "CohortSpec", "Compression", "Flavour", "MimicExtent", "MimicKind"]

Flavour = Literal["svs", "ome", "tiff"]
Compression = Literal["jpeg", "jpeg2000", "lzw", "deflate"]
MimicKind = Literal["lymphocytes", "reactive"]
MimicExtent = Literal["foci", "diffuse"]

EXTENSIONS: dict[str, str] = {"svs": ".svs", "tiff": ".tif", "ome": ".ome.tif"}
CLASSES = ("normal", "tumour")  # labels.csv label 0 / 1


@dataclass(frozen=True)
class CohortSpec:
    """What a synthetic cohort is made of; slide content is a pure function of these settings and the position."""

    n_slides: int = field(default=8, metadata={"help": "slides in the cohort"})
    seed: int = field(default=0, metadata={"help": "seeds labels, patients and every slide's content"})
    size: tuple[int, int] = field(
        default=(2048, 2048), metadata={"help": "width and height of level 0 in pixels", "metavar": ("W", "H")}
    )
    positive_fraction: float = field(default=0.5, metadata={"help": "fraction of tumour slides"})
    flavours: tuple[Flavour, ...] = field(
        default=("svs", "tiff"), metadata={"help": "file formats, slide i takes flavours[i mod their number]"}
    )
    mpp: float = field(default=0.5, metadata={"help": "level-0 microns per pixel, written into the files"})
    patients_per_slide: float = field(
        default=0.75, metadata={"help": "patients / slides: below 1, some patients have several slides"}
    )
    tile_size: int = field(default=256, metadata={"help": "TIFF tile side in pixels"})
    compression: Compression = field(default="jpeg", metadata={"help": "tile compression"})
    quality: int = field(default=90, metadata={"help": "JPEG / JPEG 2000 quality"})
    tumour_contrast: float = field(
        default=0.5, metadata={"help": "how much tumour nuclei differ from normal ones (0: not at all)"}
    )
    tumour_cellularity: float = field(
        default=1.0,
        metadata={
            "help": "share of the nuclei in a tumour focus that are tumour cells, the rest normal ones among them "
            "(1: solid tumour; low: infiltrating single cells, a sparse cue any pooled texture statistic dilutes)"
        },
    )
    tumour_area: tuple[float, float] = field(
        default=(0.01, 0.05),
        metadata={"help": "range of the tissue fraction each tumour focus covers", "metavar": ("LOW", "HIGH")},
    )
    tumour_types: int = field(
        default=1,
        metadata={
            "help": "kinds of tumour: 2 makes each focus type a (large pleomorphic nuclei) or b (small crowded round "
            "nuclei) at random, and targets.csv gains tumour_a, tumour_b"
        },
    )
    sites: int = field(
        default=0,
        metadata={
            "help": "sites the patients come from, each with its own stain (H and E vectors and amounts), light, "
            "scanner blur and JPEG quality (0: none, every slide stained alike)"
        },
    )
    site_variation: float = field(default=1.0, metadata={"help": "how far sites differ (0: alike, 1: as between labs)"})
    mimics: float = field(
        default=0.0,
        metadata={
            "help": "share of slides, of either class, holding benign mimics: dense lymphocyte aggregates, unusual "
            "tissue that is not tumour (their own masks; their patches are negatives)"
        },
    )
    mimic_area: tuple[float, float] = field(
        default=(0.02, 0.1),
        metadata={"help": "range of the tissue fraction each mimic focus covers", "metavar": ("LOW", "HIGH")},
    )
    mimic_kind: MimicKind = field(
        default="lymphocytes",
        metadata={
            "help": "what the mimics are: lymphocytes (dense aggregates of small round nuclei) or reactive (atypia: "
            "nuclei as large and crowded as the tumour's at tumour_contrast, but regular in size and outline, so "
            "only pleomorphism tells tumour)"
        },
    )
    mimic_extent: MimicExtent = field(
        default="foci",
        metadata={
            "help": "where the mimics are: foci (1-3 round foci of mimic_area each) or diffuse (all the tissue outside "
            "the tumour: a reactive background, as a lymph node's reactive hyperplasia; mimic_area is then unused)"
        },
    )

    def __post_init__(self) -> None:
        w_h = tuple(self.size)
        ints = len(w_h) == 2 and all(isinstance(v, int) for v in w_h)
        check("size", ints and min(w_h) >= 64, "(width, height), ints >= 64", self.size)
        check("n_slides", isinstance(self.n_slides, int) and self.n_slides >= 1, "an int >= 1", self.n_slides)
        check("seed", isinstance(self.seed, int) and 0 <= self.seed < 2**64, "an int in [0, 2**64)", self.seed)
        check("positive_fraction", 0 <= self.positive_fraction <= 1, "a float in [0, 1]", self.positive_fraction)
        check(
            "flavours",
            bool(self.flavours) and all(f in get_args(Flavour) for f in self.flavours),
            f"a non-empty sequence of {get_args(Flavour)}",
            self.flavours,
        )
        check(
            "mpp",
            isinstance(self.mpp, int | float) and 0.05 <= self.mpp <= 20,
            "microns per pixel in [0.05, 20]",
            self.mpp,
        )
        check("patients_per_slide", 0 < self.patients_per_slide <= 1, "a float in (0, 1]", self.patients_per_slide)
        check(
            "tile_size",
            isinstance(self.tile_size, int) and self.tile_size % 16 == 0 and 16 <= self.tile_size <= 4096,
            "a multiple of 16 in [16, 4096]",
            self.tile_size,
        )
        check(
            "compression",
            self.compression in get_args(Compression),
            f"one of {get_args(Compression)}",
            self.compression,
        )
        check("quality", isinstance(self.quality, int) and 1 <= self.quality <= 100, "an int in [1, 100]", self.quality)
        check(
            "tumour_contrast",
            isinstance(self.tumour_contrast, int | float) and 0 <= self.tumour_contrast <= 3,
            "a float in [0, 3]",
            self.tumour_contrast,
        )
        check("tumour_cellularity", 0 < self.tumour_cellularity <= 1, "a float in (0, 1]", self.tumour_cellularity)
        area = _area_range("tumour_area", self.tumour_area)
        check("tumour_types", self.tumour_types in (1, 2), "1 or 2", self.tumour_types)
        check("sites", isinstance(self.sites, int) and 0 <= self.sites <= 64, "an int in [0, 64]", self.sites)
        check("site_variation", 0 <= self.site_variation <= 3, "a float in [0, 3]", self.site_variation)
        check("mimics", 0 <= self.mimics <= 1, "a float in [0, 1]", self.mimics)
        check("mimic_kind", self.mimic_kind in get_args(MimicKind), f"one of {get_args(MimicKind)}", self.mimic_kind)
        extents = get_args(MimicExtent)
        check("mimic_extent", self.mimic_extent in extents, f"one of {extents}", self.mimic_extent)
        mimic = _area_range("mimic_area", self.mimic_area)
        # tuples and floats whatever was passed (lists from YAML, ints from the command line): equal specs compare equal
        object.__setattr__(self, "size", w_h)
        object.__setattr__(self, "flavours", tuple(self.flavours))
        object.__setattr__(self, "mpp", float(self.mpp))
        object.__setattr__(self, "tumour_contrast", float(self.tumour_contrast))
        object.__setattr__(self, "tumour_cellularity", float(self.tumour_cellularity))
        object.__setattr__(self, "tumour_area", area)
        object.__setattr__(self, "site_variation", float(self.site_variation))
        object.__setattr__(self, "mimics", float(self.mimics))
        object.__setattr__(self, "mimic_area", mimic)


def _area_range(name: str, value) -> tuple[float, float]:
    """A (low, high) range of tissue fractions, checked, as floats."""
    pair = tuple(value)
    check(name, len(pair) == 2 and 0 < pair[0] <= pair[1] <= 0.5, "(low, high) with 0 < low <= high <= 0.5", value)
    return float(pair[0]), float(pair[1])
