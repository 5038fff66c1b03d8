"""ICMIL on the demo cohort: what one coupling iteration costs against the two-stage baseline, and test AUROC per
iteration for the Distillation and BagGradient couplings, with end-to-end training (same cohort, splits, embedder
and head) for reference.

    python benchmarks/bench_icmil.py [--out runs/bench_icmil] [--e2e-epochs 6]

Cost of iteration i >= 1 = couple(i-1) + embed(i) + bag(i); baseline = embed(0) + bag(0) (extract features once,
train the bag classifier), all measured in the same run on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from icmil_pl.cli import main as cli  # noqa: E402

DEMO = ROOT / "experiments" / "demo.yaml"
COUPLINGS = {"BagGradient": [], "Distillation": ["-c", str(ROOT / "experiments" / "coupling" / "distillation.yaml")]}


def icmil(out: Path, name: str, extra: list[str]) -> dict:
    run = out / name
    cli(
        [
            "fit",
            "-c",
            str(DEMO),
            *extra,
            f"--model.init_args.run_dir={run}",
            f"--trainer.logger.init_args.save_dir={out / 'logs'}",
        ]
    )
    return json.loads((run / "results.json").read_text())


def end_to_end(out: Path, epochs: int) -> dict:
    root = out / "end_to_end"
    cli(
        [
            "fit",
            "-c",
            str(ROOT / "experiments" / "demo_e2e.yaml"),
            f"--trainer.max_epochs={epochs}",
            f"--trainer.default_root_dir={root}",
            f"--trainer.logger.init_args.save_dir={root}",
        ]
    )
    return json.loads(next(root.rglob("results.json")).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_icmil")
    parser.add_argument("--e2e-epochs", type=int, default=6)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    results = {name: icmil(args.out, name, extra) for name, extra in COUPLINGS.items()}
    e2e = end_to_end(args.out, args.e2e_epochs)["iterations"][0]

    print(f"\n{'coupling':<13s} {'iter':>4s} {'val AUROC':>9s} {'test AUROC':>10s} {'seconds':>8s} {'x baseline':>10s}")
    for name, result in results.items():
        its = result["iterations"]
        baseline = its[0]["seconds"]["embed"] + its[0]["seconds"]["bag"]
        for i, it in enumerate(its):
            s = it["seconds"]
            cost = baseline if i == 0 else its[i - 1]["seconds"]["couple"] + s["embed"] + s["bag"]
            print(
                f"{name:<13s} {i:4d} {it['val']['auroc']:9.3f} {it['test']['auroc']:10.3f} {cost:8.1f} "
                f"{cost / baseline:10.2f}"
            )
    fit = e2e["seconds"]["fit"]  # against the faster of the two-stage baselines (the first run pays warm-up)
    ratio = fit / min(
        r["iterations"][0]["seconds"]["embed"] + r["iterations"][0]["seconds"]["bag"] for r in results.values()
    )
    print(
        f"{'end-to-end':<13s} {'-':>4s} {e2e['val']['auroc']:9.3f} {e2e['test']['auroc']:10.3f} {fit:8.1f} "
        f"{ratio:10.2f}   ({args.e2e_epochs} epochs, chunked)"
    )


if __name__ == "__main__":
    main()
