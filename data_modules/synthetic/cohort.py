"""A labelled synthetic cohort on disk: slides, labels.csv, cohort.json (the settings and what regenerates every
slide) and each slide's tumour as QuPath GeoJSON (`annotations/`, named in labels.csv's `annotations` column), the
one door through which the rest of the code reads ground truth. Written once and reused while its settings are the
same."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..annotations import TRUTH_DOWNSAMPLE, write_geojson
from ..io import atomic_write
from ..slides.outlines import mask_outline
from .scene import SlideInfo
from .sites import make_sites
from .spec import CLASSES, EXTENSIONS, CohortSpec
from .tiff import write_slide
from .truth import tumour_mask

__all__ = [
    "ANNOTATIONS_FOLDER",
    "GRADES_FILE",
    "TARGETS_FILE",
    "load_cohort",
    "make_cohort",
    "slide_infos",
    "survival_times",
    "tumour_burden",
    "write_targets",
]

TARGETS_FILE = "targets.csv"
GRADES_FILE = "grades.csv"  # an ordinal grade per slide as its label (the ordinal task)
ANNOTATIONS_FOLDER = "annotations"  # <slide_id>.geojson: each slide's tumour, as QuPath exports annotations
LABEL_COLUMNS = ("slide_id", "label", "patient_id", "annotations")  # of labels.csv, and first in the other tables


def make_cohort(root: str | os.PathLike, spec: CohortSpec = CohortSpec(), *, workers: int = 1) -> Path:
    """Write a labelled cohort under `root` and return `root`: `root/slides/<slide_id>.{svs,tif,ome.tif}`,
    `root/labels.csv` (`slide_id,label,patient_id,annotations`, label 0 = normal, 1 = tumour), `root/targets.csv`
    (the targets of every task, `write_targets`), `root/annotations/<slide_id>.geojson` (the tumour, `write_truth`)
    and `root/cohort.json` (the spec and the `SlideInfo` of every slide, paths relative to root).

    Slide i has flavour flavours[i % len(flavours)]; round(n_slides * positive_fraction) slides are tumour (at least
    one of each label when 0 < positive_fraction < 1); there are round(n_slides * patients_per_slide) patients, so some
    have several slides and grouped splits matter. With `sites`, each patient belongs to one site drawn at random, so
    every split holds slides of every site (the benchmark measures generalisation across a cohort's sites, not to a
    site never seen); with `mimics`, that share of slides of both classes hold benign mimic foci. A cohort already
    complete with the same spec is left as is; `workers` threads compress tiles.
    """
    root = Path(root)
    params = json.loads(json.dumps(asdict(spec)))  # as cohort.json holds it: lists, not tuples
    n_slides, seed = spec.n_slides, spec.seed
    manifest = root / "cohort.json"
    if manifest.exists():
        previous = json.loads(manifest.read_text())
        defaults = json.loads(json.dumps(asdict(CohortSpec())))  # settings added since: their defaults
        if {**defaults, **previous["params"]} != params:
            raise ValueError(f"root: {root} holds a cohort made with other parameters; use another root or delete it")
        if all((root / s["path"]).exists() for s in previous["slides"]) and (root / "labels.csv").exists():
            write_truth(root)  # a cohort written before its truth was GeoJSON
            write_targets(root, spec)  # a cohort written before targets.csv existed, or under an older law
            return root

    rng = np.random.default_rng(np.random.SeedSequence([seed, n_slides]))
    n_positive = round(n_slides * spec.positive_fraction)
    if 0 < spec.positive_fraction < 1 and n_slides >= 2:
        n_positive = min(max(n_positive, 1), n_slides - 1)
    labels = rng.permutation(np.arange(n_slides) < n_positive)
    n_patients = max(1, round(n_slides * spec.patients_per_slide))
    patients = rng.permutation(np.arange(n_slides) % n_patients)
    slide_seeds = np.random.SeedSequence(seed).generate_state(n_slides, np.uint64)
    # sites and mimics draw from streams of their own: cohorts without them keep their slides
    sites = make_sites(spec.sites, seed, spec.site_variation)
    of_patient = np.random.default_rng(np.random.SeedSequence([seed, n_slides, 3])).integers(
        0, spec.sites or 1, n_patients
    )
    mimics = np.random.default_rng(np.random.SeedSequence([seed, n_slides, 5])).random(n_slides) < spec.mimics

    ids = [f"slide_{i:03d}" for i in range(n_slides)]
    infos = []
    for i, slide_id in enumerate(tqdm(ids, desc=f"writing {root}", unit="slide", leave=False, disable=None)):
        flavour = spec.flavours[i % len(spec.flavours)]
        path = root / "slides" / f"{slide_id}{EXTENSIONS[flavour]}"
        site = sites[of_patient[patients[i]]] if sites else None
        infos.append(
            write_slide(
                path,
                spec,
                seed=int(slide_seeds[i]),
                tumour=bool(labels[i]),
                flavour=flavour,
                workers=workers,
                site=site,
                mimics=bool(mimics[i]),
            )
        )
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["slide_id", "label", "patient_id"])
    for slide_id, info, patient in zip(ids, infos, patients, strict=True):
        writer.writerow([slide_id, info.label, f"patient_{patient:03d}"])
    atomic_write(root / "labels.csv", table.getvalue())
    cohort = {"params": params, "classes": list(CLASSES), "slides": [info.to_dict(root) for info in infos]}
    atomic_write(manifest, json.dumps(cohort, indent=1))
    write_truth(root)
    write_targets(root, spec)
    return root


def write_truth(root: str | os.PathLike) -> None:
    """Each slide's tumour as `root/annotations/<slide_id>.geojson` (none: an empty collection, annotated without
    tumour), traced exactly on the mask patch truth is counted on, so truth read back through `data_modules.annotations`
    is the generator's own; and labels.csv's `annotations` column naming them. Files already there are kept."""
    root = Path(root)
    rows = list(csv.DictReader((root / "labels.csv").open()))
    infos = slide_infos(root)
    for row in rows:
        path = root / ANNOTATIONS_FOLDER / f"{row['slide_id']}.geojson"
        info = infos[row["slide_id"]]
        if not path.is_file():
            tumour = mask_outline(tumour_mask(info, TRUTH_DOWNSAMPLE), TRUTH_DOWNSAMPLE) if info.tumour else None
            write_geojson(path, tumour)
        row["annotations"] = path.relative_to(root).as_posix()
    table = io.StringIO()
    writer = csv.DictWriter(table, LABEL_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_changed(root / "labels.csv", table.getvalue())


def tumour_burden(info: SlideInfo, downsample: float = 8, kind: int | None = None) -> float:
    """The fraction of the slide's tissue that is tumour (0 for a normal slide); with `kind`, of that type only."""
    if not info.tumour:
        return 0.0
    tumour_px = float(tumour_mask(info, downsample, kind).sum()) * downsample**2
    return min(1.0, tumour_px / (info.tissue_fraction * info.dimensions[0] * info.dimensions[1]))


def survival_times(burden: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Event and censoring times in months for patients of tumour burden `burden`: T ~ Weibull(shape 1.5, scale
    1 / rate), rate = 0.015 exp(6 b / b_max) a month with b_max the cohort's largest burden, so the hazard
    (proportional, rising with time as for progression) grows exp(9) = 8100-fold from no tumour to the most; C ~
    Uniform(6, 60) (administrative end of follow-up). A tumour-free patient's median survival is 52 months; about
    a quarter of the task configs' patients are censored, and the true burden as the risk scores a c-index of about
    0.85 on them (0.71 under the exponential law 0.02 exp(4 b / b_max) this replaced)."""
    rate = 0.015 * np.exp(6 * burden / max(float(burden.max()), 1e-9))
    return rng.weibull(1.5, len(burden)) / rate, rng.uniform(6, 60, len(burden))


def write_targets(root: str | os.PathLike, spec: CohortSpec) -> Path:
    """`root/targets.csv`, every task's targets of the cohort's slides, from their ground truth:

    - `label` (0 normal, 1 tumour) and `annotations`, as labels.csv;
    - `tumour_fraction`: the tumour's share of the tissue (regression);
    - `tumour`, `extensive` (multilabel, one 0/1 column each): tumour present; tumour covering more of the tissue than
      on the median tumour slide;
    - with `tumour_types: 2`, also `tumour_a`, `tumour_b` (multilabel): a focus of that type present;
    - `time`, `event` (survival, months), one outcome per patient, on each of its slides, drawn by
      `survival_times` from the patient's burden (the mean tumour fraction of its slides); event = T <= C,
      time = min(T, C), rounded to 0.1 month.
    And `root/grades.csv` (`slide_id,label,patient_id,annotations`), an ISUP-like grade as the label (the ordinal task):
    0 for a normal slide, 1-3 for the tertile of its tumour burden among the tumour slides.
    Seeded by the cohort seed, so one spec gives one table; an unchanged table is not rewritten."""
    root = Path(root)
    infos = slide_infos(root)
    rows = list(csv.DictReader((root / "labels.csv").open()))
    burden = np.array([tumour_burden(infos[row["slide_id"]]) for row in rows])
    positive = burden[burden > 0]
    extensive_above = float(np.median(positive)) if len(positive) else 1.0
    patients = list(dict.fromkeys(row["patient_id"] for row in rows))  # in order of first slide
    of_patient = np.array([patients.index(row["patient_id"]) for row in rows])
    patient_burden = np.array([burden[of_patient == k].mean() for k in range(len(patients))])
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, len(rows), 17]))
    event_time, censor_time = (times[of_patient] for times in survival_times(patient_burden, rng))
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    kinds = range(spec.tumour_types) if spec.tumour_types > 1 else ()
    types = [[int(tumour_burden(infos[row["slide_id"]], kind=k) > 0) for k in kinds] for row in rows]
    header = [*LABEL_COLUMNS, "tumour_fraction", "tumour", "extensive", "time", "event"]
    writer.writerow(header + [f"tumour_{'ab'[k]}" for k in kinds])
    for row, b, t, c, present in zip(rows, burden, event_time, censor_time, types, strict=True):
        cells = [f"{b:.4f}", int(b > 0), int(b > extensive_above), f"{min(t, c):.1f}", int(t <= c), *present]
        writer.writerow([row["slide_id"], row["label"], row["patient_id"], row["annotations"], *cells])
    edges = np.quantile(positive, [1 / 3, 2 / 3]) if len(positive) else []
    grades = [0 if b == 0 else 1 + int(np.searchsorted(edges, b, "right")) for b in burden]
    graded = [f"{r['slide_id']},{g},{r['patient_id']},{r['annotations']}\n" for r, g in zip(rows, grades, strict=True)]
    _write_changed(root / GRADES_FILE, ",".join(LABEL_COLUMNS) + "\n" + "".join(graded))
    return _write_changed(root / TARGETS_FILE, table.getvalue())


def _write_changed(path: Path, text: str) -> Path:
    if not path.is_file() or path.read_text() != text:
        atomic_write(path, text)
    return path


def load_cohort(root: str | os.PathLike) -> list[SlideInfo]:
    """The ground truth of every slide of a cohort written by `make_cohort`."""
    root = Path(root)
    manifest = root / "cohort.json"
    if not manifest.exists():
        raise ValueError(f"root: no cohort.json in {root}; run make_cohort first")
    return [SlideInfo.from_dict(s, root) for s in json.loads(manifest.read_text())["slides"]]


def slide_infos(root: str | os.PathLike) -> dict[str, SlideInfo]:
    """`load_cohort` by slide id (labels.csv's `slide_id`: the file name without its extensions)."""
    return {info.path.name.split(".")[0]: info for info in load_cohort(root)}
