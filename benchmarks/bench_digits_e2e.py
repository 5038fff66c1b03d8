"""MIL on digit bags, the gradient-accumulation paper's setting: frozen features, ICMIL and end to end (exact chunked,
full bag, within-bag sampling) from one config, over seeds.

Every variant runs `python -m icmil_pl fit -c experiments/digits_e2e.yaml` in fresh processes with the seed as
`seed_everything` and the digit bags' seed, and reports validation and test AUROC, wall time and peak memory (RSS of
the process, with `MALLOC_MMAP_THRESHOLD_=65536` so freed chunks return to the system):

- frozen (two-stage): a random-init LeNet's features, frozen, and ABMIL trained on them (`trains: aggregator`);
- ICMIL: that model, then one coupling (`trains: embedder`: the embedder through the frozen ABMIL head, exact
  chunked gradients, as `BagGradient`), then ABMIL trained again from scratch on the coupled LeNet's frozen features;
- end to end: LeNet and ABMIL together, chunked (chunk 4), full bag, or sampling 4 patches per bag.

    python benchmarks/bench_digits_e2e.py --epochs 5 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from icmil_pl.tools.statistics import mean_interval  # noqa: E402

END_TO_END = {
    "end to end, chunked (4)": ["--model.init_args.chunk_size=4"],
    "end to end, full bag": ["--model.init_args.chunk_size=null"],
    "end to end, sampled (4)": ["--model.init_args.chunk_size=4", "--model.init_args.max_instances=4"],
}
# the measured process: the CLI, then its peak resident memory
_RUN = (
    "import resource, sys; from icmil_pl.cli import main; main(sys.argv[1:]); "
    "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
)


def fit(root: Path, config: str, seed: int, epochs: int, extra: list[str]) -> dict:
    """One fit in a fresh process: its results.json entry, the best checkpoint's path, seconds and peak MiB."""
    args = [
        "fit",
        "-c",
        config,
        f"--seed_everything={seed}",
        f"--data.init_args.seed={seed}",
        f"--trainer.max_epochs={epochs}",
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _RUN, *args], check=True, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    peak = int(done.stdout.rsplit("peak_rss_kb", 1)[1].split()[0]) / 1024
    folder = next(root.glob("lightning_logs/*/results.json")).parent
    entry = json.loads((folder / "results.json").read_text())["iterations"][0]
    return {**entry, "best": str(folder / entry["checkpoint"]), "wall": seconds, "peak_mib": peak}


def icmil(root: Path, config: str, seed: int, epochs: int) -> dict:
    """Frozen two-stage model, one exact coupling of the embedder through its frozen head, a new head on the coupled
    embedder's frozen features; the last model's metrics, the three fits' time and the largest peak."""
    frozen = fit(root / "bag0", config, seed, epochs, ["--model.init_args.trains=aggregator"])
    couple = ["--model.init_args.trains=embedder", f"--model.init_args.head={frozen['best']}"]
    couple.append(f"--model.init_args.embedder_from={frozen['best']}")
    coupled = fit(root / "couple", config, seed, epochs, couple)
    bag = ["--model.init_args.trains=aggregator", f"--model.init_args.embedder_from={coupled['best']}"]
    final = fit(root / "bag1", config, seed, epochs, bag)
    steps = (frozen, coupled, final)
    return {**final, "wall": sum(s["wall"] for s in steps), "peak_mib": max(s["peak_mib"] for s in steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10, help="epochs of every fit (each of ICMIL's three too)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--config", default=str(ROOT / "experiments" / "digits_e2e.yaml"))
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            variants = {"frozen (two-stage)": ["--model.init_args.trains=aggregator"], **END_TO_END}
            for k, (name, extra) in enumerate(variants.items()):
                rows.setdefault(name, []).append(fit(Path(tmp) / f"{seed}-{k}", args.config, seed, args.epochs, extra))
            rows.setdefault("ICMIL (1 iteration)", []).append(
                icmil(Path(tmp) / f"{seed}-icmil", args.config, seed, args.epochs)
            )
            print(
                f"seed {seed}: " + ", ".join(f"{n} {r[-1]['test']['auroc']:.3f}" for n, r in rows.items()), flush=True
            )
    print(
        f"\ndigit bags, LeNet + ABMIL, {args.epochs} epochs a fit, {args.seeds} seeds (val 50 bags, test 1000 bags); "
        "mean [95 % interval] over seeds"
    )
    head = f"{'variant':26s} {'val AUROC':>22s} {'test AUROC':>22s} {'d test vs frozen':>22s}"
    print(f"{head} {'wall s':>7s} {'peak MiB':>8s}")
    frozen = rows["frozen (two-stage)"]
    for name, runs in rows.items():
        val, test = (mean_interval([r[s]["auroc"] for r in runs]) for s in ("val", "test"))
        d = mean_interval([r["test"]["auroc"] - f["test"]["auroc"] for r, f in zip(runs, frozen, strict=True)])
        wall, peak = (sum(r[k] for r in runs) / len(runs) for k in ("wall", "peak_mib"))
        print(f"{name:26s} {val!s:>22s} {test!s:>22s} {d!s:>22s} {wall:7.0f} {peak:8.0f}")


if __name__ == "__main__":
    main()
