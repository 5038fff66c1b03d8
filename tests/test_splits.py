"""Every split rule: patient-grouped stratified k-fold, the CSV's `split` column, the coupling hold-out, splits.json."""

from __future__ import annotations

import json

import pytest

from data_modules.cohort import read_labels
from data_modules.cohort.splits import SPLITS_FILE, SplitConfig, hold_out, make_splits, save_splits
from data_modules.cohort.targets import Targets
from helpers import write_labels


def _cohort_rows(tmp_path, n=40):
    rows = [(f"s{i}", "tumour" if i % 3 == 0 else "normal", f"p{i // 2}") for i in range(n)]  # 2 slides per patient
    return read_labels(write_labels(tmp_path / "l.csv", rows))


def test_splits_are_grouped_stratified_and_cover_each_fold_once(tmp_path):
    rows = _cohort_rows(tmp_path)
    patient = {r.slide_id: r.patient_id for r in rows}
    label = {r.slide_id: r.label for r in rows}
    tests = []
    for fold in range(5):
        splits = make_splits(rows, SplitConfig(folds=5, fold=fold, val_fraction=0.2, seed=3))
        groups = [{patient[s] for s in splits[name]} for name in ("train", "val", "test")]
        assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
        assert sorted(sum(splits.values(), [])) == sorted(r.slide_id for r in rows)
        assert {label[s] for s in splits["test"]} == {"tumour", "normal"}
        assert len(splits["test"]) == 8 and 4 <= len(splits["val"]) <= 8  # 1/5 of 40; 1/5 of the rest, by patient
        tests += splits["test"]
    assert sorted(tests) == sorted(r.slide_id for r in rows)  # every slide is tested exactly once over the folds
    seeded = make_splits(rows, SplitConfig(seed=3))
    assert seeded == make_splits(rows, SplitConfig(seed=3)) != make_splits(rows, SplitConfig(seed=4))


def test_split_column_is_respected(tmp_path):
    header = ("slide_id", "label", "patient_id", "split")
    rows = [("a", "0", "pa", "train"), ("b", "1", "pb", "train"), ("c", "1", "pc", "val"), ("d", "0", "pd", "val")]
    rows += [("e", "1", "pe", "test"), ("f", "0", "pf", "test")]
    labels = read_labels(write_labels(tmp_path / "l.csv", rows, header))
    assert make_splits(labels) == {"train": ["a", "b"], "val": ["c", "d"], "test": ["e", "f"]}
    bad = [("a", "0", "pa", "holdout")]
    with pytest.raises(ValueError, match=r"l2\.csv:2: split 'holdout' is not one of"):
        read_labels(write_labels(tmp_path / "l2.csv", bad, header))


@pytest.mark.parametrize(
    "splits, message",
    [
        (
            "train train val val test test",
            r"the val split has no slide of class '0' \(the `split` column gives it only '1'\)",
        ),
        ("train train val train val train", r"no test slides in the `split` column"),
        ("train train train train train train", r"no test slides in the `split` column"),
    ],
)
def test_a_given_split_without_every_class_is_refused(tmp_path, splits, message):
    """A one-class validation split records AUROC 0 and selects checkpoints on that constant: refused, file named."""
    labels = ["0", "1", "1", "1", "0", "1"]
    rows = [
        (f"s{i}", label, f"p{i}", split) for i, (label, split) in enumerate(zip(labels, splits.split(), strict=True))
    ]
    path = write_labels(tmp_path / "l.csv", rows, ("slide_id", "label", "patient_id", "split"))
    with pytest.raises(ValueError, match=rf"^{path}: {message}"):
        make_splits(read_labels(path), path=path)


@pytest.mark.parametrize("second", ["train", ""], ids=["every split given", "only test marked"])
def test_a_patient_in_two_given_splits_is_refused(tmp_path, second):
    """Slides of one patient share tissue: a `split` column that puts them apart leaks the test set."""
    header = ("slide_id", "label", "patient_id", "split")
    rows = [(f"s{i}", str(i % 2), f"p{i}", ("train", "train", "val", "val", "test", "test")[i]) for i in range(6)]
    rows += [("s6", "0", "p4", second), ("s7", "1", "p7", second)]
    if not second:  # only the test slides marked: the rest are carved into train and val
        rows = [(*r[:3], "test" if r[3] == "test" else "") for r in rows] + [
            (f"t{i}", str(i % 2), f"q{i}", "") for i in range(8)
        ]
    path = write_labels(tmp_path / "l.csv", rows, header)
    with pytest.raises(ValueError, match=rf"^{path}: patient 'p4' has slides in (train|val) and test \(the `split`"):
        make_splits(read_labels(path), SplitConfig(val_fraction=0.25), path=path)


@pytest.mark.parametrize(
    "val, message",
    [
        (
            ("a;b", "a"),
            r"the val split has no slide of label value 'a' = 0 \(the `split` column gives it only 'a' = 1\)",
        ),
        (
            ("a", "none"),
            r"the val split has no slide of label value 'b' = 1 \(the `split` column gives it only 'b' = 0\)",
        ),
    ],
    ids=["no negative", "no positive"],
)
def test_a_given_multilabel_split_without_both_values_of_a_label_is_refused(tmp_path, val, message):
    """A validation split without a positive for one label recorded that label's AUROC as 0.0 and halved the macro
    AUROC the checkpoint was selected on: every label needs a slide with it and one without in every split."""
    cells = [("a;b", "train"), ("none", "train"), (val[0], "val"), (val[1], "val"), ("a", "test"), ("b", "test")]
    rows = [(f"s{i}", label, f"p{i}", split) for i, (label, split) in enumerate(cells)]
    path = write_labels(tmp_path / "l.csv", rows, ("slide_id", "label", "patient_id", "split"))
    targets = Targets("multilabel")
    with pytest.raises(ValueError, match=rf"^{path}: {message}: give it slides of every label value$"):
        make_splits(read_labels(path, targets), path=path, targets=targets)
    fine = [
        (f"s{i}", label, f"p{i}", split)
        for i, (label, split) in enumerate([*cells[:2], ("a", "val"), ("b", "val"), *cells[4:]])
    ]
    path = write_labels(tmp_path / "fine.csv", fine, ("slide_id", "label", "patient_id", "split"))
    assert make_splits(read_labels(path, targets), path=path, targets=targets)["val"] == ["s2", "s3"]


def test_computed_multilabel_splits_without_both_values_of_a_label_are_refused(tmp_path):
    """Label columns: `rare` is present in one slide, so one of the three splits cannot have it."""
    rows = [(f"s{i}", f"p{i}", str(i % 2), "1" if i == 0 else "0") for i in range(12)]
    path = write_labels(tmp_path / "l.csv", rows, ("slide_id", "patient_id", "common", "rare"))
    targets = Targets("multilabel", ["common", "rare"])
    pattern = r"the (train|val|test) split has no slide of label value 'rare' = 1 \(.* only 'rare' = 0\): use fewer"
    with pytest.raises(ValueError, match=pattern):
        make_splits(read_labels(path, targets), SplitConfig(folds=3, val_fraction=0.25), path, targets)


def test_computed_splits_without_every_class_are_refused(tmp_path):
    rows = read_labels(write_labels(tmp_path / "l.csv", [(f"s{i}", "1" if i < 2 else "0", f"p{i}") for i in range(8)]))
    with pytest.raises(ValueError, match=r"the (train|val|test) split has no slide of class '1' .*another seed"):
        make_splits(rows, SplitConfig(folds=2, val_fraction=0.5))


def test_a_fixed_test_split_gets_its_validation_carved_from_the_rest(tmp_path):
    rows = [(f"s{i}", str(i % 2), f"p{i}", "test" if i >= 16 else "") for i in range(20)]
    labels = read_labels(write_labels(tmp_path / "l.csv", rows, ("slide_id", "label", "patient_id", "split")))
    splits = make_splits(labels, SplitConfig(val_fraction=0.25))
    assert splits["test"] == ["s16", "s17", "s18", "s19"] and len(splits["val"]) == 4 and len(splits["train"]) == 12
    mixed = [(*rows[0][:3], "val"), *rows[1:]]
    with pytest.raises(ValueError, match="must be filled for every slide, or only mark the test slides"):
        make_splits(read_labels(write_labels(tmp_path / "m.csv", mixed, ("slide_id", "label", "patient_id", "split"))))


@pytest.mark.parametrize(
    "kwargs, field",
    [({"folds": 0}, "splits.folds"), ({"fold": 5}, "splits.fold"), ({"val_fraction": 1.0}, "splits.val_fraction")],
)
def test_a_bad_split_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        SplitConfig(**kwargs)


def test_too_few_patients_for_the_folds(tmp_path):
    rows = read_labels(
        write_labels(tmp_path / "l.csv", [(f"s{i}", str(i % 2), "p0" if i < 4 else "p1") for i in range(6)])
    )
    with pytest.raises(ValueError, match=r"the test folds \(splits.folds=3\) needs 3 folds, but there are 2 patients"):
        make_splits(rows, SplitConfig(folds=3))
    # abmil_features.yaml's 5 folds and val_fraction 0.1 on a small cohort: it is the validation carve-out that cannot
    # be cut, and the message says so and what to change
    rows = read_labels(write_labels(tmp_path / "m.csv", [(f"s{i}", str(i % 2), f"p{i}") for i in range(12)]))
    pattern = r"^the validation carve-out \(splits.val_fraction=0.1: 1 fold in 10 of the rest\) .*; use a larger val"
    with pytest.raises(ValueError, match=pattern):
        make_splits(rows, SplitConfig(folds=5, val_fraction=0.1))


def test_hold_out_is_stratified_seeded_and_keeps_the_order():
    ids = [f"s{i}" for i in range(10)]
    labels = {s: i % 2 for i, s in enumerate(ids)}
    train, val = hold_out(ids, labels, 0.1, seed=3)
    assert len(val) == 2 and sorted(labels[s] for s in val) == [0, 1]  # at least one per class
    assert set(train) | set(val) == set(ids) and not set(train) & set(val)
    assert train == [s for s in ids if s in train] and val == [s for s in ids if s in val]
    assert hold_out(ids, labels, 0.1, seed=3) == (train, val) != hold_out(ids, labels, 0.1, seed=4)
    assert len(hold_out(ids, labels, 0.4, seed=3)[1]) == 4  # proportional: 2 of each class
    assert hold_out(ids[:3], labels, 0.1, seed=3) == (ids[:3], [])  # < 4 slides: the training loss selects
    assert hold_out(ids[:5], {**labels, "s3": 0}, 0.1, seed=3) == (ids[:5], [])  # a class of one slide


def test_splits_json_is_saved(tmp_path):
    path = save_splits({"train": ["a"], "val": [], "test": ["b"]}, tmp_path / "run")
    assert path == tmp_path / "run" / SPLITS_FILE
    assert json.loads(path.read_text()) == {"train": ["a"], "val": [], "test": ["b"]}
