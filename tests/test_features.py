"""The feature cache, `.h5` features users bring, splits, and the feature-bag data module's errors."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
import torch

from data_modules.feature_cache import FeatureCache
from data_modules.features import FeatureBagDataModule, read_bag
from data_modules.splits import make_splits, read_labels


def _labels(path, rows, header=("slide_id", "label", "patient_id")):
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


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
    return _labels(tmp_path / "labels.csv", rows), tmp_path / "feats"


# -- zarr cache ---------------------------------------------------------------------------------------------------------
def test_cache_writes_atomically_and_reads_back(tmp_path):
    cache = FeatureCache(tmp_path, "abc")
    writer = cache.writer("s1", 5, 3, "float16", {"backbone": "x"})
    writer.append(np.ones((2, 3), np.float32), np.zeros((2, 2), np.int32))
    assert not cache.has("s1") and not writer.complete
    writer.append(np.full((3, 3), 2, np.float32), np.ones((3, 2), np.int32))
    writer.commit()
    bag = cache.read("s1")
    assert cache.has("s1") and len(bag) == 5 and bag.features.dtype == np.float16
    np.testing.assert_array_equal(bag.features[:], [[1] * 3] * 2 + [[2] * 3] * 3)
    assert bag.attrs["backbone"] == "x"
    assert [p.name for p in cache.path.iterdir()] == ["s1.zarr"]


def test_incomplete_or_nan_slides_leave_nothing(tmp_path):
    cache = FeatureCache(tmp_path, "abc")
    writer = cache.writer("s1", 5, 3, "float32", {})
    writer.append(np.ones((2, 3), np.float32), np.zeros((2, 2), np.int32))
    with pytest.raises(RuntimeError, match="wrote 2 of 5"):
        writer.commit()
    nan = cache.writer("s2", 2, 3, "float32", {})
    with pytest.raises(ValueError, match="s2: the embedder produced non-finite features"):
        nan.append(np.full((2, 3), np.nan, np.float32), np.zeros((2, 2), np.int32))
    assert not cache.has("s1") and not cache.has("s2") and list(cache.path.iterdir()) == []


def test_cache_of_another_embedder_is_refused(tmp_path):
    cache = FeatureCache(tmp_path, "abc")
    cache.write_manifest({"backbone": "resnet50", "weights_hash": "1"})
    cache.write_manifest({"backbone": "resnet50", "weights_hash": "1"})  # the same embedder again is fine
    with pytest.raises(ValueError, match="was written by .*resnet50.*not by .*resnet18"):
        cache.write_manifest({"backbone": "resnet18", "weights_hash": "2"})


# -- h5 features (CLAM / TRIDENT) -------------------------------------------------------------------------------------
def test_reads_clam_and_trident_h5(tmp_path):
    _h5(tmp_path, "clam", np.ones((4, 6), np.float16), np.arange(8).reshape(4, 2))
    _h5(tmp_path, "batched", np.ones((1, 4, 6), np.float32))  # some tools keep a leading batch axis
    features, coords = read_bag(tmp_path, "clam")
    assert features.shape == (4, 6) and features.dtype == np.float16 and coords.tolist()[1] == [2, 3]  # kept half
    assert read_bag(tmp_path, "batched")[0].shape == (4, 6)
    with pytest.raises(ValueError, match="slide 'missing': no features in"):
        read_bag(tmp_path, "missing")


def test_data_module_serves_bags_and_standardization_stats(cohort, tmp_path):
    labels, feats = cohort
    data = FeatureBagDataModule(str(labels), str(feats), folds=3, val_fraction=0.25)
    data.setup("fit")
    assert data.feature_dim == 8 and data.classes == ["0", "1"]
    bag = data.dataset("train")[0]
    assert bag["features"].dtype == torch.float32 and bag["features"].shape[1] == 8 and bag["label"].ndim == 0
    mean, std = data.feature_stats("train")
    train = np.concatenate([read_bag(feats, s)[0] for s in data.splits["train"]])
    np.testing.assert_allclose(mean, train.mean(0), atol=1e-5)
    np.testing.assert_allclose(std, train.std(0), atol=1e-5)
    batches = list(data.train_dataloader())
    assert len(batches) == len(data.splits["train"]) and batches[0]["features"].ndim == 2


@pytest.mark.parametrize(
    "problem, message",
    [
        ("missing", r"labels\.csv: slide 'ghost': no features in .*feats"),
        ("duplicate", r"labels\.csv: duplicate slide_id 's1'"),
        ("label", r"labels\.csv: slide 's1' has label '7', not one of classes \['0', '1'\]"),
        ("empty", r"slide 's1' has an empty bag"),
        ("nan", r"slide 's1' has NaN or infinite features"),
        ("dims", r"different feature dimensions \[8, 9\]"),
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
    _labels(labels, rows[1:], rows[0])
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
        FeatureCache(root, key).write_manifest({"key": key})
    with pytest.raises(ValueError, match=r"holds 2 caches \(aaa, bbb\); name one"):
        FeatureBagDataModule(str(labels), str(root))


# -- splits --------------------------------------------------------------------------------------------------------------
def _cohort_rows(tmp_path, n=40):
    rows = [(f"s{i}", "tumour" if i % 3 == 0 else "normal", f"p{i // 2}") for i in range(n)]  # 2 slides per patient
    return read_labels(_labels(tmp_path / "l.csv", rows))


def test_splits_are_grouped_stratified_and_cover_each_fold_once(tmp_path):
    rows = _cohort_rows(tmp_path)
    patient = {r.slide_id: r.patient_id for r in rows}
    label = {r.slide_id: r.label for r in rows}
    tests = []
    for fold in range(5):
        splits = make_splits(rows, folds=5, fold=fold, val_fraction=0.2, seed=3)
        groups = [{patient[s] for s in splits[name]} for name in ("train", "val", "test")]
        assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
        assert sorted(sum(splits.values(), [])) == sorted(r.slide_id for r in rows)
        assert {label[s] for s in splits["test"]} == {"tumour", "normal"}
        tests += splits["test"]
    assert sorted(tests) == sorted(r.slide_id for r in rows)  # every slide is tested exactly once over the folds
    assert make_splits(rows, seed=3) == make_splits(rows, seed=3) != make_splits(rows, seed=4)


def test_split_column_is_respected(tmp_path):
    rows = [("a", "0", "pa", "train"), ("b", "1", "pb", "train"), ("c", "0", "pc", "val"), ("d", "1", "pd", "test")]
    labels = read_labels(_labels(tmp_path / "l.csv", rows, ("slide_id", "label", "patient_id", "split")))
    assert make_splits(labels) == {"train": ["a", "b"], "val": ["c"], "test": ["d"]}
    bad = [("a", "0", "pa", "holdout")]
    with pytest.raises(ValueError, match=r"l2\.csv:2: split 'holdout' is not one of"):
        read_labels(_labels(tmp_path / "l2.csv", bad, ("slide_id", "label", "patient_id", "split")))


def test_splits_json_is_saved(cohort, tmp_path):
    from data_modules.splits import save_splits

    path = save_splits({"train": ["a"], "val": [], "test": ["b"]}, tmp_path / "run")
    assert json.loads(path.read_text())["test"] == ["b"]
