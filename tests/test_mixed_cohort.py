"""A cohort as a hospital has it: SVS, TIFF, OME-TIFF, DICOM WSI and single-level TIFFs side by side, in nested
folders, found through the labels CSV's `path` column, through extraction, ICMIL and predict."""

from __future__ import annotations

import csv
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import tifffile

from data_modules import open_slide
from data_modules.synthetic import make_cohort
from data_modules.synthetic.dicom import dicom_from_slide
from helpers import ICMIL_COHORT, icmil_args, write_labels
from icmil_pl.cli import main


def _single_level(source: Path, target: Path, strips: bool) -> None:
    """Level 0 of `source` alone, stored in strips or tiles, with its resolution."""
    with open_slide(source) as slide:
        pixels = slide.read_region((0, 0), 0, slide.dimensions)
        res = 1e4 / slide.mpp
    layout = {"rowsperstrip": 64} if strips else {"tile": (256, 256)}
    tifffile.imwrite(
        target,
        pixels,
        photometric="rgb",
        compression="zlib",
        resolution=(res, res),
        resolutionunit="CENTIMETER",
        **layout,
    )


def test_a_cohort_of_every_format_in_nested_folders_runs_through_icmil_and_predict(tmp_path):
    source = make_cohort(tmp_path / "source", replace(ICMIL_COHORT, flavours=("svs", "tiff", "ome")))
    with (source / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    root = tmp_path / "hospital"
    kinds = ["as written", "as written", "as written", "dicom", "strips", "tiles"]
    listed, kind_of = [], {}
    for k, row in enumerate(rows):
        file = next((source / "slides").glob(f"{row['slide_id']}.*"))
        folder = root / f"project_{k % 2}" / f"case_{k:02d}"  # TCGA-like nesting
        folder.mkdir(parents=True)
        kind = kinds[k % len(kinds)]
        if kind == "dicom":
            dicom_from_slide(file, folder / "series")
            target = folder / "series"
        elif kind in ("strips", "tiles"):
            target = folder / "scan.tif"  # the same file name in many folders: ids, not names, name outputs
            _single_level(file, target, strips=kind == "strips")
        else:
            target = folder / file.name
            shutil.copy(file, target)
        listed.append((row["slide_id"], row["label"], row["patient_id"], str(target.relative_to(tmp_path))))
        kind_of[row["slide_id"]] = kind
    labels = write_labels(tmp_path / "labels.csv", listed, ("slide_id", "label", "patient_id", "path"))

    backends = {}
    for slide_id, *_, path in listed:
        with open_slide(tmp_path / path) as slide:
            backends[slide_id] = (slide.backend, slide.properties["vendor"], slide.level_count)
    assert {b[:2] for b in backends.values()} == {
        ("tifffile", "aperio"),
        ("tifffile", "generic-tiff"),
        ("tifffile", "ome"),
        ("openslide", "dicom"),
    }
    single = [levels for slide_id, (*_, levels) in backends.items() if kind_of[slide_id] in ("strips", "tiles")]
    assert single == [1, 1, 1, 1]  # 1024 px: small enough to need no computed levels

    out = tmp_path / "out"
    args = [f"--data.init_args.labels={labels}", "--data.init_args.slides=null"]
    main(icmil_args(source, out, "fit", *args))
    main(icmil_args(source, out, "predict", *args))

    run = out / "run"
    features = [p for p in (run / "features").iterdir() if p.is_dir()]
    assert len(features) == 2 and all(len(list(c.rglob("*.zarr/zarr.json"))) == len(rows) for c in features)
    with (run / "final" / "predict" / "predictions.csv").open() as fh:
        predicted = {r["slide_id"]: r for r in csv.DictReader(fh)}
    assert set(predicted) == {r["slide_id"] for r in rows}
    assert all(0 <= float(r["prob_1"]) <= 1 for r in predicted.values())
    heatmaps = list((run / "final" / "predict" / "figures").rglob("*_heatmap.png"))
    assert len(heatmaps) == len(rows) and not any("scan" in p.name or "series" in p.name for p in heatmaps)
    assert np.isfinite(float(next(iter(predicted.values()))["prob_1"]))
