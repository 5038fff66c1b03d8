"""End-to-end MIL on digit bags: exact chunked vs full-bag vs within-bag sampling, from one config.

Runs `python -m icmil_pl fit -c experiments/digits_e2e.yaml` three times in fresh processes (same seed) and prints
validation/test metrics and time per run. The chunked run must reach test AUROC >= 0.95 and match the full-bag run.

    python benchmarks/bench_digits_e2e.py --epochs 10
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "chunked (chunk_size=4)": ["--model.init_args.chunk_size=4"],
    "full bag (chunk_size=null)": ["--model.init_args.chunk_size=null"],
    "within-bag sampling (max_instances=4)": ["--model.init_args.chunk_size=4", "--model.init_args.max_instances=4"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--config", default="experiments/digits_e2e.yaml")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(VARIANTS.items()):
            root = Path(tmp) / str(i)
            cmd = [
                sys.executable,
                "-m",
                "icmil_pl",
                "fit",
                "-c",
                args.config,
                f"--trainer.max_epochs={args.epochs}",
                f"--trainer.default_root_dir={root}",
                f"--trainer.logger.init_args.save_dir={root}",
                "--trainer.enable_progress_bar=false",
                *extra,
            ]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows[name] = json.loads(next(root.glob("lightning_logs/*/results.json")).read_text())["iterations"][0]
            print(f"done: {name}: test AUROC {rows[name]['test']['auroc']:.4f}", flush=True)
    print(f"\ndigit bags, ABMIL + LeNet end to end, {args.epochs} epochs, seed 0 (val 50 bags, test 1000 bags)")
    print(f"{'variant':40s} {'val AUROC':>9s} {'test AUROC':>10s} {'test acc':>8s} {'test F1':>7s} {'fit s':>6s}")
    for name, r in rows.items():
        print(
            f"{name:40s} {r['val']['auroc']:9.4f} {r['test']['auroc']:10.4f} {r['test']['accuracy']:8.4f} "
            f"{r['test']['f1']:7.4f} {r['seconds']['fit']:6.0f}"
        )
    chunked, full = rows["chunked (chunk_size=4)"], rows["full bag (chunk_size=null)"]
    diff = max(abs(chunked[s][m] - full[s][m]) for s in ("val", "test") for m in chunked[s])
    print(f"\nlargest metric difference chunked vs full bag: {diff:.2e}")


if __name__ == "__main__":
    main()
