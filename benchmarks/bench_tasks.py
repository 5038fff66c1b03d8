"""Survival, regression and multi-label slide models on a synthetic cohort over seeds: each task's test metrics as
a mean with its 95 % interval, and for survival the paired change that one ICMIL iteration with BagGradient (the
exact patient-level gradient of the survival loss, into the embedder) brings over the two-stage baseline of the same
seed.

    python benchmarks/bench_tasks.py [--seeds 5] [--out runs/bench_tasks] [--tasks survival survival_slides ...]
        [--resume]

Configs: `experiments/demo_survival.yaml` (ICMIL, 1 iteration, patient bags; `survival_slides`: the same on slide
bags, each slide with its patient's outcome; `survival_select_c_index`: its two-stage bag phase with checkpoints
chosen by validation c-index instead of the validation loss, paired with iteration 0 of `survival`, which differs
from it in nothing else), `demo_regression.yaml` and `demo_multilabel.yaml` (two-stage, slide bags;
`multilabel_distill`: one ICMIL iteration with the paper's Distillation as the authors' code runs it,
`experiments/coupling/distillation.yaml`, its teacher the head's sigmoid per label), all on one cohort of 96
slides. Seed s sets `seed_everything` (the random-init embedder, training order) and the split seed (which patients
are test: about a third), so the intervals cover both. `--resume` keeps finished runs.

Survival times are noisy draws, so survival also gets two measures from the generator's truth, on the same test
bags: `risk~burden`, the Spearman r between the predicted risk and the bag's true tumour burden (what the hazard is
a function of: its patient's mean over its slides), and `oracle c_index`, the c-index that the true burden itself
reaches as the risk (the ceiling the noise leaves).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from sksurv.metrics import concordance_index_censored  # noqa: E402

from icmil_pl.tools.statistics import mean_interval  # noqa: E402

TARGETS = ROOT / "data" / "demo_tasks" / "targets.csv"  # the configs' cohort: its targets, its true tumour burden

SURVIVAL = ("c_index", "c_index_ipcw")
MULTILABEL = ("auroc", "auroc_tumour_a", "auroc_tumour_b", "f1")
CONFIGS = {  # name: (config, metrics[, overrides])
    "survival": ("experiments/demo_survival.yaml", SURVIVAL),
    "survival_select_c_index": (
        "experiments/demo_survival.yaml",
        SURVIVAL,
        ("--model.init_args.iterations=0", "--model.init_args.bag.init_args.task.init_args.select_by=c_index"),
    ),
    "survival_slides": ("experiments/demo_survival.yaml", SURVIVAL, ("--model.init_args.bag_level=slide",)),
    "regression": ("experiments/demo_regression.yaml", ("mae", "pearson", "spearman", "r2")),
    "multilabel": ("experiments/demo_multilabel.yaml", MULTILABEL),
    "multilabel_distill": (
        "experiments/demo_multilabel.yaml",
        MULTILABEL,
        ("-c", "experiments/coupling/distillation.yaml", "--model.init_args.iterations=1"),
    ),
}
PAIRED = {"survival_select_c_index": "survival"}  # the same runs up to the checkpoint choice: against its iteration 0


def run(task: str, seed: int, out: Path, resume: bool) -> dict:
    run_dir = out / task / f"seed{seed}"
    results = run_dir / "results.json"
    if not (resume and results.is_file()):
        config, _, *overrides = CONFIGS[task]
        command = [
            sys.executable,
            "-m",
            "icmil_pl",
            "fit",
            "-c",
            config,
            f"--seed_everything={seed}",
            f"--model.init_args.splits.seed={seed}",
            f"--model.init_args.run_dir={run_dir}",
            f"--trainer.default_root_dir={run_dir}",
            *(overrides[0] if overrides else ()),
        ]
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads(results.read_text())


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def truth_measures(run_dir: Path, iteration: int) -> dict[str, float]:
    """Survival against the generator's truth on the test slides of `iteration`'s bag phase (see the docstring)."""
    slides = _rows(TARGETS)
    predicted = _rows(run_dir / f"iter{iteration}" / "bag" / "predictions.csv")
    key = next(iter(predicted[0]))  # slide_id, or patient_id for patient bags
    patient = {row[key]: row["patient_id"] for row in slides}
    outcome = {row["patient_id"]: (float(row["time"]), row["event"] == "1") for row in slides}
    burdens: dict[str, list[float]] = {}
    for row in slides:
        burdens.setdefault(row["patient_id"], []).append(float(row["tumour_fraction"]))
    cases = [patient[r[key]] for r in predicted]
    burden = [float(np.mean(burdens[c])) for c in cases]  # what the patient's hazard is a function of
    risk = [float(r["risk"]) for r in predicted]
    time, event = [outcome[c][0] for c in cases], [outcome[c][1] for c in cases]
    oracle = concordance_index_censored(event, time, burden)[0]
    return {"risk~burden": float(spearmanr(risk, burden)[0]), "oracle c_index": float(oracle)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_tasks")
    parser.add_argument("--tasks", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    print(f"{args.seeds} seeds; test metrics as mean [95 % interval]")
    for task in args.tasks:
        _, metrics, *_ = CONFIGS[task]
        runs = [run(task, s, args.out, args.resume)["iterations"] for s in range(args.seeds)]
        if task.startswith("survival"):
            for s, iterations in enumerate(runs):
                for i, iteration in enumerate(iterations):
                    iteration["test"].update(truth_measures(args.out / task / f"seed{s}", i))
            metrics = (*metrics, "risk~burden", "oracle c_index")
        for i in range(len(runs[0])):
            cells = [f"{m} {mean_interval([r[i]['test'][m] for r in runs])}" for m in metrics]
            print(f"{task:10s} iteration {i}: " + ", ".join(cells))
        if len(runs[0]) > 1:
            for m in (m for m in metrics if m != "oracle c_index"):  # the oracle is the same at every iteration
                diff = mean_interval([r[-1]["test"][m] - r[0]["test"][m] for r in runs])
                print(f"{task:10s} iteration {len(runs[0]) - 1} - 0 (paired), test {m}: {diff}")
        val = mean_interval([r[0]["val"][metrics[0]] for r in runs])
        print(f"{task:10s} validation {metrics[0]} at iteration 0: {val}")
        if task in PAIRED:
            other = [run(PAIRED[task], s, args.out, True)["iterations"][0]["test"] for s in range(args.seeds)]
            for m in metrics[:2]:
                diff = mean_interval([r[0]["test"][m] - o[m] for r, o in zip(runs, other, strict=True)])
                print(f"{task:10s} - {PAIRED[task]} iteration 0 (paired), test {m}: {diff}")


if __name__ == "__main__":
    main()
