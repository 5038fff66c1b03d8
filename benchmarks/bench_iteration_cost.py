"""What one ICMIL iteration costs against the two-stage baseline it starts from (embed + bag phase = 1x).

Runs the demo's config (`experiments/demo.yaml`: 96 slides, random-init ResNet-18 to layer2, ABMIL) for one
iteration with each coupling, `BagGradient` (the demo's) and the paper's `Distillation`
(`experiments/coupling/distillation.yaml`), each without and with the patch store, in fresh run directories one
after the other, and reads each phase's wall seconds from the run's results.json. The iteration's cost is
(embed + bag + couple) / (embed + bag) of iteration 0; the store's first extraction writes it, so its embed time
includes that. Ratios compare only within this run (this machine's speed drifts over minutes).

    python benchmarks/bench_iteration_cost.py [--methods BagGradient Distillation] [--root data/demo]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = {
    "BagGradient": [],
    "Distillation": ["-c", str(ROOT / "experiments" / "coupling" / "distillation.yaml")],
}


def run(method: str, store: bool, root: str, tmp: Path) -> dict[str, float]:
    run_dir = tmp / f"{method}-{'store' if store else 'plain'}"
    args = [sys.executable, "-m", "icmil_pl", "fit", "-c", str(ROOT / "experiments" / "demo.yaml"), *METHODS[method]]
    args += [
        "--model.init_args.iterations=1",
        f"--model.init_args.run_dir={run_dir}",
        f"--data.init_args.root={root}",
        f"--data.init_args.grid_cache={tmp / 'grids'}",
    ]
    if store:
        args.append(f"--data.init_args.patch_store={tmp / f'store-{method}'}")
    subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((run_dir / "results.json").read_text())["iterations"][0]["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--root", default=str(ROOT / "data" / "demo"))
    args = parser.parse_args()
    print(f"{'coupling':14} {'patch store':12} {'embed s':>8} {'bag s':>7} {'couple s':>9} {'iteration':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for store in (False, True):
                s = run(method, store, args.root, Path(tmp))
                base = s["embed"] + s["bag"]
                cost = (base + s["couple"]) / base
                line = f"{method:14} {'yes' if store else 'no':12} {s['embed']:>8.1f} {s['bag']:>7.1f}"
                print(f"{line} {s['couple']:>9.1f} {cost:>9.2f}x", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
