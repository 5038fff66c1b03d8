"""Synthetic, labelled cohorts of real pyramidal whole-slide files, so tests, the demo and benchmarks need no download.

A slide is glass with a few smooth tissue pieces stained like H&E (pink stroma, purple nuclei). Tumour slides add a few
small tumour foci inside the tissue whose nuclei are larger, denser and more irregular, with the mean colour matched
to normal tissue: the label lives in the local texture, not in global colour statistics. `tumour_contrast` scales the
difference: 0 is indistinguishable; at 0.5 (default) a linear probe on a random-init ResNet-18 separates 64 px tumour
and normal patches only partly (~75 %) while a small CNN trained for 50 steps separates them (~99 %). `tumour_area`
sets how much of the tissue each focus covers, i.e. the MIL witness rate.

    spec.py        CohortSpec: every generator setting (size, mpp, formats, tumour contrast and area, ...)
    textures.py    stroma and nuclei textures, the stain palette
    sites.py       Site: a site's stain (H and E vectors and amounts), light, scanner blur and JPEG quality
    scene.py       the procedural slide: tissue, tumour foci, benign mimics, level-0 pixels; SlideInfo
    levels.py      pixels at any pyramid level (render_region, area4)
    truth.py       the ground truth: tissue, tumour and mimic masks, tumour patches
    tiff.py        write_slide: one slide as SVS, generic TIFF or OME-TIFF, tile by tile in bounded memory
    cohort.py      make_cohort / load_cohort / slide_infos: slides, labels.csv, cohort.json and the tumours as
                   GeoJSON (annotations/, read back through data_modules.annotations) under one root
    datamodule.py  SyntheticCohortDataModule: a cohort written on first use, then read like any other
    __main__.py    python -m data_modules.synthetic ROOT [--n-slides ...] (options generated from CohortSpec)

Importing this package loads no torch: the data module is imported on first use.
"""

from importlib import import_module

from .cohort import (
    ANNOTATIONS_FOLDER,
    GRADES_FILE,
    TARGETS_FILE,
    load_cohort,
    make_cohort,
    slide_infos,
    survival_times,
    tumour_burden,
    write_targets,
    write_truth,
)
from .levels import render_region
from .scene import SlideInfo, TumourRegion
from .sites import Site
from .spec import CLASSES, EXTENSIONS, CohortSpec, Compression, Flavour
from .tiff import write_slide
from .truth import mimic_mask, patch_mimic_fraction, patch_tumour_fraction, tissue_mask, tumour_mask, tumour_patches

__all__ = [
    "ANNOTATIONS_FOLDER",
    "CLASSES",
    "GRADES_FILE",
    "TARGETS_FILE",
    "EXTENSIONS",
    "CohortSpec",
    "Compression",
    "Flavour",
    "Site",
    "SlideInfo",
    "SyntheticCohortDataModule",
    "TumourRegion",
    "load_cohort",
    "make_cohort",
    "mimic_mask",
    "patch_mimic_fraction",
    "render_region",
    "slide_infos",
    "survival_times",
    "patch_tumour_fraction",
    "tissue_mask",
    "tumour_burden",
    "tumour_mask",
    "tumour_patches",
    "write_slide",
    "write_targets",
    "write_truth",
]


def __getattr__(name: str):
    if name == "SyntheticCohortDataModule":
        return import_module(".datamodule", __name__).SyntheticCohortDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
