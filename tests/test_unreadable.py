"""A slide that cannot be read (a broken tile, no tissue): `on_slide_error: raise` stops the run naming the slide, the
level and the tile; `skip` leaves the slide out of extraction, training and evaluation, records it in the feature
manifest and results.json, and prints it at the end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from data_modules.datasets.feature_cache import FeatureCache
from helpers import break_level0_tiles, icmil_args, lenet_end_to_end
from icmil_pl.cli import main

CONF = Path(__file__).parent / "conf"


@pytest.fixture(scope="module")
def cohort(icmil_cohort, tmp_path_factory) -> tuple[Path, str, str]:
    """The ICMIL test cohort with every level-0 tile of one training slide broken and one slide made blank glass."""
    root = tmp_path_factory.mktemp("unreadable")
    shutil.copytree(icmil_cohort, root, dirs_exist_ok=True)
    broken, blank = sorted((root / "slides").iterdir())[1:3]
    break_level0_tiles(broken)
    with tifffile.TiffFile(blank) as tif:
        shape = tif.series[0].levels[0].shape
    blank.unlink()
    blank = blank.with_suffix(".tif")
    tifffile.imwrite(
        blank,
        np.full(shape, 242, np.uint8),
        tile=(256, 256),
        photometric="rgb",
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
    )
    return root, broken.name.split(".")[0], blank.name.split(".")[0]


def _extract(cohort: Path, out: Path, *extra: str) -> None:
    main(
        [
            "predict",
            "-c",
            str(CONF / "extract.yaml"),
            f"--trainer.callbacks.init_args.cache_root={out / 'features'}",
            f"--trainer.default_root_dir={out}",
            f"--data.init_args.labels={cohort / 'labels.csv'}",
            f"--data.init_args.slides={cohort / 'slides'}",
            f"--data.init_args.grid_cache={out / 'grids'}",
            *extra,
        ]
    )


def test_by_default_a_broken_tile_stops_extraction_naming_slide_level_and_tile(cohort, tmp_path):
    root, broken, blank = cohort
    with pytest.raises(ValueError, match=rf"{blank}\.tif: no tissue found"):
        _extract(root, tmp_path)
    labels = root / "without_blank.csv"  # beside the cohort's: its annotations cells are relative to it
    labels.write_text(
        "".join(line + "\n" for line in (root / "labels.csv").read_text().splitlines() if blank not in line)
    )
    with pytest.raises(ValueError, match=rf"{broken}\.\w+: tile \d+ of level 0 cannot be decoded \(Not a JPEG file"):
        _extract(root, tmp_path, f"--data.init_args.labels={labels}")


def test_skip_leaves_unreadable_slides_out_of_extraction_and_says_so(cohort, tmp_path, capsys):
    root, broken, blank = cohort
    _extract(root, tmp_path, "--data.init_args.on_slide_error=skip")
    (cache,) = [p for p in (tmp_path / "features").iterdir() if p.is_dir()]
    skipped = FeatureCache(cache).skipped()
    assert sorted(skipped) == sorted([broken, blank])
    assert "cannot be decoded" in skipped[broken] and "no tissue found" in skipped[blank]
    assert len(list(cache.glob("*.zarr"))) == 10 and not list(cache.glob(".*.tmp-*"))  # no half-written slide left
    printed = capsys.readouterr().out
    assert f"features: {cache}" in printed and "skipped 2 slide(s)" in printed and f"  {broken}: " in printed


def test_icmil_with_skip_trains_evaluates_and_records_without_them(cohort, tmp_path):
    root, broken, blank = cohort
    data = [
        f"--data.init_args.labels={root / 'labels.csv'}",
        f"--data.init_args.slides={root / 'slides'}",
        "--data.init_args.on_slide_error=skip",
        "--model.init_args.coupling.init_args.max_epochs=1",
    ]
    main(icmil_args(root, tmp_path, "fit", *data))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert sorted(results["skipped"]) == sorted([broken, blank]) and len(results["iterations"]) == 2
    splits = json.loads((tmp_path / "run" / "iter1" / "bag" / "splits.json").read_text())
    assert not {broken, blank} & set(sum(splits.values(), []))
    main(icmil_args(root, tmp_path, "predict", *data))
    predicted = (tmp_path / "run" / "final" / "predict" / "predictions.csv").read_text()
    assert broken not in predicted and blank not in predicted and predicted.count("\n") == 11


def test_end_to_end_with_skip_leaves_broken_bags_out_of_training_and_testing(cohort, tmp_path):
    root, broken, blank = cohort
    main(
        [
            "fit",
            "--seed_everything=0",
            *lenet_end_to_end(64),
            "--data=SlideBagDataModule",
            f"--data.labels={root / 'labels.csv'}",
            f"--data.slides={root / 'slides'}",
            "--data.tiling.mpp=1.0",
            "--data.tiling.patch_size=32",
            f"--data.grid_cache={tmp_path / 'grids'}",
            "--data.splits.folds=3",
            "--data.splits.val_fraction=0.34",
            "--data.on_slide_error=skip",
            "--trainer.max_epochs=1",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    results = json.loads(next(tmp_path.rglob("results.json")).read_text())
    assert blank in results["skipped"] and "no tissue found" in results["skipped"][blank]
    if broken in results["skipped"]:  # a broken slide in any split is skipped where it is read
        assert "cannot be decoded" in results["skipped"][broken]
    predictions = next(tmp_path.rglob("predictions.csv")).read_text()
    assert broken not in predictions and blank not in predictions
