"""Tasks beyond one class per slide: targets read from the CSV (and their errors), the losses against their formulas,
the metrics against scikit-survival and numpy, every task trained from feature bags with its outputs and figures,
and survival through ICMIL's BagGradient coupling."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from scipy.stats import spearmanr
from sksurv.metrics import concordance_index_censored

from data_modules.cohort import read_labels
from data_modules.cohort.splits import SplitConfig, make_splits
from data_modules.cohort.targets import Targets, quantile_strata
from data_modules.datasets.feature_bags import FeatureBagDataModule
from data_modules.slides.tiling import SlidePatches, TissueParams, patch_grid
from data_modules.synthetic import CohortSpec, make_cohort, slide_infos, survival_times, tumour_burden
from helpers import assert_same_chunked_gradients, write_labels
from icmil_pl.aggregators import ABMIL, MeanPool, MILOutput
from icmil_pl.bag_classifier import BagClassifier
from icmil_pl.coupling import BagGradient, Distillation
from icmil_pl.encoders import PatchEmbedder
from icmil_pl.results import read_results, record_fit
from icmil_pl.tasks import (
    Classification,
    ConcordanceIndex,
    MultiLabel,
    Regression,
    Survival,
    cox_loss,
    regression_metrics,
)
from icmil_pl.tasks.ordinal import Ordinal

SURVIVAL_HEADER = ("slide_id", "patient_id", "time", "event")


# -- reading targets ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("header", "row", "targets", "message"),
    [
        (("slide_id", "time"), ("a", "3"), Targets("survival"), r"l\.csv: missing column 'event', which survival"),
        (SURVIVAL_HEADER, ("a", "p", "-1", "1"), Targets("survival"), r"l\.csv:3: column 'time' is -1, a negative"),
        (SURVIVAL_HEADER, ("a", "p", "2", "yes"), Targets("survival"), r"l\.csv:3: column 'event' is 'yes', not a"),
        (SURVIVAL_HEADER, ("a", "p", "2", "2"), Targets("survival"), r"l\.csv:3: column 'event' is '2'; events"),
        (SURVIVAL_HEADER, ("a", "p", "", "1"), Targets("survival"), r"l\.csv:3: column 'time' is empty while event"),
        (("slide_id", "target"), ("a", "big"), Targets("regression"), r"l\.csv:3: column 'target' is 'big', not a n"),
        (("slide_id", "target"), ("a", "nan"), Targets("regression"), r"l\.csv:3: column 'target' is 'nan', not a n"),
        (("slide_id", "label"), ("a", "x;z"), Targets("multilabel", labels=["x", "y"]), r"l\.csv:3: column 'label' n"),
        (("slide_id", "x", "y"), ("a", "1", "3"), Targets("multilabel", ["x", "y"]), r"l\.csv:3: column 'y' is '3'"),
    ],
)
def test_bad_targets_name_the_file_row_and_column(tmp_path, header, row, targets, message):
    good = {"time": "1", "event": "0", "target": "0.5", "label": "x", "x": "0", "y": "1", "patient_id": "p"}
    first = tuple(good.get(column, "ok") for column in header)
    path = write_labels(tmp_path / "l.csv", [first, row], header)
    with pytest.raises(ValueError, match=f"^{tmp_path}/{message}") as error:
        read_labels(path, targets)
    assert "\n" not in str(error.value)


def test_targets_are_read_encoded_and_stratified(tmp_path):
    rows = [("a", "x;y"), ("b", "none"), ("c", "y"), ("d", "")]
    path = write_labels(tmp_path / "m.csv", rows, ("slide_id", "label"))
    targets = Targets("multilabel")
    labels = read_labels(path, targets)
    names = targets.names(labels, path)
    assert names == ["x", "y"]
    assert [targets.encode(r, names).tolist() for r in labels[:3]] == [[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]
    assert targets.encode(labels[3], names) is None and not labels[3].labelled
    assert [r.stratum for r in labels] == ["x;y", "", "y", None]
    path = write_labels(tmp_path / "s.csv", [("a", "p", "3.5", "1"), ("b", "p", "7", "0")], SURVIVAL_HEADER)
    survival = read_labels(path, Targets("survival"))
    assert [r.target for r in survival] == [(3.5, 1.0), (7.0, 0.0)] and [r.stratum for r in survival] == [
        "event",
        "censored",
    ]
    with pytest.raises(ValueError, match="unknown column 'time'"):  # a classification CSV keeps refusing strays
        read_labels(path)


def test_a_survival_split_without_events_is_refused(tmp_path):
    rows = [(f"s{i}", f"p{i}", str(i + 1), "1" if i < 2 else "0", "test" if i >= 4 else "train") for i in range(6)]
    path = write_labels(tmp_path / "l.csv", rows, (*SURVIVAL_HEADER, "split"))
    targets = Targets("survival")
    with pytest.raises(ValueError, match=r"^.*l\.csv: the test split has no slide of kind of outcome 'event'"):
        make_splits(read_labels(path, targets), SplitConfig(val_fraction=0), path, targets)


# -- losses ------------------------------------------------------------------------------------------------------------
def test_discrete_time_nll_is_the_likelihood_of_the_bin():
    task = Survival(bins=3)
    task.fit_targets(torch.tensor([[1.0, 1], [2, 1], [3, 1], [4, 1], [5, 1], [6, 1], [9, 0]]))
    cuts = task.cuts.tolist()
    assert cuts == pytest.approx([3.0, 5.0]) or cuts == pytest.approx(np.quantile([1, 2, 3, 4, 5, 6], [1 / 3, 2 / 3]))
    logits = torch.tensor([0.3, -0.5, 1.2])
    h = torch.sigmoid(logits)
    bin_of = int(np.searchsorted(cuts, 4.5, side="right"))
    event = -math.log(float(torch.prod(1 - h[:bin_of]) * h[bin_of]))
    censored = -math.log(float(torch.prod(1 - h[: bin_of + 1])))
    assert float(task.bag_loss(logits, torch.tensor([4.5, 1.0]))) == pytest.approx(event, rel=1e-5)
    assert float(task.bag_loss(logits, torch.tensor([4.5, 0.0]))) == pytest.approx(censored, rel=1e-5)
    low, high = task.outputs(torch.tensor([-3.0, -3, -3])), task.outputs(torch.tensor([3.0, 3, 3]))
    assert float(high) > float(low)  # higher hazards, higher risk


def test_cox_loss_equals_the_partial_likelihood_with_breslow_ties():
    risk = torch.tensor([0.2, -1.0, 0.7, 0.1, 1.5])
    time = torch.tensor([5.0, 3.0, 3.0, 8.0, 1.0])
    event = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0])
    terms = [
        float(risk[i]) - math.log(sum(math.exp(float(risk[j])) for j in range(5) if time[j] >= time[i]))
        for i in range(5)
        if event[i]
    ]
    assert float(cox_loss(risk, time, event)) == pytest.approx(-sum(terms) / len(terms), rel=1e-6)
    assert float(cox_loss(risk, time, torch.zeros(5))) == 0.0


def test_regression_loss_on_the_standardised_target_and_outputs_in_its_units():
    task = Regression()
    task.fit_targets(torch.tensor([[1.0], [3.0], [5.0]]))
    assert float(task.target_mean) == 3.0 and float(task.target_std) == 2.0
    assert float(task.bag_loss(torch.tensor([0.5]), torch.tensor([5.0]))) == pytest.approx(0.25)
    assert float(task.outputs(torch.tensor([0.5]))) == 4.0


def test_c_index_matches_scikit_survival_and_regression_metrics_match_numpy():
    rng = np.random.default_rng(0)
    time, event, risk = rng.exponential(5, 40), rng.random(40) < 0.7, rng.normal(size=40)
    metric = ConcordanceIndex()
    for k in range(0, 40, 7):  # accumulated over steps, as over a validation epoch
        metric.update(torch.tensor(risk[k : k + 7]), torch.tensor(np.stack([time, event], 1)[k : k + 7]))
    assert float(metric.compute()) == pytest.approx(concordance_index_censored(event, time, risk)[0], abs=1e-6)
    none = ConcordanceIndex()
    none.update(torch.tensor([0.1, 0.2]), torch.tensor([[1.0, 0], [2.0, 0]]))
    assert math.isnan(float(none.compute()))
    true, predicted = rng.normal(size=30), rng.normal(size=30)
    values = regression_metrics()(torch.tensor(predicted), torch.tensor(true))
    assert float(values["mae"]) == pytest.approx(np.abs(true - predicted).mean(), rel=1e-5)
    assert float(values["pearson"]) == pytest.approx(np.corrcoef(true, predicted)[0, 1], abs=1e-5)
    r2 = 1 - ((true - predicted) ** 2).sum() / ((true - true.mean()) ** 2).sum()
    assert float(values["r2"]) == pytest.approx(r2, rel=1e-5)


# -- every task from feature bags --------------------------------------------------------------------------------------
def _bags(tmp_path, n: int = 24) -> tuple[list[dict], Path]:
    """n slides of 8-d features whose dimension 0, in a few instances, carries a burden b in [0, 1]."""
    import h5py

    rng = np.random.default_rng(0)
    folder = tmp_path / "feats"
    folder.mkdir()
    rows = []
    for i in range(n):
        burden = (i % 6) / 5
        features = rng.normal(size=(10, 8)).astype(np.float32)
        features[:4, 0] += 8 * burden
        with h5py.File(folder / f"s{i}.h5", "w") as fh:
            fh["features"] = features
            fh["coords"] = np.stack([np.arange(10) * 32, np.zeros(10)], 1).astype(np.int64)
        time = float(rng.exponential(1 / (0.1 * math.exp(3 * burden))))
        rows.append(
            {
                "slide_id": f"s{i}",
                "patient_id": f"p{i}",
                "burden": f"{burden:.3f}",
                "a": int(burden > 0.3),
                "b": int(burden > 0.7),
                "time": f"{min(time, 30):.2f}",
                "event": int(time < 30),
            }
        )
    return rows, folder


def _csv(path, rows, columns):
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


CASES = {
    "multilabel": (Targets("multilabel", ["a", "b"]), MultiLabel(), 2, "auroc", "test_roc.png", ["prob_a", "prob_b"]),
    "regression": (Targets("regression", ["burden"]), Regression(), 1, "mae", "test_scatter.png", ["predicted_burden"]),
    "survival": (Targets("survival"), Survival(bins=3), 3, "c_index", "test_km.png", ["risk"]),
    "cox": (Targets("survival"), Survival(loss="cox"), 1, "c_index", "test_km.png", ["risk"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_task_trains_from_feature_bags(tmp_path, case):
    targets, task, outputs, monitor, figure, columns = CASES[case]
    rows, folder = _bags(tmp_path)
    labels = _csv(tmp_path / "labels.csv", rows, ["slide_id", "patient_id", *targets.target_columns])
    data = FeatureBagDataModule(
        str(labels), str(folder), splits=SplitConfig(folds=3, val_fraction=0.25), targets=targets
    )
    torch.manual_seed(0)
    steps = 4 if case == "cox" else 1  # Cox compares the bags of a step
    model = BagClassifier(ABMIL(8, num_classes=outputs, hidden_dim=16), lr=5e-3, task=task, bags_per_step=steps)
    trainer = pl.Trainer(
        max_epochs=15, accelerator="cpu", logger=False, default_root_dir=tmp_path, enable_progress_bar=False
    )
    trainer.fit(model, datamodule=data)
    selected = {"survival": "loss", "cox": "c_index"}.get(case, monitor)  # the NLL selects; Cox has none per bag
    assert trainer.checkpoint_callback.monitor == f"val/{selected}"
    folder_out = record_fit(trainer, model, data, 1.0)
    results = read_results(folder_out)["iterations"][0]
    assert set(task.metric_names) <= set(results["test"]) and "loss" not in results["test"]
    if case == "multilabel":
        assert {"auroc_a", "auroc_b"} <= set(results["test"])
    with (folder_out / "predictions.csv").open() as fh:
        written = list(csv.DictReader(fh))
    assert list(written[0]) == ["slide_id", "label", "predicted", *columns] and len(written) == len(data.splits["test"])
    assert (folder_out / "figures" / figure).is_file()
    value = results["test"][monitor]
    if monitor == "c_index":  # 8 test slides' exponential times are noise: the risk must rank the burden instead
        burden = {r["slide_id"]: float(r["burden"]) for r in rows}
        risk = [(burden[r["slide_id"]], float(r["risk"])) for r in written]
        assert spearmanr(*zip(*risk, strict=True))[0] > 0.6 and 0 <= value <= 1
    else:  # the burden is plain in the features
        assert (value < 0.2) if monitor == "mae" else (value > 0.75)


def test_a_task_that_does_not_match_the_data_is_named(tmp_path):
    rows, folder = _bags(tmp_path, 12)
    labels = _csv(tmp_path / "labels.csv", rows, ["slide_id", "patient_id", "time", "event"])
    data = FeatureBagDataModule(
        str(labels), str(folder), splits=SplitConfig(folds=3, val_fraction=0), targets=Targets("survival")
    )
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, default_root_dir=tmp_path, enable_progress_bar=False
    )
    with pytest.raises(ValueError, match="^model task 'classification', but the data's targets are 'survival'"):
        trainer.fit(BagClassifier(MeanPool(8, num_classes=2)), datamodule=data)
    with pytest.raises(
        ValueError, match=r"^model aggregator num_classes=2, but a survival task on \['time', 'event'\]"
    ):
        trainer.fit(BagClassifier(MeanPool(8, num_classes=2), task=Survival(bins=4)), datamodule=data)
    with pytest.raises(ValueError, match="^bags_per_step: expected an int >= 2 .a Cox loss"):
        BagClassifier(MeanPool(8, num_classes=1), task=Survival(loss="cox"))
    with pytest.raises(ValueError, match="^select_by: expected 'c_index' .a Cox loss has no validation loss"):
        Survival(loss="cox", select_by="loss")
    assert Survival(select_by="c_index").selects_by == ("c_index", "max") and Survival().selects_by == ("loss", "min")


def test_dtfd_auxiliary_rows_take_the_task_loss():
    out = MILOutput(
        logits=torch.tensor([0.2, 0.1, -0.3]), attention=None, aux_logits=torch.tensor([[0.0, 0, 0], [1, 1, 1]])
    )
    task, target = Survival(bins=3), torch.tensor([2.0, 1.0])
    expected = (
        task.bag_loss(out.logits, target)
        + 0.5 * (task.bag_loss(out.aux_logits[0], target) + task.bag_loss(out.aux_logits[1], target)) / 2
    )
    assert float(task.loss(out, target, 0.5)) == pytest.approx(float(expected))
    assert isinstance(Classification().loss(out, torch.tensor(1), 1.0), torch.Tensor)


# -- synthetic targets and ICMIL ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), CohortSpec(n_slides=6, seed=0, size=(512, 512)))


def test_synthetic_targets_follow_the_tumour(small_cohort):
    with (small_cohort / "targets.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    infos = slide_infos(small_cohort)
    for row in rows:
        burden = tumour_burden(infos[row["slide_id"]])
        assert float(row["tumour_fraction"]) == pytest.approx(burden, abs=1e-4)
        assert (burden > 0) == (row["label"] == "1") == (row["tumour"] == "1")
        assert row["extensive"] == "0" or row["tumour"] == "1"
        assert float(row["time"]) >= 0 and row["event"] in ("0", "1")
    outcome = {}  # one survival outcome per patient, on each of its slides
    for row in rows:
        assert outcome.setdefault(row["patient_id"], (row["time"], row["event"])) == (row["time"], row["event"])
    assert len(outcome) < len(rows)  # the cohort has patients with several slides
    others = ["label", "tumour_fraction", "tumour", "extensive", "time", "event"]
    for task in (
        Targets("survival"),
        Targets("regression", ["tumour_fraction"]),
        Targets("multilabel", ["tumour", "extensive"]),
    ):
        assert len(read_labels(small_cohort / "targets.csv", Targets(task.task, task.columns, ignore=others))) == 6
    with pytest.raises(ValueError, match="unknown column 'tumour_fraction'"):
        read_labels(small_cohort / "targets.csv", Targets("survival"))


def test_a_stale_targets_table_is_redrawn_and_a_current_one_left_alone(tmp_path):
    spec = CohortSpec(n_slides=4, seed=1, size=(256, 256))
    targets = make_cohort(tmp_path, spec) / "targets.csv"
    current, stamp = targets.read_text(), targets.stat().st_mtime_ns
    make_cohort(tmp_path, spec)
    assert targets.stat().st_mtime_ns == stamp
    targets.write_text(current.replace(",1\n", ",0\n"))  # as an older survival law would have left it
    make_cohort(tmp_path, spec)
    assert targets.read_text() == current


def test_hazard_rises_with_burden_in_a_large_synthetic_cohort(tmp_path):
    """The law `write_targets` documents, on 400 draws: the true burden ranks survival well above chance."""
    rng = np.random.default_rng(1)
    burden = np.where(rng.random(400) < 0.5, 0.0, rng.uniform(0.05, 0.35, 400))
    t, c = survival_times(burden, rng)
    assert 0.2 < (t > c).mean() < 0.6  # censored: most tumour-free patients outlive follow-up
    assert concordance_index_censored(t <= c, np.minimum(t, c), burden)[0] > 0.8
    assert np.median(t[burden == 0]) == pytest.approx(52, rel=0.15)  # a tumour-free patient's median survival


def _slides(root) -> tuple[list[SlidePatches], dict[str, torch.Tensor]]:
    tissue = TissueParams(mask_mpp=2.0, min_object_um2=0)
    rows = read_labels(root / "targets.csv", Targets("survival", ignore=["tumour_fraction", "tumour", "extensive"]))
    slides = [
        SlidePatches(r.slide_id, p, patch_grid(p, mpp=1.0, patch_size=32, tissue=tissue))
        for r in rows
        for p in [next((root / "slides").glob(f"{r.slide_id}.*"))]
    ]
    return slides, {r.slide_id: torch.tensor(r.target) for r in rows}


def test_bag_gradient_couples_a_survival_head_and_distillation_refuses_it(small_cohort, tmp_path):
    slides, labels = _slides(small_cohort)
    torch.manual_seed(0)
    embedder = PatchEmbedder("resnet18", truncate_after="layer1")
    task = Survival(bins=2)
    task.fit_targets(torch.stack(list(labels.values())))
    bag = BagClassifier(ABMIL(64, num_classes=2, hidden_dim=16, attention_dim=8), task=task)
    before = embedder.weights_hash()
    kwargs = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    strategy = BagGradient(lr=1e-3, chunk_size=16, max_instances=12, read_threads=1, max_epochs=1)
    tuned = strategy.fit(embedder, bag, slides, labels=labels, root=tmp_path, seed=0, trainer_kwargs=kwargs)
    assert tuned.weights_hash() != before and embedder.weights_hash() == before
    with pytest.raises(
        ValueError, match="^coupling: Distillation cannot couple a survival bag classifier: its teacher"
    ):
        Distillation().fit(embedder, bag, slides, labels=labels, root=tmp_path / "d", seed=0, trainer_kwargs=kwargs)


def test_chunked_gradient_of_a_survival_bag_equals_the_full_bag():
    torch.manual_seed(0)
    embedder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 6))
    head, task = ABMIL(6, num_classes=3, hidden_dim=8, attention_dim=4), Survival(bins=3)
    patches, target = torch.randn(13, 3, 4, 4), torch.tensor([2.0, 1.0])

    def loss(h):
        return task.loss(head(h), target, 1.0)

    assert_same_chunked_gradients(embedder, head, loss, [(patches, 13), (patches, 4)])


def test_task_strata_agree_with_the_data_side():
    """A coupling's hold-out stratifies bags as the cohort's splits stratify slides: regression by quartile (with two
    bags a quartile at least, else one stratum), survival by the event, classification by the class."""
    values = [float(v) for v in range(12)]
    assert Regression().strata([torch.tensor([v]) for v in values]) == quantile_strata(values)
    assert set(quantile_strata(values)) == {"q1", "q2", "q3", "q4"}
    assert set(Regression().strata([torch.tensor([v]) for v in values[:5]])) == {"all"}
    assert Survival().strata([torch.tensor([3.0, 1.0]), torch.tensor([2.0, 0.0])]) == ["1", "0"]
    assert Classification().strata([torch.tensor(1), torch.tensor(0)]) == ["1", "0"]


def test_corn_grade_probabilities_and_conditional_losses():
    """Ordinal: K - 1 logits give K grade probabilities summing to 1, P(grade > k) never rises with k, the call counts
    the thresholds passed, and a bag of grade g is trained on thresholds 0 .. g only."""
    task, logits = Ordinal(), torch.tensor([2.0, 1.0, -3.0])
    probs = task.outputs(logits)
    assert probs.shape == (4,) and float(probs.sum()) == pytest.approx(1.0) and (probs >= 0).all()
    assert torch.all(task.exceeds(logits).diff() <= 0) and int(task.call(probs)) == 2
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    assert float(task.bag_loss(logits, torch.tensor(1))) == pytest.approx(
        float(bce(logits[:2], torch.tensor([1.0, 0])))
    )
    assert float(task.bag_loss(logits, torch.tensor(3))) == pytest.approx(float(bce(logits, torch.ones(3))))
    assert task.head_size(4) == 3


def test_the_ordinal_task_trains_from_feature_bags(tmp_path):
    """Grades 0-3 from the burden plain in the features: kappa selects, predictions.csv names grades."""
    rows, folder = _bags(tmp_path)
    for row in rows:
        row["label"] = min(3, math.ceil(float(row["burden"]) * 3 - 1e-9))  # 0, then 1-3 by thirds of the burden
    labels = _csv(tmp_path / "labels.csv", rows, ["slide_id", "patient_id", "label"])
    data = FeatureBagDataModule(
        str(labels), str(folder), splits=SplitConfig(folds=3, val_fraction=0.25), targets=Targets("ordinal")
    )
    torch.manual_seed(0)
    model = BagClassifier(ABMIL(8, num_classes=3, hidden_dim=16), lr=5e-3, task=Ordinal())
    trainer = pl.Trainer(
        max_epochs=15, accelerator="cpu", logger=False, default_root_dir=tmp_path, enable_progress_bar=False
    )
    trainer.fit(model, datamodule=data)
    assert trainer.checkpoint_callback.monitor == "val/qwk"
    results = read_results(record_fit(trainer, model, data, 1.0))["iterations"][0]
    assert set(results["test"]) == {"qwk", "accuracy", "mae"} and results["test"]["qwk"] > 0.7
    with (tmp_path / "predictions.csv").open() as fh:
        written = list(csv.DictReader(fh))
    assert list(written[0]) == ["slide_id", "label", "predicted", "prob_0", "prob_1", "prob_2", "prob_3"]
    assert (tmp_path / "figures" / "test_confusion.png").is_file()
