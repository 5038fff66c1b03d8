"""The ICMIL loop from the command line: iterations complete, results.json, and a killed run resumes to the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_modules.synthetic import make_cohort
from icmil_pl.cli import main
from icmil_pl.coupling import Distillation

CONF = Path(__file__).parent / "conf"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    make_cohort(root, 12, seed=2, size=(1024, 1024), mpp=0.5, tumour_contrast=1.0, tumour_area=(0.1, 0.2))
    return root


def _run(cohort: Path, root: Path) -> dict:
    main(["fit", "-c", str(CONF / "icmil.yaml"), f"--model.init_args.run_dir={root / 'run'}",
          f"--data.init_args.labels={cohort / 'labels.csv'}", f"--data.init_args.slides={cohort / 'slides'}",
          f"--data.init_args.grid_cache={root / 'grids'}", f"--trainer.logger.init_args.save_dir={root / 'logs'}"])
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

    original = Distillation.fit

    def crash(self, *args, **kwargs):
        raise RuntimeError("killed during couple")

    monkeypatch.setattr(Distillation, "fit", crash)
    with pytest.raises(RuntimeError, match="killed during couple"):
        _run(cohort, tmp_path / "resumed")
    state = json.loads((tmp_path / "resumed" / "run" / "state.json").read_text())
    assert set(state["done"]) == {"iter0/embed", "iter0/bag"}
    monkeypatch.setattr(Distillation, "fit", original)
    resumed = _run(cohort, tmp_path / "resumed")
    for a, b in zip(clean["iterations"], resumed["iterations"]):
        assert a["val"] == pytest.approx(b["val"]) and a["test"] == pytest.approx(b["test"])
