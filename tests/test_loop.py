"""The ICMIL loop from the command line: iterations complete, results.json, and a killed run resumes to the same."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from data_modules.synthetic import make_cohort
from icmil_pl.cli import main
from icmil_pl.coupling import _DistillationModule

CONF = Path(__file__).parent / "conf"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    make_cohort(root, 12, seed=2, size=(1024, 1024), mpp=0.5, tumour_contrast=1.0, tumour_area=(0.1, 0.2))
    return root


def _run(cohort: Path, root: Path, subcommand: str = "fit", extra: list[str] = ()) -> dict:
    main([subcommand, "-c", str(CONF / "icmil.yaml"), f"--model.init_args.run_dir={root / 'run'}",
          f"--data.init_args.labels={cohort / 'labels.csv'}", f"--data.init_args.slides={cohort / 'slides'}",
          f"--data.init_args.grid_cache={root / 'grids'}", f"--trainer.logger.init_args.save_dir={root / 'logs'}",
          "--model.init_args.coupling.init_args.max_epochs=2", *extra])
    return json.loads((root / "run" / "results.json").read_text())


def test_two_iterations_and_resume_after_a_crash(cohort, tmp_path, monkeypatch):
    clean = _run(cohort, tmp_path / "clean")
    assert [r["iteration"] for r in clean["iterations"]] == [0, 1]
    for entry in clean["iterations"]:
        assert set(entry["test"]) == {"auroc", "accuracy", "f1", "balanced_accuracy"}
        assert 0.0 <= entry["test"]["auroc"] <= 1.0
    assert set(clean["iterations"][0]["seconds"]) == {"embed", "bag", "couple"}
    run = tmp_path / "clean" / "run"
    assert (run / "iter1" / "embedder.pt").is_file() and (run / "splits.json").is_file()
    assert len([p for p in (run / "features").iterdir() if p.is_dir()]) == 2  # E_0 and E_1 features never mix
    logged = (next((tmp_path / "clean" / "logs").rglob("metrics.csv"))).read_text().splitlines()[0]
    assert "iter0/bag/val/auroc" in logged and "iter1/bag/test/auroc" in logged and "final/test/auroc" in logged

    # test and predict on the finished run: its final embedder (features already cached) and bag classifier
    _run(cohort, tmp_path / "clean", "test")
    tested = list(csv.DictReader((run / "final" / "test" / "predictions.csv").open()))
    assert sorted(r["slide_id"] for r in tested) == sorted(json.loads((run / "splits.json").read_text())["test"])
    _run(cohort, tmp_path / "clean", "predict")
    predicted = list(csv.DictReader((run / "final" / "predict" / "predictions.csv").open()))
    assert len(predicted) == 12 and {r["slide_id"]: r for r in predicted}[tested[0]["slide_id"]] == tested[0]
    assert len([p for p in (run / "features").iterdir() if p.is_dir()]) == 2  # nothing re-extracted
    figures = run / "final" / "predict" / "figures"
    assert (figures / f"{tested[0]['slide_id']}_heatmap.png").is_file()
    assert (figures / f"{tested[0]['slide_id']}_patches.png").is_file()
    assert (run / "final" / "test" / "figures" / "test_confusion.png").is_file()
    assert (run / "figures" / "auroc_by_iteration.png").is_file()

    # new slides without labels: a CSV with the slide_id column only; classes are named from the checkpoint
    new = tmp_path / "new.csv"
    new.write_text("slide_id\n" + "".join(f"{r['slide_id']}\n" for r in tested[:2]))
    main(["predict", "-c", str(run / "config.yaml"), f"--data.init_args.labels={new}"])  # the run's saved config
    unlabelled = list(csv.DictReader((run / "final" / "predict" / "predictions.csv").open()))
    assert [r["slide_id"] for r in unlabelled] == [r["slide_id"] for r in tested[:2]]
    assert all(r["label"] == "" and r["predicted"] in ("0", "1") for r in unlabelled)
    assert unlabelled[0]["prob_1"] == tested[0]["prob_1"]

    # Killed in the second epoch of the couple phase of iteration 0: the rerun skips the finished phases, continues the
    # couple phase from its last checkpoint (epoch 0 is not trained again) and ends with the same results.
    original = _DistillationModule.training_step
    epochs_trained = []

    def crash_in_epoch_1(self, batch, batch_idx):
        if self.current_epoch == 1:
            raise RuntimeError("killed during couple")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(_DistillationModule, "training_step", crash_in_epoch_1)
    with pytest.raises(RuntimeError, match="killed during couple"):
        _run(cohort, tmp_path / "resumed")
    state = json.loads((tmp_path / "resumed" / "run" / "state.json").read_text())
    assert set(state["done"]) == {"iter0/embed", "iter0/bag"}
    assert (tmp_path / "resumed" / "run" / "iter0" / "couple" / "checkpoints" / "last.ckpt").is_file()

    def record(self, batch, batch_idx):
        epochs_trained.append((self.trainer.global_rank, self.current_epoch))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(_DistillationModule, "training_step", record)
    resumed = _run(cohort, tmp_path / "resumed")
    assert {e for _, e in epochs_trained} == {1}  # iteration 1 has no couple phase; iteration 0 resumed at epoch 1
    for a, b in zip(clean["iterations"], resumed["iterations"]):
        assert a["val"] == pytest.approx(b["val"]) and a["test"] == pytest.approx(b["test"])

    # Continuing a run with settings that decide its results would mix two experiments: refused, nothing touched.
    before = (run / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"run_dir: .* holds a run started with other settings "
                                         r"\(model.init_args.bag.init_args.lr: not as in .*config.yaml\)"):
        _run(cohort, tmp_path / "clean", extra=["--model.init_args.bag.init_args.lr=0.5"])
    assert (run / "config.yaml").read_text() == before
    _run(cohort, tmp_path / "clean", extra=["--data.init_args.num_workers=1"])  # how fast is not what


def test_evaluate_needs_a_finished_run(tmp_path):
    from data_modules.patches import SlidePatchDataModule
    from icmil_pl.aggregators import ABMIL
    from icmil_pl.bag_classifier import BagClassifier
    from icmil_pl.embedder import PatchEmbedder
    from icmil_pl.loop import ICMIL, ICMILLoop

    icmil = ICMIL(PatchEmbedder("resnet18", truncate_after="layer1"), BagClassifier(ABMIL(64)), iterations=1,
                  run_dir=str(tmp_path / "run"))
    loop = ICMILLoop(icmil, SlidePatchDataModule("labels.csv", "slides"), trainer={}, logger=None)
    with pytest.raises(ValueError, match=r"run_dir: .*run holds no finished ICMIL run of 1 iterations"):
        loop.evaluate("test")


def test_fast_dev_run_smoke_tests_every_phase_apart_from_the_run(cohort, tmp_path):
    main(["fit", "-c", str(CONF / "icmil.yaml"), f"--model.init_args.run_dir={tmp_path / 'run'}",
          f"--data.init_args.labels={cohort / 'labels.csv'}", f"--data.init_args.slides={cohort / 'slides'}",
          f"--data.init_args.grid_cache={tmp_path / 'grids'}", f"--trainer.logger.init_args.save_dir={tmp_path}",
          "--trainer.fast_dev_run=true"])
    smoke = tmp_path / "run" / "fast_dev_run"
    assert set(json.loads((smoke / "state.json").read_text())["done"]) == {
        "iter0/embed", "iter0/bag", "iter0/couple", "iter1/embed", "iter1/bag"}
    assert not (tmp_path / "run" / "state.json").exists()
