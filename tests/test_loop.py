"""The ICMIL loop from the command line: iterations complete, results.json, evaluation of a finished run, and a
killed run resumes to the same results; a rerun with settings that decide results is refused."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_modules.datasets.feature_cache import FeatureCache
from helpers import icmil_args, write_labels
from icmil_pl.cli import main
from icmil_pl.coupling.bag_gradient import BagGradientModule
from icmil_pl.coupling.distillation import DistillationModule
from icmil_pl.outputs.patch_scores import read_scores, scored_slides
from icmil_pl.patch_probes import linear_probe_auroc, probe_run
from icmil_pl.run_dir import RESUMABLE_SETTINGS, RunState, changed_settings
from icmil_pl.views.viewer import RunViewer

METRICS = {"auroc", "accuracy", "f1", "balanced_accuracy"}


def _run(cohort: Path, out: Path, subcommand: str = "fit", *extra: str) -> dict:
    main(icmil_args(cohort, out, subcommand, "--model.init_args.coupling.init_args.max_epochs=2", *extra))
    return json.loads((out / "run" / "results.json").read_text())


@pytest.fixture(scope="module")
def finished(icmil_cohort, tmp_path_factory) -> tuple[Path, dict]:
    """A finished two-iteration run (its output folder, its results.json)."""
    out = tmp_path_factory.mktemp("finished")
    return out, _run(icmil_cohort, out)


def _rows(path: Path) -> list[dict]:
    """A labels CSV's rows, `annotations` cells made absolute, so that a copy written elsewhere keeps its truth."""
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    return [r | {"annotations": str(path.parent / r["annotations"])} if r.get("annotations") else r for r in rows]


def test_two_iterations_write_every_output(finished):
    out, results = finished
    run = out / "run"
    assert [r["iteration"] for r in results["iterations"]] == [0, 1]
    assert results["model"] == "ICMIL" and results["coupling"] == "Distillation"
    for entry in results["iterations"]:
        for stage in ("val", "test"):
            assert set(entry[stage]) == METRICS and all(0.0 <= v <= 1.0 for v in entry[stage].values())
        assert (run / entry["checkpoint"]).is_file() and entry["checkpoint"].startswith(f"iter{entry['iteration']}/")
    assert set(results["iterations"][0]["seconds"]) == {"embed", "bag", "couple"}
    assert set(results["iterations"][1]["seconds"]) == {"embed", "bag"}
    assert (run / "iter1" / "embedder.pt").is_file() and (run / "config.yaml").is_file()
    splits = json.loads((run / "splits.json").read_text())
    assert sorted(sum(splits.values(), [])) == [f"slide_{i:03d}" for i in range(12)]
    assert len([p for p in (run / "features").iterdir() if p.is_dir()]) == 2  # E_0 and E_1 features never mix
    state = json.loads((run / "state.json").read_text())
    assert set(state["done"]) == {"iter0/embed", "iter0/bag", "iter0/couple", "iter1/embed", "iter1/bag"}
    assert state["done"]["iter1/bag"]["metrics"] == {k: results["iterations"][1][k] for k in ("val", "test")}
    logged = _rows(next((out / "logs").rglob("metrics.csv")))
    final = next(r for r in logged if r.get("final/test/auroc"))
    assert float(final["final/test/auroc"]) == pytest.approx(results["iterations"][-1]["test"]["auroc"])
    assert {"iter0/bag/val/auroc", "iter1/bag/test/auroc", "iter0/couple/train/loss"} <= set(logged[0])
    assert (run / "figures" / "auroc_by_iteration.png").is_file()
    report = (run / "report.html").read_text()  # written at the end of fit
    assert "Run report: run" in report and f"{results['iterations'][1]['test']['auroc']:.3f}" in report


BUSY = "import torch\na = torch.randn(512, 512)\nwhile True:\n    a = (a @ a).tanh()\n"


def test_a_rerun_beside_a_cpu_bound_process_gives_the_same_results_to_the_last_digit(icmil_cohort, finished, tmp_path):
    """Reproducibility on one machine: the thread scheduling a busy CPU changes must not reach a single metric."""
    busy = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        again = _run(icmil_cohort, tmp_path)
    finally:
        busy.kill()
        busy.wait()

    def metrics(results: dict) -> list:
        return [({k: v for k, v in it.items() if k not in ("seconds", "checkpoint")}) for it in results["iterations"]]

    assert metrics(again) == metrics(finished[1])
    assert [Path(it["checkpoint"]).name for it in again["iterations"]] == [
        Path(it["checkpoint"]).name for it in finished[1]["iterations"]
    ]


def test_test_and_predict_use_the_final_embedder_and_bag_classifier(icmil_cohort, finished):
    out, _ = finished
    run = out / "run"
    _run(icmil_cohort, out, "test")
    tested = _rows(run / "final" / "test" / "predictions.csv")
    assert sorted(r["slide_id"] for r in tested) == sorted(json.loads((run / "splits.json").read_text())["test"])
    assert (run / "final" / "test" / "figures" / "test_confusion.png").is_file()
    _run(icmil_cohort, out, "predict")
    predicted = _rows(run / "final" / "predict" / "predictions.csv")
    assert len(predicted) == 12 and {r["slide_id"]: r for r in predicted}[tested[0]["slide_id"]] == tested[0]
    assert len([p for p in (run / "features").iterdir() if p.is_dir()]) == 2  # nothing re-extracted
    figures = run / "final" / "predict" / "figures"
    assert (figures / f"{tested[0]['slide_id']}_heatmap.png").is_file()
    assert (figures / f"{tested[0]['slide_id']}_patches.png").is_file()
    # QuPath tiles for every slide; the synthetic cohort's tumour outlines recorded; the report lists the slides;
    # the viewer finds them all
    final = run / "final" / "predict"
    assert sorted(p.stem for p in (final / "qupath").glob("*.geojson")) == sorted(r["slide_id"] for r in predicted)
    labels = {r["slide_id"]: r["label"] for r in predicted}
    for name in scored_slides(final):
        scores = read_scores(final, name)
        assert (scores.truth is not None) == (labels[name] == "1") and scores.label == labels[name]
    report = (run / "report.html").read_text()
    assert report.count('href="http://localhost:8000/#slide=slide_') == 2 * len(predicted)  # id and thumbnail
    assert sorted(RunViewer(run).names) == sorted(labels)

    # new slides without labels: a CSV with the slide_id column only; classes are named from the checkpoint
    new = out / "new.csv"
    new.write_text("slide_id\n" + "".join(f"{r['slide_id']}\n" for r in tested[:2]))
    main(["predict", "-c", str(run / "config.yaml"), f"--data.init_args.labels={new}"])  # the run's saved config
    unlabelled = _rows(run / "final" / "predict-new" / "predictions.csv")  # beside the run's own predictions
    assert [r["slide_id"] for r in unlabelled] == [r["slide_id"] for r in tested[:2]]
    assert all(r["label"] == "" and r["predicted"] in ("0", "1") for r in unlabelled)
    assert unlabelled[0]["prob_1"] == tested[0]["prob_1"]
    assert _rows(run / "final" / "predict" / "predictions.csv") == predicted  # not overwritten
    # test scores the run's splits: on an edited cohort it is refused, naming the slide
    edited = out / "edited.csv"
    rows = _rows(icmil_cohort / "labels.csv")
    rows[0]["label"] = str(1 - int(rows[0]["label"]))
    write_labels(edited, [list(r.values()) for r in rows], list(rows[0]))
    with pytest.raises(ValueError, match=rf"edited\.csv: {rows[0]['slide_id']} changed since the run"):
        main(["test", "-c", str(run / "config.yaml"), f"--data.init_args.labels={edited}"])


def test_a_killed_couple_phase_resumes_to_the_same_results(icmil_cohort, finished, tmp_path, monkeypatch):
    """Killed in the second epoch of the couple phase of iteration 0: the rerun skips the finished phases, continues
    the couple phase from its last checkpoint (epoch 0 is not trained again) and ends with the same results."""
    original = DistillationModule.training_step
    epochs_trained = []

    def crash_in_epoch_1(self, batch, batch_idx):
        if self.current_epoch == 1:
            raise RuntimeError("killed during couple")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(DistillationModule, "training_step", crash_in_epoch_1)
    with pytest.raises(RuntimeError, match="killed during couple"):
        _run(icmil_cohort, tmp_path)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert set(state["done"]) == {"iter0/embed", "iter0/bag"}
    assert (tmp_path / "run" / "iter0" / "couple" / "checkpoints" / "last.ckpt").is_file()

    def record(self, batch, batch_idx):
        epochs_trained.append(self.current_epoch)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(DistillationModule, "training_step", record)
    resumed = _run(icmil_cohort, tmp_path)
    assert set(epochs_trained) == {1}  # iteration 1 has no couple phase; iteration 0 resumed at epoch 1
    for a, b in zip(finished[1]["iterations"], resumed["iterations"], strict=True):
        assert a["val"] == pytest.approx(b["val"]) and a["test"] == pytest.approx(b["test"])


BAG_GRADIENT = (
    '--model.init_args.coupling={"class_path": "BagGradient", "init_args": {"chunk_size": 16, "read_threads": 1, '
    '"max_epochs": 4, "lr": 1e-3}}'
)


def test_a_killed_bag_gradient_coupling_resumes_bit_identically(icmil_cohort, tmp_path, monkeypatch):
    """Killed in epoch 2 of 4: the resumed coupling used to shuffle its first epoch in epoch 0's order (Lightning
    makes a resumed run's train loader before it sets the sampler's epoch), so E_1 differed by 1e-3."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    main(icmil_args(icmil_cohort, whole, "fit", BAG_GRADIENT))
    original = BagGradientModule.training_step

    def crash_in_epoch_2(self, batch, batch_idx):
        if self.current_epoch == 2:
            raise RuntimeError("killed during couple")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(BagGradientModule, "training_step", crash_in_epoch_2)
    with pytest.raises(RuntimeError, match="killed during couple"):
        main(icmil_args(icmil_cohort, killed, "fit", BAG_GRADIENT))
    monkeypatch.setattr(BagGradientModule, "training_step", original)
    main(icmil_args(icmil_cohort, killed, "fit", BAG_GRADIENT))
    a, b = (torch.load(out / "run" / "iter1" / "embedder.pt", weights_only=True) for out in (whole, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    results = [json.loads((out / "run" / "results.json").read_text()) for out in (whole, killed)]
    assert [it["test"] for it in results[0]["iterations"]] == [it["test"] for it in results[1]["iterations"]]


def test_a_copied_run_is_a_whole_run_of_its_own_from_any_working_directory(finished, tmp_path, monkeypatch):
    """`cp -r runs/base runs/copy` then `test` on the copy used to restore the original's checkpoints (state.json
    held paths into it); from another working directory its config.yaml answered 'holds no finished ICMIL run'."""
    out, results = finished
    copy = tmp_path / "copy"
    shutil.copytree(out / "run", copy)
    original = out / "run" / "iter1" / "bag" / "checkpoints"
    aside = original.with_name("aside")
    original.rename(aside)  # the original's files are not the copy's: the copy must not need them
    try:
        monkeypatch.chdir(tmp_path)
        main(["test", "-c", str(copy / "config.yaml")])
        main(["fit", "-c", "copy/config.yaml"])  # continues the copy (nothing left to do), relative path and all
    finally:
        aside.rename(original)
    tested = _rows(copy / "final" / "test" / "predictions.csv")
    assert sorted(r["slide_id"] for r in tested) == sorted(json.loads((copy / "splits.json").read_text())["test"])
    text = {p.name: p.read_text() for p in copy.iterdir() if p.suffix in (".json", ".yaml")}
    assert not [name for name, t in text.items() if str(out / "run") in t and name != "config.yaml"]
    for manifest in (copy / "features").glob("*/manifest.json"):
        assert str(out) not in manifest.read_text()


def test_predict_cohorts_with_one_file_name_get_folders_of_their_own(icmil_cohort, finished, tmp_path):
    """`x/labels.csv` and `y/labels.csv` both wrote `final/predict-labels/`: the second overwrote the first."""
    out, _ = finished
    run = out / "run"
    rows = _rows(icmil_cohort / "labels.csv")
    written = {}
    for name, picked in (("x", rows[:3]), ("y", rows[3:5]), ("x", rows[:3])):
        (tmp_path / name).mkdir(exist_ok=True)
        labels = write_labels(tmp_path / name / "labels.csv", [list(r.values()) for r in picked], list(rows[0]))
        main(["predict", "-c", str(run / "config.yaml"), f"--data.init_args.labels={labels}"])
        written[name] = sorted(r["slide_id"] for r in picked)
    x, y = run / "final" / "predict-labels", run / "final" / "predict-labels-2"
    assert sorted(r["slide_id"] for r in _rows(x / "predictions.csv")) == written["x"]
    assert sorted(r["slide_id"] for r in _rows(y / "predictions.csv")) == written["y"]
    assert sorted(scored_slides(x)) == written["x"] and sorted(scored_slides(y)) == written["y"]
    assert (x / "cohort.txt").read_text().strip() == str(tmp_path / "x" / "labels.csv")


def test_icmil_predict_encodes_labels_as_the_run_was_trained(icmil_cohort, finished, tmp_path):
    """ICMIL predict re-encoded a cohort's labels by its own sort order: one of tumour slides only was refused
    (num_classes=2 for ['1']), relabelled slides were written as label 0 in predictions.csv and scores.zarr."""
    out, _ = finished
    run = out / "run"
    rows = _rows(icmil_cohort / "labels.csv")
    tumour = [list(r.values()) for r in rows if r["label"] == "1"]
    labels = write_labels(tmp_path / "tumour.csv", tumour, list(rows[0]))
    main(["predict", "-c", str(run / "config.yaml"), f"--data.init_args.labels={labels}"])
    final = run / "final" / "predict-tumour"
    assert {r["label"] for r in _rows(final / "predictions.csv")} == {"1"}
    assert {read_scores(final, name).label for name in scored_slides(final)} == {"1"}
    renamed = [[r[0], {"0": "normal", "1": "cancer"}[r[1]], *r[2:]] for r in tumour]
    labels = write_labels(tmp_path / "renamed.csv", renamed, list(rows[0]))
    with pytest.raises(ValueError, match=r"renamed\.csv:2: slide '\w+' has label 'cancer', not one of the classes"):
        main(["predict", "-c", str(run / "config.yaml"), f"--data.init_args.labels={labels}"])


def test_reestimated_batchnorm_statistics_are_the_runs_e0(icmil_cohort, tmp_path, capsys):
    """`reestimate_batchnorm: k`: a calibrate phase writes E_0 with BatchNorm statistics from training patches (no
    weight moved), which iteration 0 embeds with and test uses, without re-embedding."""
    args = ["--model.init_args.iterations=0", "--model.init_args.reestimate_batchnorm=256"]
    main(icmil_args(icmil_cohort, tmp_path, "fit", *args))
    run = tmp_path / "run"
    assert list(json.loads((run / "state.json").read_text())["done"]) == ["iter0/calibrate", "iter0/embed", "iter0/bag"]
    e0 = torch.load(run / "iter0" / "embedder.pt", weights_only=True)
    config = main(icmil_args(icmil_cohort, tmp_path, "fit", *args)[1:], run=False).model.embedder.state_dict()
    moved = {k for k in e0 if not torch.equal(e0[k], config[k])}
    assert moved and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in moved)
    (manifest,) = (json.loads(p.read_text()) for p in (run / "features").glob("*/manifest.json"))
    assert manifest["weights"] == "iter0/embedder.pt"
    main(icmil_args(icmil_cohort, tmp_path, "test", *args))
    assert len([p for p in (run / "features").iterdir() if p.is_dir()]) == 1  # the calibrated E_0's cache, reused


def test_a_rerun_with_settings_that_decide_results_is_refused(icmil_cohort, finished):
    """Continuing a run with other settings would mix two experiments: refused with the keys named, nothing touched;
    how fast it runs is not what it is, so that may change."""
    out, results = finished
    config = out / "run" / "config.yaml"
    before = config.read_text()
    with pytest.raises(
        ValueError,
        match=r"run_dir: .* holds a run started with other settings "
        r"\(model.init_args.bag.init_args.lr: not as in .*config.yaml\)",
    ):
        _run(icmil_cohort, out, "fit", "--model.init_args.bag.init_args.lr=0.5")
    assert config.read_text() == before
    again = _run(icmil_cohort, out, "fit", "--data.init_args.num_workers=1")
    assert [r["test"] for r in again["iterations"]] == [r["test"] for r in results["iterations"]]
    assert "num_workers: 1" in config.read_text()


def test_changed_settings_names_the_keys_that_decide_results():
    before = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 2},
        "model": {"init_args": {"run_dir": "a", "iterations": 1, "bag": {"init_args": {"lr": 1e-3}}}},
        "data": {"init_args": {"slides": "s", "num_workers": 2, "tiling": {"mpp": 1.0}}},
    }
    after = json.loads(json.dumps(before))
    assert changed_settings(before, after) == []
    after["model"]["init_args"].update(run_dir="b", iterations=3)  # resumable: where, how fast, how many iterations
    after["data"]["init_args"].update(slides="t", num_workers=0)
    after["trainer"]["max_epochs"] = 9  # trainer settings are per phase and not compared
    assert changed_settings(before, after) == []
    after["seed_everything"] = 1
    after["data"]["init_args"]["tiling"]["mpp"] = 0.5
    del after["model"]["init_args"]["bag"]
    after["model"]["init_args"]["coupling"] = {"class_path": "BagGradient"}
    assert changed_settings(before, after) == [
        "data.init_args.tiling.mpp",
        "model.init_args.bag.init_args.lr",
        "model.init_args.coupling.class_path",
        "seed_everything",
    ]
    assert {"model.init_args.run_dir", "model.init_args.iterations", "data.init_args.batch_size"} <= RESUMABLE_SETTINGS


def test_a_moved_class_keeps_its_old_path_for_saved_configs():
    """Runs saved before the encoders moved into `icmil_pl.encoders` name `icmil_pl.embedder.PatchEmbedder`: the
    path still imports, and a rerun of such a run sees no changed setting."""
    from icmil_pl import embedder, encoders, finetune

    assert embedder.PatchEmbedder is encoders.PatchEmbedder and finetune.LoRA is encoders.LoRA
    old = {"model": {"init_args": {"embedder": {"class_path": "icmil_pl.embedder.PatchEmbedder"}}}}
    new = {"model": {"init_args": {"embedder": {"class_path": "icmil_pl.encoders.embedder.PatchEmbedder"}}}}
    assert changed_settings(old, new) == []
    new["model"]["init_args"]["embedder"]["class_path"] = "icmil_pl.encoders.embedder.LeNetEmbedder"
    assert changed_settings(old, new) == ["model.init_args.embedder.class_path"]


def test_evaluate_needs_a_finished_run(tmp_path):
    from data_modules.datasets.patches import SlidePatchDataModule
    from icmil_pl.aggregators import ABMIL
    from icmil_pl.bag_classifier import BagClassifier
    from icmil_pl.encoders import PatchEmbedder
    from icmil_pl.loop import ICMIL, ICMILLoop

    icmil = ICMIL(
        PatchEmbedder("resnet18", truncate_after="layer1"),
        BagClassifier(ABMIL(64)),
        iterations=1,
        run_dir=str(tmp_path / "run"),
    )
    loop = ICMILLoop(icmil, SlidePatchDataModule("labels.csv", "slides"), trainer={}, logger=None)
    with pytest.raises(ValueError, match=r"run_dir: .*run holds no finished ICMIL run of 1 iterations"):
        loop.evaluate("test")


def test_fast_dev_run_smoke_tests_every_phase_apart_from_the_run(icmil_cohort, tmp_path):
    main(icmil_args(icmil_cohort, tmp_path, "fit", "--trainer.fast_dev_run=true"))
    smoke = tmp_path / "run" / "fast_dev_run"
    assert set(json.loads((smoke / "state.json").read_text())["done"]) == {
        "iter0/embed",
        "iter0/bag",
        "iter0/couple",
        "iter1/embed",
        "iter1/bag",
    }
    assert (smoke / "config.yaml").is_file() and (smoke / "results.json").is_file()
    assert not (tmp_path / "run" / "state.json").exists()


def test_hostile_slide_ids_stay_inside_the_run(icmil_cohort, tmp_path):
    """Ids such as `../escape` used to write features into the working directory or into a cache folder shared by
    both iterations (iteration 1 trained on iteration-0 features), and predict failed after 8 slides' figures."""
    slides = sorted((icmil_cohort / "slides").iterdir())
    with (icmil_cohort / "labels.csv").open() as fh:
        label = {row["slide_id"]: row["label"] for row in csv.DictReader(fh)}
    hostile = ["..", "../escape", "sub/dir/x", "näïve σ", "x" * 150, str(tmp_path / "elsewhere" / "abs")]
    root = tmp_path / "cohort"
    rows, by_class = [], {"0": [], "1": []}
    for path in slides:
        by_class[label[path.name.split(".")[0]]].append(path)
    order = [p for pair in zip(by_class["0"], by_class["1"], strict=False) for p in pair]  # classes alternate
    for k, path in enumerate(order):
        slide_id = hostile[k] if k < len(hostile) else path.name.split(".")[0]
        target = root / "slides" / f"{slide_id}{path.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
        split = "test" if k < 4 else "val" if k < 6 else "train"  # every split holds both classes
        rows.append((slide_id, label[path.name.split(".")[0]], slide_id, split))
    labels = write_labels(tmp_path / "labels.csv", rows, ("slide_id", "label", "patient_id", "split"))
    before = {p for p in tmp_path.rglob("*")}
    cwd = set(Path.cwd().iterdir())

    out = tmp_path / "out"
    args = [f"--data.init_args.labels={labels}", f"--data.init_args.slides={root / 'slides'}"]
    main(icmil_args(icmil_cohort, out, "fit", "--model.init_args.coupling.init_args.max_epochs=1", *args))
    main(icmil_args(icmil_cohort, out, "predict", "--model.init_args.coupling.init_args.max_epochs=1", *args))

    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(p.is_relative_to(out) for p in new), sorted(str(p) for p in new if not p.is_relative_to(out))
    assert set(Path.cwd().iterdir()) == cwd
    caches = [p for p in (out / "run" / "features").iterdir() if p.is_dir()]
    assert len(caches) == 2 and all(len(list(c.rglob("*.zarr/zarr.json"))) == len(rows) for c in caches)
    predicted = _rows(out / "run" / "final" / "predict" / "predictions.csv")
    assert sorted(r["slide_id"] for r in predicted) == sorted(r[0] for r in rows)
    assert len(list((out / "run" / "final" / "predict" / "figures").rglob("*_heatmap.png"))) == len(rows)
    assert len(list((out / "run" / "final" / "predict" / "qupath").rglob("*.geojson"))) == len(rows)


def test_a_run_refuses_labels_edited_after_it_started(icmil_cohort, tmp_path):
    """An edited labels.csv used to make every phase 'done in an earlier run, skipped', printing the old metrics."""
    labels = tmp_path / "labels.csv"
    labels.write_text(
        (icmil_cohort / "labels.csv").read_text().replace(",annotations/", f",{icmil_cohort}/annotations/")
    )
    args = [f"--data.init_args.labels={labels}", "--model.init_args.iterations=0"]
    main(icmil_args(icmil_cohort, tmp_path, "fit", *args))
    main(icmil_args(icmil_cohort, tmp_path, "fit", *args))  # unchanged: continues (here: nothing left to do)
    lines = labels.read_text().splitlines()
    slide, label, *rest = lines[3].split(",")
    lines[3] = ",".join([slide, str(1 - int(label)), *rest])
    labels.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"labels\.csv: {slide} changed since the run in .* started"):
        main(icmil_args(icmil_cohort, tmp_path, "fit", *args))


def test_run_state_names_the_slides_that_changed(tmp_path):
    state = RunState(tmp_path / "state.json")
    slides = {f"s{i}": ["0", f"p{i}", None, None, 100, 1] for i in range(6)}
    state.check_slides(slides, "labels.csv")
    assert json.loads((tmp_path / "state.json").read_text())["slides"] == slides
    again = RunState(tmp_path / "state.json")
    again.check_slides(slides, "labels.csv")
    changed = {**slides, "s1": ["1", "p1", None, None, 100, 1], "s9": ["0", "p9", None, None, 5, 5]}
    changed.update({f"s{i}": [*slides[f"s{i}"][:4], 200, 2] for i in (2, 3, 4)})  # files replaced
    del changed["s5"]
    with pytest.raises(ValueError, match=r"^labels\.csv: s1, s2, s3 and 3 more changed since the run"):
        again.check_slides(changed, "labels.csv")


def test_an_icmil_run_keeps_its_csv_logs_in_its_run_dir(icmil_cohort, tmp_path, monkeypatch):
    """Without a logger save_dir the logs used to go to ./runs/lightning_logs whatever run_dir said."""
    monkeypatch.chdir(tmp_path)
    args = [a for a in icmil_args(icmil_cohort, tmp_path, "fit", "--model.init_args.iterations=0") if "logger" not in a]
    main(args)
    logged = _rows(next((tmp_path / "run" / "logs").rglob("metrics.csv")))
    assert any(r.get("final/test/auroc") for r in logged)
    assert not (tmp_path / "runs").exists()


def test_patch_probes_measure_every_iteration_against_the_tumour_masks(icmil_cohort, finished):
    """`probe_run`: per iteration, a linear probe of E_i's features and the bag head per patch, both against the
    generator's masks on the run's test slides; the patch counts are those of the test slides' bags."""
    out, results = finished
    config = main(icmil_args(icmil_cohort, out, "fit")[1:], run=False)
    probes = probe_run(out / "run", config.model.bag, icmil_cohort / "labels.csv")
    assert [p["iteration"] for p in probes] == [it["iteration"] for it in results["iterations"]] == [0, 1]
    splits = json.loads((out / "run" / "splits.json").read_text())
    cache = FeatureCache(RunState(out / "run" / "state.json").output("iter0/embed"))
    assert probes[0]["test_patches"] == sum(len(cache.read(s)) for s in splits["test"])
    assert all(0 < p["test_tumour_patches"] < p["test_patches"] for p in probes)
    assert all(0.5 < p["probe_auroc"] <= 1 and 0 <= p["instance_auroc"] <= 1 for p in probes)  # contrast 1.0


def test_linear_probe_auroc():
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.3
    x = rng.normal(size=(400, 8))
    assert abs(linear_probe_auroc(x[:200], y[:200], x[200:], y[200:]) - 0.5) < 0.1  # features that know nothing
    x[:, 3] += 4 * y
    assert linear_probe_auroc(x[:200], y[:200], x[200:], y[200:]) > 0.99


def test_icmil_with_a_lora_vit_extracts_the_next_iteration_with_merged_weights(icmil_cohort, tmp_path):
    """A ViT with LoRA through the whole loop (BagGradient): iter1/embedder.pt holds plain merged weights, and the
    iteration-1 cache records that file as its weights, with the LoRA setting."""
    vit = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
    main(
        icmil_args(
            icmil_cohort,
            tmp_path,
            "fit",
            # as JSON: jsonargparse turns a nested `truncate_after=null` on the command line into the string 'None'
            "--model.init_args.embedder="
            + json.dumps(
                {
                    "class_path": "PatchEmbedder",
                    "init_args": {
                        "backbone": "vit_small_patch16_224",
                        "truncate_after": None,
                        "model_kwargs": vit,
                        "output": "cls",
                        "finetune": {"class_path": "LoRA", "init_args": {"rank": 2}},
                    },
                }
            ),
            "--model.init_args.bag.init_args.aggregator.init_args.in_dim=32",
            '--model.init_args.coupling={"class_path": "BagGradient", "init_args": {"chunk_size": 16, '
            '"max_instances": 24, "read_threads": 1, "max_epochs": 1, "lr": 1e-2}}',
        )
    )
    run = tmp_path / "run"
    assert len(json.loads((run / "results.json").read_text())["iterations"]) == 2
    e1 = torch.load(run / "iter1" / "embedder.pt", weights_only=True)
    assert e1 and not any("lora" in k for k in e1) and "backbone.blocks.0.attn.qkv.weight" in e1
    manifests = [json.loads(p.read_text()) for p in (run / "features").glob("*/manifest.json")]
    coupled = [m for m in manifests if m["weights"] == "iter1/embedder.pt"]  # the run's own file, relative to it
    assert len(manifests) == 2 and len(coupled) == 1
    assert coupled[0]["finetune"] == {"kind": "LoRA", "rank": 2, "alpha": 16.0, "dropout": 0.0, "target_modules": ""}
    assert coupled[0]["output"] == "cls" and coupled[0]["feature_dim"] == 32


def test_icmil_without_validation_slides_keeps_each_phase_s_last_epoch(icmil_cohort, tmp_path):
    """`splits.val_fraction: 0` trained every phase, then failed writing the results (no validation metrics)."""
    main(icmil_args(icmil_cohort, tmp_path, "fit", "--model.init_args.splits.val_fraction=0"))
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())["iterations"]
    assert [r["val"] for r in results] == [{}] * len(results) and all(0 <= r["test"]["auroc"] <= 1 for r in results)
    assert (run / "figures" / "auroc_by_iteration.png").is_file() and (run / "report.html").is_file()
