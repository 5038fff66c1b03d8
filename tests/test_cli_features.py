"""Two-stage MIL from the command line, in-process: extract features to the cache, train, test, predict."""

from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import wandb
import zarr

from data_modules.datasets.feature_cache import FeatureCache
from data_modules.synthetic import CohortSpec, make_cohort
from icmil_pl.cli import main

CONF = Path(__file__).parent / "conf"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    spec = CohortSpec(n_slides=18, seed=0, size=(1024, 1024), tumour_contrast=1.5, tumour_area=(0.1, 0.2))
    return make_cohort(tmp_path_factory.mktemp("cohort"), spec)


def _extract(cohort: Path, run: Path) -> None:
    main(
        [
            "predict",
            "-c",
            str(CONF / "extract.yaml"),
            f"--trainer.callbacks.init_args.cache_root={run / 'features'}",
            f"--trainer.default_root_dir={run}",
            f"--data.init_args.labels={cohort / 'labels.csv'}",
            f"--data.init_args.slides={cohort / 'slides'}",
            f"--data.init_args.grid_cache={run / 'grids'}",
        ]
    )


@pytest.fixture(scope="module")
def features(cohort, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    _extract(cohort, run)
    return run


def test_extraction_writes_one_group_per_slide(cohort, features):
    caches = [p for p in (features / "features").iterdir() if p.is_dir()]
    assert len(caches) == 1
    manifest = json.loads((caches[0] / "manifest.json").read_text())
    assert manifest["backbone"] == "resnet18" and manifest["feature_dim"] == 128
    assert manifest["preset"] is None and manifest["weights"] == "random init" and manifest["output"] == "pooled"
    assert manifest["finetune"] == {"kind": "FullFinetune"}
    assert manifest["patch_size_px"] == 64 and manifest["patch_size_um"] == pytest.approx(32.0)
    with open(cohort / "labels.csv") as fh:
        ids = [row["slide_id"] for row in csv.DictReader(fh)]
    assert sorted(p.stem for p in caches[0].glob("*.zarr")) == sorted(ids)
    group = zarr.open_group(caches[0] / f"{ids[0]}.zarr", mode="r")
    assert group["features"].shape[1] == 128 and group["features"].dtype == np.float32
    assert group["coords"].dtype == np.int32 and group["coords"].shape == (group["features"].shape[0], 2)
    assert np.isfinite(group["features"][:]).all()
    assert group.attrs["weights_hash"] == manifest["weights_hash"]
    assert not list(caches[0].glob(".*tmp*"))  # nothing half-written left behind
    run = manifest["last_extraction"]  # the throughput users compare across versions
    assert (run["slides_embedded"], run["slides_cached"], run["slides_skipped"]) == (len(ids), 0, 0)
    patches = sum(zarr.open_group(g, mode="r")["features"].shape[0] for g in caches[0].glob("*.zarr"))
    assert run["patches"] == patches and run["patches_per_second"] > 0
    assert 0 < run["seconds_per_slide_median"] <= run["seconds_per_slide_slowest"] and run["slowest_slide"] in ids


def _slides(cache: Path) -> dict[str, tuple[int, np.ndarray, np.ndarray]]:
    """slide id -> (mtime of its group, features, coords), for every slide in the cache."""
    out = {}
    for group in sorted(cache.glob("*.zarr")):
        arrays = zarr.open_group(group, mode="r")
        out[group.stem] = ((group / "zarr.json").stat().st_mtime_ns, arrays["features"][:], arrays["coords"][:])
    return out


def test_second_extraction_skips_finished_slides(cohort, features, capsys):
    cache = next(p for p in (features / "features").iterdir() if p.is_dir())
    before = _slides(cache)
    assert len(before) == 18
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _extract(cohort, features)
    assert not [w for w in caught if "DataLoader" in str(w.message)]  # nothing to embed is expected, not warned
    printed = capsys.readouterr().out
    assert f"features: {cache}" in printed  # says where they are, and that nothing was left to do
    assert "extraction: 0 slides embedded, 18 already cached, 0 skipped; 0 patches" in printed
    assert not (features / "config.yaml").exists()  # no logger, no folder of its own: no config.yaml in runs/
    after = _slides(cache)
    assert after.keys() == before.keys()
    for slide, (mtime, feats, coords) in before.items():  # not rewritten: same file, same arrays
        assert after[slide][0] == mtime, slide
        np.testing.assert_array_equal(after[slide][1], feats)
        np.testing.assert_array_equal(after[slide][2], coords)


def test_fit_test_predict(cohort, features, tmp_path, capsys):
    args = [
        "-c",
        str(CONF / "abmil.yaml"),
        f"--data.init_args.labels={cohort / 'labels.csv'}",
        f"--data.init_args.features={features / 'features'}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    main(["fit", *args])
    run = next(tmp_path.glob("lightning_logs/version_0"))
    results = json.loads((run / "results.json").read_text())
    entry = results["iterations"][0]
    assert set(entry["val"]) == set(entry["test"]) == {"auroc", "accuracy", "f1", "balanced_accuracy"}
    assert entry["test"]["auroc"] > 0.5  # above chance on an easy cohort
    splits = json.loads((run / "splits.json").read_text())
    assert not set(splits["train"]) & set(splits["test"]) and splits["val"]
    assert (run / "config.yaml").is_file() and (run / "predictions.csv").is_file()
    assert f"{entry['test']['auroc']:.3f}" in (run / "report.html").read_text()  # the fit's report

    best = run / entry["checkpoint"]  # relative to the run's folder
    assert best.is_file()
    (run / "predictions.csv").unlink()
    capsys.readouterr()
    main(["test", "-c", str(run / "config.yaml"), f"--ckpt_path={best}"])
    assert f"test: outputs in {run.parent / 'version_1'}" in capsys.readouterr().out
    rows = list(csv.DictReader(open(next(tmp_path.glob("lightning_logs/version_1/predictions.csv")))))
    assert len(rows) == len(splits["test"]) and {"slide_id", "label", "predicted", "prob_1"} <= set(rows[0])
    assert (run.parent / "version_1" / "figures" / "test_roc.png").is_file()

    # predict on slides without labels (a slide_id column only): every listed slide, classes named by the checkpoint;
    # with the slides folder given, a heatmap and a patch montage per slide
    new = tmp_path / "new.csv"
    new.write_text("slide_id\n" + "".join(f"{s}\n" for s in splits["test"]))
    main(
        [
            "predict",
            "-c",
            str(run / "config.yaml"),
            f"--ckpt_path={best}",
            f"--data.init_args.labels={new}",
            f"--data.init_args.slides={cohort / 'slides'}",
        ]
    )
    out = run.parent / "version_2"
    predicted = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["slide_id"] for r in predicted] == splits["test"] and all(r["label"] == "" for r in predicted)
    assert {r["slide_id"]: r["prob_1"] for r in predicted} == {r["slide_id"]: r["prob_1"] for r in rows}
    for slide in splits["test"]:
        assert (out / "figures" / f"{slide}_heatmap.png").is_file() and (
            out / "figures" / f"{slide}_patches.png"
        ).is_file()
        scores = zarr.open_group(str(out / "scores.zarr"), mode="r")[slide]
        assert scores["scores"].shape[0] == scores["coords"].shape[0] > 0
        assert (out / "qupath" / f"{slide}.geojson").is_file()
    assert (out / "report.html").read_text().count("#slide=") == 2 * len(splits["test"])  # a predict folder's own
    with pytest.raises(ValueError, match=r"new\.csv: slide '.+' and \d+ more has no label, which scoring the test"):
        main(["test", "-c", str(run / "config.yaml"), f"--ckpt_path={best}", f"--data.init_args.labels={new}"])


def test_a_fit_without_validation_slides_keeps_the_last_epoch(cohort, features, tmp_path):
    """`splits.val_fraction: 0`, as the split errors advise for small cohorts: it trained, then failed in results."""
    args = [f"--data.init_args.labels={cohort / 'labels.csv'}", f"--data.init_args.features={features / 'features'}"]
    out = [f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    main(["fit", "-c", str(CONF / "abmil.yaml"), *args, *out, "--data.init_args.splits.val_fraction=0"])
    run = next(tmp_path.glob("lightning_logs/version_0"))
    entry = json.loads((run / "results.json").read_text())["iterations"][0]
    assert (
        entry["val"] == {} and entry["test"]["auroc"] > 0.5 and not json.loads((run / "splits.json").read_text())["val"]
    )


def test_a_checkpoint_of_another_architecture_is_refused_in_one_line(cohort, features, tmp_path):
    """A traceback listing hundreds of state-dict keys, before: now the checkpoint's model and the config's."""
    data = [f"--data.init_args.labels={cohort / 'labels.csv'}", f"--data.init_args.features={features / 'features'}"]
    out = [f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    main(["fit", "-c", str(CONF / "abmil.yaml"), *data, *out, "--trainer.max_epochs=1"])
    best = next(tmp_path.glob("lightning_logs/version_0/checkpoints/best*.ckpt"))
    other = ["--model.init_args.aggregator=TransMIL", "--model.init_args.aggregator.init_args.in_dim=128"]
    with pytest.raises(
        ValueError,
        match=r"best.*\.ckpt: the weights of BagClassifier\(ABMIL.*\), not of this config's "
        r"BagClassifier\(TransMIL.*\) \(.*\); evaluate it with the config it was trained with",
    ):
        main(["test", "-c", str(CONF / "abmil.yaml"), *data, *out, *other, f"--ckpt_path={best}"])


def test_print_config_resolves_overrides(cohort, features, capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "-c",
                str(CONF / "abmil.yaml"),
                "--model.init_args.lr=0.01",
                "--print_config",
                f"--data.init_args.labels={cohort / 'labels.csv'}",
                f"--data.init_args.features={features / 'features'}",
            ]
        )
    printed = capsys.readouterr().out
    assert "lr: 0.01" in printed and "class_path: icmil_pl.aggregators.ABMIL" in printed


def test_wandb_logger_runs_offline(cohort, features, tmp_path):
    """W&B needs no account or network: WANDB_MODE=offline (set for every test) keeps the run on disk."""
    try:
        main(
            [
                "fit",
                "-c",
                str(CONF / "abmil.yaml"),
                "--trainer.max_epochs=2",
                f"--data.init_args.labels={cohort / 'labels.csv'}",
                f"--data.init_args.features={features / 'features'}",
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.logger=WandbLogger",
                f"--trainer.logger.init_args.save_dir={tmp_path}",
                "--trainer.logger.init_args.project=icmil-tests",
            ]
        )
    finally:
        wandb.finish()  # the next test's W&B starts from a closed run
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_a_replaced_slide_or_another_mpp_is_embedded_again(tmp_path):
    """The cache used to key on the slide id alone: a slide file replaced under the same id kept its old features
    (26 rows for a file of 35 patches), and so did a rerun with another `mpp_override`."""
    cohort = make_cohort(tmp_path / "cohort", CohortSpec(n_slides=2, seed=5, size=(768, 768)))
    first, second = sorted((cohort / "slides").iterdir())
    _extract(cohort, tmp_path)
    cache = next(p for p in (tmp_path / "features").iterdir() if p.is_dir())
    before = _slides(cache)

    replacement = make_cohort(tmp_path / "other", CohortSpec(n_slides=1, seed=9, size=(1024, 1024), flavours=("svs",)))
    first.write_bytes(next((replacement / "slides").iterdir()).read_bytes())
    _extract(cohort, tmp_path)
    after = _slides(cache)
    replaced, kept = first.name.split(".")[0], second.name.split(".")[0]
    assert after[kept][0] == before[kept][0]  # untouched
    assert after[replaced][0] != before[replaced][0] and len(after[replaced][1]) != len(before[replaced][1])
    group = zarr.open_group(cache / f"{replaced}.zarr", mode="r")
    assert group["features"].shape[0] == group.attrs["num_patches"] == len(after[replaced][2])

    main(
        [
            "predict",
            "-c",
            str(CONF / "extract.yaml"),
            f"--trainer.callbacks.init_args.cache_root={tmp_path / 'features'}",
            f"--trainer.default_root_dir={tmp_path}",
            f"--data.init_args.labels={cohort / 'labels.csv'}",
            f"--data.init_args.slides={cohort / 'slides'}",
            f"--data.init_args.grid_cache={tmp_path / 'grids'}",
            "--data.init_args.tiling.mpp_override=0.6",
            "--data.init_args.tiling.force_mpp=true",
        ]
    )
    forced = _slides(cache)
    assert all(forced[s][0] != after[s][0] for s in (replaced, kept))  # read at another mpp: other patches


def test_a_damaged_slide_is_embedded_again(tmp_path):
    """A deleted chunk read as zeros and flipped the slide's call; `has` saw zarr.json, so a rerun kept the damage."""
    cohort = make_cohort(tmp_path / "cohort", CohortSpec(n_slides=2, seed=5, size=(768, 768)))
    _extract(cohort, tmp_path)
    cache = FeatureCache.find(tmp_path / "features")
    before = _slides(cache.path)
    first, second = sorted(before)
    (cache.path / f"{first}.zarr" / "features" / "c" / "0" / "0").unlink()
    (cache.path / f"{second}.zarr" / "coords" / "c" / "0" / "0").unlink()
    for slide in (first, second):
        with pytest.raises(ValueError, match=rf"^slide '{slide}': features in .* are damaged .*rerun the feature"):
            cache.read(slide)
    _extract(cohort, tmp_path)
    after = _slides(cache.path)
    for slide in (first, second):
        assert after[slide][0] != before[slide][0]  # written again
        np.testing.assert_allclose(cache.read(slide).features, before[slide][1], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(cache.read(slide).coords, before[slide][2])


def _reverse_level0_tiles(path: Path) -> None:
    """Other pixels in a file of the same size and mtime: level 0's tile offsets and byte counts listed in reverse,
    so every tile shows another."""
    stat = path.stat()
    with tifffile.TiffFile(path) as tif:
        tags = [tif.pages[0].tags[name] for name in ("TileOffsets", "TileByteCounts")]
        dtypes = [np.dtype(tif.byteorder + {3: "u2", 4: "u4", 16: "u8"}[int(tag.dtype)]) for tag in tags]
        spans = [(tag.valueoffset, np.asarray(tag.value, dtype)) for tag, dtype in zip(tags, dtypes, strict=True)]
    with open(path, "r+b") as fh:
        for offset, values in spans:
            fh.seek(offset)
            fh.write(values[::-1].tobytes())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)


def test_a_slide_rewritten_with_the_same_size_and_mtime_is_embedded_again(tmp_path):
    """The grid cache and the features' `source` keyed on (size, mtime): a slide rewritten with other pixels that kept
    both (`cp -p`, a converter restoring times) kept its old grid and its old features."""
    cohort = make_cohort(tmp_path / "cohort", CohortSpec(n_slides=2, seed=5, size=(768, 768)))
    first, second = sorted((cohort / "slides").iterdir())
    _extract(cohort, tmp_path)
    cache = next(p for p in (tmp_path / "features").iterdir() if p.is_dir())
    before = _slides(cache)
    _reverse_level0_tiles(first)
    _extract(cohort, tmp_path)
    after = _slides(cache)
    replaced, kept = first.name.split(".")[0], second.name.split(".")[0]
    assert after[kept][0] == before[kept][0]  # untouched
    assert after[replaced][0] != before[replaced][0]
    new, old = after[replaced][1], before[replaced][1]
    assert new.shape != old.shape or not np.allclose(new, old)  # the new pixels' patches and features
