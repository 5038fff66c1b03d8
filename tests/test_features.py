"""The feature cache, `.h5` features users bring, and the feature-bag data module: bags, statistics, splits,
errors."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch

from data_modules.cohort.splits import SplitConfig
from data_modules.datasets.feature_bags import FeatureBagDataModule
from data_modules.datasets.feature_cache import FeatureCache
from helpers import write_labels


def _h5(folder, slide_id, features, coords=None):
    folder.mkdir(exist_ok=True)
    with h5py.File(folder / f"{slide_id}.h5", "w") as fh:
        fh["features"] = features
        if coords is not None:
            fh["coords"] = coords


@pytest.fixture
def cohort(tmp_path):
    """12 slides of 9 patients, two classes, h5 features whose first dimension carries the label."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        label = i % 2
        features = rng.normal(size=(5 + i, 8)).astype(np.float32)
        features[:, 0] += 2 * label
        _h5(tmp_path / "feats", f"s{i}", features, rng.integers(0, 1000, (5 + i, 2)))
        rows.append((f"s{i}", label, f"p{min(i, 8) if i < 9 else i - 6}"))
    return write_labels(tmp_path / "labels.csv", rows), tmp_path / "feats"


# -- zarr cache --------------------------------------------------------------------------------------------------------
def test_cache_writes_atomically_and_reads_back(tmp_path):
    cache = FeatureCache(tmp_path / "abc")
    writer = cache.writer("s1", 5, 3, "float16", {"backbone": "x"})
    writer.append(np.ones((2, 3), np.float32), np.zeros((2, 2), np.int32))
    assert not cache.has("s1") and not writer.complete
    writer.append(np.full((3, 3), 2, np.float32), np.ones((3, 2), np.int32))
    writer.commit()
    bag = cache.read("s1")
    assert cache.has("s1") and len(bag) == 5 and bag.features.dtype == np.float16
    np.testing.assert_array_equal(bag.features, [[1] * 3] * 2 + [[2] * 3] * 3)
    np.testing.assert_array_equal(bag.coords, [[0, 0]] * 2 + [[1, 1]] * 3)
    assert bag.attrs["backbone"] == "x"
    assert [p.name for p in cache.path.iterdir() if p.name != ".locks"] == ["s1.zarr"]


def test_incomplete_or_nan_slides_leave_nothing(tmp_path):
    cache = FeatureCache(tmp_path / "abc")
    writer = cache.writer("s1", 5, 3, "float32", {})
    writer.append(np.ones((2, 3), np.float32), np.zeros((2, 2), np.int32))
    with pytest.raises(RuntimeError, match="wrote 2 of 5"):
        writer.commit()
    nan = cache.writer("s2", 2, 3, "float32", {})
    with pytest.raises(ValueError, match="s2: the embedder produced non-finite features"):
        nan.append(np.full((2, 3), np.nan, np.float32), np.zeros((2, 2), np.int32))
    assert not cache.has("s1") and not cache.has("s2") and list(cache.path.iterdir()) == []


def _cached(tmp_path, n=5000, zeros=False):
    """A slide of `n` rows (two feature chunks, the second an edge chunk) in a fresh cache, and what was written."""
    cache = FeatureCache(tmp_path / "abc")
    rng = np.random.default_rng(0)
    features = np.zeros((n, 3), np.float16) if zeros else rng.normal(size=(n, 3)).astype(np.float16)
    coords = np.zeros((n, 2), np.int32) if zeros else rng.integers(0, 10**5, (n, 2)).astype(np.int32)
    writer = cache.writer("s1", n, 3, "float16", {"backbone": "x", "source": "patches digest"})
    for start in range(0, n, 1000):
        writer.append(features[start : start + 1000], coords[start : start + 1000])
    writer.commit()
    return cache, features, coords


@pytest.mark.parametrize(
    "damage, has",
    [
        ("features chunk deleted", False),
        ("edge chunk deleted", False),
        ("coords chunk deleted", False),
        ("features chunk truncated", False),
        ("coords chunk truncated", False),
        ("zarr.json deleted", False),
        ("array zarr.json deleted", False),
        ("features chunk overwritten", True),  # the same size: only reading it can tell
    ],
)
def test_a_damaged_slide_is_refused_and_not_complete(tmp_path, damage, has):
    """A deleted chunk read as zarr's fill value, zeros, and flipped the slide's call (exit 0); a deleted coords
    chunk put every patch at (0, 0); `has` only looked for zarr.json, so extraction never redid the slide."""
    cache, features, coords = _cached(tmp_path)
    group = cache.path / "s1.zarr"
    bag = cache.read("s1")
    np.testing.assert_array_equal(bag.features, features)
    np.testing.assert_array_equal(bag.coords, coords)
    assert cache.has("s1", "patches digest") and not cache.has("s1", "other patches")
    chunk = {"features": group / "features/c/0/0", "edge": group / "features/c/1/0", "coords": group / "coords/c/0/0"}
    what = damage.split()[0]
    if damage.endswith("chunk deleted"):
        chunk[what].unlink()
    elif damage.endswith("truncated"):
        os.truncate(chunk[what], chunk[what].stat().st_size // 2)
    elif damage == "zarr.json deleted":
        (group / "zarr.json").unlink()
    elif damage == "array zarr.json deleted":
        (group / "coords" / "zarr.json").unlink()
    else:
        data = bytearray(chunk["features"].read_bytes())
        data[100:108] = bytes(8)
        (group / "rewritten").write_bytes(bytes(data))  # another file: its stat differs from the one read above
        os.replace(group / "rewritten", chunk["features"])
    assert cache.has("s1") is has and cache.has("s1", "patches digest") is has
    fix = f"delete {re.escape(str(group))} and " if has else ""  # extraction redoes only what `has` sees
    pattern = rf"^slide 's1': features in {re.escape(str(cache.path))} are damaged \(.+\); {fix}rerun the feature extr"
    with pytest.raises(ValueError, match=pattern) as error:
        cache.read("s1")
    assert "\n" not in str(error.value)


def test_all_zero_chunks_are_written_and_caches_without_checksums_still_read(tmp_path):
    """zarr skips chunks equal to its fill value unless told to write them: a slide of zeros at (0, 0) would look
    damaged. Caches written before checksums are read with the structural checks alone."""
    cache, features, _ = _cached(tmp_path, zeros=True)
    assert cache.has("s1") and not cache.read("s1").features.any()
    cache, features, coords = _cached(tmp_path / "old")
    meta = cache.path / "s1.zarr" / "zarr.json"
    written = json.loads(meta.read_text())
    del written["attributes"]["checksums"]
    meta.write_text(json.dumps(written))
    np.testing.assert_array_equal(cache.read("s1").features, features)
    (cache.path / "s1.zarr" / "features/c/1/0").unlink()
    assert not cache.has("s1")
    with pytest.raises(ValueError, match=r"chunk features/c/1/0 is missing\); rerun the feature extraction"):
        cache.read("s1")


def test_cache_of_another_embedder_is_refused(tmp_path):
    cache = FeatureCache(tmp_path / "abc")
    cache.write_manifest({"backbone": "resnet50", "weights_hash": "1"})
    cache.write_manifest({"backbone": "resnet50", "weights_hash": "1"})  # the same embedder again is fine
    with pytest.raises(ValueError, match="was written by .*resnet50.*not by .*resnet18"):
        cache.write_manifest({"backbone": "resnet18", "weights_hash": "2"})


# -- h5 features (CLAM / TRIDENT) --------------------------------------------------------------------------------------
def test_reads_clam_and_trident_h5(tmp_path):
    _h5(tmp_path, "clam", np.ones((4, 6), np.float16), np.arange(8).reshape(4, 2))
    _h5(tmp_path, "batched", np.ones((1, 4, 6), np.float32))  # some tools keep a leading batch axis
    _h5(tmp_path, "batched_coords", np.ones((1, 4, 6), np.float32), np.arange(8).reshape(1, 4, 2))
    cache = FeatureCache.find(tmp_path)
    clam = cache.read("clam")
    assert clam.features.shape == (4, 6) and clam.features.dtype == np.float16  # half stays half
    assert clam.coords.tolist()[1] == [2, 3]
    batched = cache.read("batched")
    assert batched.features.shape == (4, 6) and batched.coords.shape == (4, 2)  # no coords: zeros
    assert cache.read("batched_coords").coords.tolist()[1] == [2, 3]
    with pytest.raises(ValueError, match="slide 'missing': no features in"):
        cache.read("missing")


def test_the_patch_side_is_read_where_clam_and_trident_record_it(tmp_path):
    """Heatmaps, QuPath and the viewer draw each patch its recorded side, not a guess from the coordinates' stride."""
    attrs = {"clam": {"patch_size": 256, "patch_level": 0}, "trident": {"patch_size": 224, "patch_size_level0": 448}}
    for name, coords_attrs in attrs.items():
        _h5(tmp_path, name, np.ones((4, 6), np.float32), np.arange(8).reshape(4, 2) * 512)  # strided coordinates
        with h5py.File(tmp_path / f"{name}.h5", "a") as fh:
            fh["coords"].attrs.update(coords_attrs)
    _h5(tmp_path, "bare", np.ones((4, 6), np.float32), np.arange(8).reshape(4, 2))
    cache = FeatureCache.find(tmp_path)
    assert [cache.read(n).patch_side for n in ("clam", "trident", "bare")] == [256.0, 448.0, None]


def test_data_module_serves_bags_and_standardization_stats(cohort, tmp_path):
    labels, feats = cohort
    data = FeatureBagDataModule(str(labels), str(feats), splits=SplitConfig(folds=3, val_fraction=0.25))
    data.setup("fit")
    assert data.feature_dim == 8 and data.classes == ["0", "1"]
    bag = data.dataset("train")[0]
    assert bag["features"].dtype == torch.float32 and bag["features"].shape[1] == 8 and bag["label"].ndim == 0
    mean, std = data.feature_stats("train")
    train = np.concatenate([data.cache.read(s).features for s in data.splits["train"]])
    np.testing.assert_allclose(mean, train.mean(0), atol=1e-5)
    np.testing.assert_allclose(std, train.std(0), atol=1e-5)
    batches = list(data.train_dataloader())
    assert len(batches) == len(data.splits["train"]) and batches[0]["features"].ndim == 2


@pytest.mark.parametrize(
    "problem, message",
    [
        ("missing", r"labels\.csv: slide 'ghost': no features in .*feats"),
        ("duplicate", r"labels\.csv: duplicate slide_id 's1'"),
        ("label", r"labels\.csv:3: slide 's1' has label '7', not one of the classes \['0', '1'\]"),
        ("empty", r"slide 's1' has an empty bag"),
        ("nan", r"slide 's1' has NaN or infinite features"),
        ("dims", r"different feature dimensions \[8, 9\]"),
        ("longer coords", r"labels\.csv: .*s1\.h5: 3 feature rows but 4 coords; expected one per patch"),
        ("shorter coords", r"labels\.csv: .*s1\.h5: 3 feature rows but 2 coords"),
        ("transposed coords", r"labels\.csv: .*s1\.h5: coords of shape \(2, 3\); expected \(N, 2\)"),
        ("coords of three", r"labels\.csv: .*s1\.h5: coords of shape \(3, 3\); expected \(N, 2\)"),
        (
            "coords off the slide",
            r"s1\.h5: 1 of 3 coords lie outside slide 's1' \(.*s1\.tif, 1200 x 1000 px at level 0\)",
        ),
        ("negative coords", r"s1\.h5: 1 of 3 coords lie outside slide 's1' .* row 2: \(-5, 10\); expected level-0"),
    ],
)
def test_bad_cohorts_fail_before_anything_is_written(cohort, tmp_path, problem, message):
    labels, feats = cohort
    (tmp_path / "slides").mkdir()  # s1 has a file (1200 x 1000 px), the other slides none: their coords go unchecked
    slide = np.full((1000, 1200, 3), 255, np.uint8)
    tifffile.imwrite(tmp_path / "slides" / "s1.tif", slide, photometric="rgb", compression="zlib")
    rows = list(csv.reader(open(labels)))
    if problem == "missing":
        rows.append(["ghost", "0", "px"])
    elif problem == "duplicate":
        rows.append(["s1", "1", "p1"])
    elif problem == "label":
        rows[2][1] = "7"
    elif problem == "empty":
        _h5(feats, "s1", np.zeros((0, 8), np.float32))
    elif problem == "nan":
        _h5(feats, "s1", np.full((3, 8), np.nan, np.float32))
    elif problem == "dims":
        _h5(feats, "s1", np.zeros((3, 9), np.float32))
    elif problem == "longer coords":  # used to draw a heatmap from mismatched arrays, exit 0
        _h5(feats, "s1", np.zeros((3, 8), np.float32), np.zeros((4, 2), np.int32))
    elif problem == "shorter coords":  # used to train, then fail in predict after writing scores.zarr
        _h5(feats, "s1", np.zeros((3, 8), np.float32), np.zeros((2, 2), np.int32))
    elif problem in ("transposed coords", "coords of three"):  # (2, N) read as (N, 2) pairs: heatmaps on glass
        _h5(
            feats, "s1", np.zeros((3, 8), np.float32), np.arange(2 * 3 if "transposed" in problem else 9).reshape(-1, 3)
        )
    elif problem in ("coords off the slide", "negative coords"):  # another slide's, or another level's coords
        far = (1200, 10) if problem == "coords off the slide" else (-5, 10)
        _h5(feats, "s1", np.zeros((3, 8), np.float32), np.array([(0, 0), (1199, 999), far], np.int32))
    write_labels(labels, rows[1:], rows[0])
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        data = FeatureBagDataModule(str(labels), str(feats), classes=["0", "1"], slides=str(tmp_path / "slides"))
        data.prepare_data()
    assert not run.exists()


def test_features_folder_resolution(tmp_path, cohort):
    labels, _ = cohort
    with pytest.raises(ValueError, match="does not exist"):
        FeatureBagDataModule(str(labels), str(tmp_path / "nope"))
    root = tmp_path / "features"
    for key in ("aaa", "bbb"):
        FeatureCache(root / key).write_manifest({"key": key})
    with pytest.raises(ValueError, match=r"holds 2 caches \(aaa, bbb\); name one"):
        FeatureBagDataModule(str(labels), str(root))


def test_fixed_split_ids_are_used_as_given_and_saved_by_the_model(cohort, tmp_path):
    """An ICMIL run hands its splits to every bag phase; a model trained on a data module saves them."""
    import pytorch_lightning as pl

    from icmil_pl.aggregators import MeanPool
    from icmil_pl.bag_classifier import BagClassifier

    labels, feats = cohort
    fixed = {"train": ["s0", "s1", "s2", "s3", "s4", "s5"], "val": ["s6", "s7"], "test": ["s8", "s9", "s10", "s11"]}
    data = FeatureBagDataModule(str(labels), str(feats), split_ids=fixed)
    assert [row.slide_id for row in data.split_rows("val")] == ["s6", "s7"]
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(BagClassifier(MeanPool(8, hidden_dim=4)), datamodule=data)
    assert json.loads((tmp_path / "splits.json").read_text()) == fixed
    computed = FeatureBagDataModule(str(labels), str(feats), splits=SplitConfig(folds=3, val_fraction=0.25, seed=1))
    computed.setup("fit")
    assert computed.splits != fixed and sorted(sum(computed.splits.values(), [])) == sorted(f"s{i}" for i in range(12))
    with pytest.raises(ValueError, match=r"split_ids: expected \{train, val, test\} .* unknown slides \['ghost'\]"):
        FeatureBagDataModule(str(labels), str(feats), split_ids={**fixed, "test": ["ghost"]})


def test_class_names_in_the_wrong_order_are_refused(tmp_path):
    """`class_names: [tumour, normal]` for labels normal/tumour used to call every normal slide tumour."""
    import pytorch_lightning as pl

    from icmil_pl.aggregators import MeanPool
    from icmil_pl.bag_classifier import BagClassifier

    rows = []
    for i in range(12):
        _h5(tmp_path / "feats", f"s{i}", np.full((4, 8), i % 2, np.float32))
        rows.append((f"s{i}", ["normal", "tumour"][i % 2], f"p{i}"))
    data = FeatureBagDataModule(
        str(write_labels(tmp_path / "labels.csv", rows)),
        str(tmp_path / "feats"),
        splits=SplitConfig(folds=3, val_fraction=0.25),
    )
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, default_root_dir=tmp_path, enable_progress_bar=False
    )
    with pytest.raises(ValueError, match=r"class_names: 'tumour' is at position 0, but label 'tumour' is class 1"):
        trainer.fit(BagClassifier(MeanPool(8, hidden_dim=4), class_names=["tumour", "normal"]), datamodule=data)
    model = BagClassifier(MeanPool(8, hidden_dim=4), class_names={"tumour": "T", "normal": "N"})
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, default_root_dir=tmp_path, enable_progress_bar=False
    )
    trainer.fit(model, datamodule=data)
    trainer.validate(model, datamodule=data)  # set up again: the names as configured, not as resolved, are resolved
    assert model.class_labels == ["N", "T"]


def test_a_fit_that_fails_before_logging_leaves_no_version_folder(tmp_path, monkeypatch):
    from icmil_pl.cli import main

    rows = []
    for i in range(12):
        _h5(tmp_path / "feats", f"s{i}", np.full((4, 8), i % 2, np.float32))
        rows.append((f"s{i}", ["normal", "tumour"][i % 2], f"p{i}"))
    labels = write_labels(tmp_path / "labels.csv", rows)
    conf = Path(__file__).parent / "conf" / "abmil.yaml"
    with pytest.raises(ValueError, match="class_names"):
        main(
            [
                "fit",
                "-c",
                str(conf),
                f"--data.init_args.labels={labels}",
                f"--data.init_args.features={tmp_path / 'feats'}",
                "--model.init_args.aggregator.init_args.in_dim=8",
                "--model.init_args.class_names=[tumour,normal]",
                f"--trainer.default_root_dir={tmp_path / 'out'}",
                f"--trainer.logger.init_args.save_dir={tmp_path / 'out'}",
            ]
        )
    assert not list((tmp_path / "out").rglob("version_*"))


def test_a_full_disk_during_extraction_names_the_cache_folder(tmp_path, monkeypatch):
    import errno

    import zarr

    cache = FeatureCache(tmp_path / "cache")
    writer = cache.writer("s1", 4, 3, "float32", {})

    def full(self, key, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zarr.Array, "__setitem__", full)
    with pytest.raises(
        OSError, match=rf"could not write features into {tmp_path / 'cache'} \(No space left on device\)"
    ):
        writer.append(np.ones((4, 3), np.float32), np.zeros((4, 2), np.int32))
    assert not writer.tmp.exists() and not cache.has("s1")


@pytest.mark.parametrize("keep_gb, reads_per_bag", [(4.0, 1), (0.0, 3)])
def test_bags_are_read_from_their_files_once_and_kept_within_the_budget(tmp_path, monkeypatch, keep_gb, reads_per_bag):
    """Reading and checking a bag's files costs about a training step on it: kept after the first read, unless the
    budget says otherwise (0: every epoch reads the files)."""
    rows = []
    for i in range(12):
        _h5(tmp_path / "feats", f"s{i}", np.full((4, 8), i, np.float32))
        rows.append((f"s{i}", ["normal", "tumour"][i % 2], f"p{i}"))
    labels = write_labels(tmp_path / "labels.csv", rows)
    splits = SplitConfig(folds=3, fold=0, val_fraction=0.34, seed=0)
    data = FeatureBagDataModule(str(labels), str(tmp_path / "feats"), splits=splits, keep_in_memory_gb=keep_gb)
    data.setup("fit")
    reads = []
    original = FeatureCache.read
    monkeypatch.setattr(FeatureCache, "read", lambda self, slide_id: reads.append(slide_id) or original(self, slide_id))
    dataset = data.bag_dataset(data.rows)
    for _ in range(3):  # three epochs
        items = [dataset[i] for i in range(len(dataset))]
    assert len(reads) == reads_per_bag * len(dataset)
    assert [float(item["features"][0, 0]) for item in items] == list(range(12))
    with pytest.raises(ValueError, match=r"keep_in_memory_gb: expected a number of GB >= 0, got -1"):
        FeatureBagDataModule(str(labels), str(tmp_path / "feats"), keep_in_memory_gb=-1)
