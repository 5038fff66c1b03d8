"""The feature cache, `.h5` features users bring, and the feature-bag data module: bags, statistics, splits,
errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from data_modules.feature_bags import FeatureBagDataModule
from data_modules.feature_cache import FeatureCache
from data_modules.splits import SplitConfig
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
    cache = FeatureCache.find(tmp_path)
    clam = cache.read("clam")
    assert clam.features.shape == (4, 6) and clam.features.dtype == np.float16  # half stays half
    assert clam.coords.tolist()[1] == [2, 3]
    batched = cache.read("batched")
    assert batched.features.shape == (4, 6) and batched.coords.shape == (4, 2)  # no coords: zeros
    with pytest.raises(ValueError, match="slide 'missing': no features in"):
        cache.read("missing")


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
    ],
)
def test_bad_cohorts_fail_before_anything_is_written(cohort, tmp_path, problem, message):
    labels, feats = cohort
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
    write_labels(labels, rows[1:], rows[0])
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        data = FeatureBagDataModule(str(labels), str(feats), classes=["0", "1"])
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
    pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, default_root_dir=tmp_path, enable_progress_bar=False).fit(
        model, datamodule=data
    )
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
