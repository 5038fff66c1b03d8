"""A bag classifier's checkpoint records what it was trained on, and `test` / `predict` use that record: the class
encoding, the splits, the features' fingerprint. Each case used to end with exit 0 and a wrong result."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_modules.datasets.feature_cache import FeatureCache
from helpers import CONF, write_labels
from icmil_pl.cli import main
from icmil_pl.run_record import RECORD_KEY

RESNET18 = {"backbone": "resnet18", "truncate_after": "layer2", "output": "pooled", "input_size": 64}
GEOMETRY = {"mpp": 0.5, "patch_size_px": 64}


def _cache(root: Path, provenance: dict, n: int = 12) -> Path:
    """Our zarr cache of `n` slides whose first feature carries the label (slides s<i>, label i % 2)."""
    cache = FeatureCache(root)
    cache.write_manifest(provenance)
    rng = np.random.default_rng(0)
    for i in range(n):
        features = rng.normal(size=(6 + i, 8)).astype(np.float32)
        features[:, 0] += 3 * (i % 2)
        writer = cache.writer(f"s{i}", len(features), 8, "float32", provenance)
        writer.append(features, rng.integers(0, 1000, (len(features), 2)).astype(np.int32))
        writer.commit()
    return root


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(labels.csv with labels 1/0, the cache, the version folder of a two-stage fit on them)."""
    root = tmp_path_factory.mktemp("record")
    cache = _cache(root / "features" / "a", {**RESNET18, "weights_hash": "aaaa", **GEOMETRY})
    labels = write_labels(root / "labels.csv", [(f"s{i}", str(i % 2), f"p{i}") for i in range(12)])
    main(_args(root, labels, cache, "fit"))
    return labels, cache, root / "lightning_logs" / "version_0"


def _args(root: Path, labels: Path, cache: Path, subcommand: str, *extra: str) -> list[str]:
    return [
        subcommand,
        "-c",
        str(CONF / "abmil.yaml"),
        f"--data.init_args.labels={labels}",
        f"--data.init_args.features={cache}",
        "--model.init_args.aggregator.init_args.in_dim=8",
        "--trainer.max_epochs=3",
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}",
        *extra,
    ]


def _checkpoint(run: Path) -> Path:
    return run / json.loads((run / "results.json").read_text())["iterations"][0]["checkpoint"]


def _rows(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _latest(root: Path) -> Path:
    return max(root.glob("lightning_logs/version_*"), key=lambda p: int(p.name.split("_")[1]))


def test_the_checkpoint_records_classes_splits_and_features(fitted):
    labels, cache, run = fitted
    record = torch.load(_checkpoint(run), weights_only=False)[RECORD_KEY]
    assert record["task"] == "classification" and record["classes"] == ["0", "1"]
    assert record["splits"] == json.loads((run / "splits.json").read_text())
    assert record["features"] == {**RESNET18, "weights_hash": "aaaa", **GEOMETRY}


def test_labels_the_checkpoint_does_not_know_are_refused_by_row(fitted, tmp_path):
    """A CSV saying cancer/normal for the 1/0 the model learnt was re-encoded by its own sort order (cancer = 0):
    AUROC 0.333 for 0.667, and predict wrote cancer slides as label 0."""
    labels, cache, run = fitted
    renamed = write_labels(
        tmp_path / "renamed.csv", [(f"s{i}", ["normal", "cancer"][i % 2], f"p{i}") for i in range(12)]
    )
    for subcommand in ("test", "predict"):
        with pytest.raises(
            ValueError, match=r"renamed\.csv:2: slide 's0' has label 'normal', not one of the classes \['0', '1'\]"
        ):
            main(_args(tmp_path, renamed, cache, subcommand, f"--ckpt_path={_checkpoint(run)}"))


@pytest.mark.parametrize("cohort", ["one class", "unlabelled"])
def test_predict_scores_a_cohort_of_one_class_or_none_with_the_models_classes(fitted, tmp_path, cohort):
    """Refused before: 'num_classes=2, but a classification task on ['1'] needs 1 outputs'."""
    labels, cache, run = fitted
    rows = [(f"s{i}", "1") for i in range(1, 12, 2)] if cohort == "one class" else [(f"s{i}",) for i in range(6)]
    header = ("slide_id", "label") if cohort == "one class" else ("slide_id",)
    subset = write_labels(tmp_path / "subset.csv", rows, header)
    main(_args(tmp_path, subset, cache, "predict", f"--ckpt_path={_checkpoint(run)}"))
    written = _rows(_latest(tmp_path) / "predictions.csv")
    assert [r["slide_id"] for r in written] == [r[0] for r in rows]
    assert {r["label"] for r in written} == ({"1"} if cohort == "one class" else {""})
    assert {"prob_0", "prob_1"} <= set(written[0])


def test_test_scores_the_split_the_model_was_fitted_with(fitted, tmp_path, capsys):
    """After one row was removed, the k-fold was recomputed: 3 of 4 'test' slides had been training slides."""
    labels, cache, run = fitted
    splits = json.loads((run / "splits.json").read_text())
    kept = [r for r in _rows(labels) if r["slide_id"] != splits["train"][0]]
    edited = write_labels(tmp_path / "edited.csv", [list(r.values()) for r in kept], list(kept[0]))
    capsys.readouterr()
    main(_args(tmp_path, edited, cache, "test", f"--ckpt_path={_checkpoint(run)}"))
    assert sorted(r["slide_id"] for r in _rows(_latest(tmp_path) / "predictions.csv")) == sorted(splits["test"])

    new = write_labels(tmp_path / "new.csv", [*([list(r.values()) for r in _rows(labels)]), ["s12", "1", "p12"]])
    _cache(tmp_path / "more", {**RESNET18, "weights_hash": "aaaa", **GEOMETRY}, n=13)
    main(_args(tmp_path, new, tmp_path / "more", "test", f"--ckpt_path={_checkpoint(run)}"))
    assert "test: 1 slide(s) of" in capsys.readouterr().out  # never seen: predict scores it, test does not
    assert "s12" not in {r["slide_id"] for r in _rows(_latest(tmp_path) / "predictions.csv")}

    gone = [r for r in _rows(labels) if r["slide_id"] != splits["test"][0]]
    without = write_labels(tmp_path / "without.csv", [list(r.values()) for r in gone], list(gone[0]))
    missing = rf"without\.csv: the model's test split holds 1 slide\(s\) this CSV does not list \('{splits['test'][0]}'"
    with pytest.raises(ValueError, match=missing):
        main(_args(tmp_path, without, cache, "test", f"--ckpt_path={_checkpoint(run)}"))


def test_features_of_another_embedder_of_the_same_width_are_refused(fitted, tmp_path):
    """A checkpoint trained on resnet18-layer2 features ran on a resnet34-layer2 cache: every slide p = 1.000."""
    labels, cache, run = fitted
    other = _cache(tmp_path / "b", {**RESNET18, "backbone": "resnet34", "weights_hash": "bbbb", **GEOMETRY})
    with pytest.raises(
        ValueError,
        match=r"features of resnet34 \(cut after layer2, .*weights bbbb.*, but .* was trained on features of resnet18 ",
    ):
        main(_args(tmp_path, labels, other, "test", f"--ckpt_path={_checkpoint(run)}"))
    finer = _cache(tmp_path / "c", {**RESNET18, "weights_hash": "aaaa", **GEOMETRY, "mpp": 0.25})
    with pytest.raises(ValueError, match=r"0\.25 um/px.* was trained on .*0\.5 um/px"):
        main(_args(tmp_path, labels, finer, "predict", f"--ckpt_path={_checkpoint(run)}"))
