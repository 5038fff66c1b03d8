"""ICMIL on the demo cohort over seeds: per iteration, slide-level test AUROC and two patch-level measurements against
the generator's tumour masks (`icmil_pl.patch_probes`), each as a mean with its 95 % interval and as the paired
difference to iteration 0 of the same seed; plus what one coupling iteration costs against the two-stage baseline.

    python benchmarks/bench_icmil.py [--seeds 5] [--out runs/bench_icmil] [--e2e-epochs 6] [--resume]
        [--methods BagGradient Distillation ...] [--weights runs/ssl/embedder.pt] [--iterations 2]
        [--compare runs/bench_icmil] [--versus Distillation] [--report]

Methods: ICMIL with BagGradient (`experiments/demo.yaml`), with the paper's Distillation as the authors' code runs it
(`experiments/coupling/distillation.yaml`, MICCAI 2023), with its TMI confidence weights (beta 6) and as its control
`BatchNorm only` (below), and end-to-end training (`experiments/demo_e2e.yaml`; compared with the two-stage
baseline, iteration 0, of the same seed). Seed s sets `seed_everything` (embedder init, training order) and the
split seed (which patients are test), so the intervals cover both. Cost of iteration i >= 1 = couple(i-1) +
embed(i) + bag(i), baseline = embed(0) + bag(0), in the same run (end to end: against the mean of the seed's
iteration-0 timings). `--resume` keeps finished runs in `--out` (a killed benchmark goes on where it stopped).

`--weights` starts every method's embedder from a weights file (`experiments/pretrain_ssl.yaml` writes one; end to
end too), `--methods` picks methods, `--iterations` sets the ICMIL iterations, and `--compare <other --out>` adds
the paired difference, seed by seed, to the same method and iteration of another benchmark run (e.g. a pretrained
start against random init); `--versus <method>` the paired difference of every other method to that one in this run
(e.g. Distillation against its control `BatchNorm only`, whose student's lr is 1e-30: nothing but the BatchNorm
statistics moves). `--seeds 3 4` runs those seeds only (to split a benchmark over processes), and
`--report` prints the table of the finished runs in `--out`, each method over the seeds it has.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from statistics import fmean

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from icmil_pl.cli import main as cli  # noqa: E402
from icmil_pl.patch_probes import probe_run  # noqa: E402
from icmil_pl.tools.statistics import mean_interval  # noqa: E402

DEMO = ROOT / "experiments" / "demo.yaml"
DISTILLATION = ["-c", str(ROOT / "experiments" / "coupling" / "distillation.yaml")]
METHODS = {
    "BagGradient": [],
    "Distillation": DISTILLATION,
    "Distillation TMI": [*DISTILLATION, "--model.init_args.coupling.init_args.confidence_beta=6"],
    # the control: Distillation whose student cannot move (lr 1e-30); only its BatchNorm statistics adapt
    "BatchNorm only": [*DISTILLATION, "--model.init_args.coupling.init_args.lr=1e-30"],
}
MEASURES = {"test": "slide test AUROC", "probe": "linear-probe patch AUROC", "instance": "bag-head patch AUROC"}


def icmil(run: Path, logs: Path, seed: int, extra: list[str], resume: bool) -> dict:
    """One ICMIL run's per-iteration figures, with the patch probes; cached beside the run as bench.json."""
    cached = run / "bench.json"
    if resume and cached.is_file():
        return json.loads(cached.read_text())
    shutil.rmtree(run, ignore_errors=True)
    args = [
        "-c",
        str(DEMO),
        *extra,
        f"--seed_everything={seed}",
        f"--model.init_args.splits.seed={seed}",
        f"--model.init_args.run_dir={run}",
        f"--trainer.logger.init_args.save_dir={logs}",
    ]
    cli(["fit", *args])
    config = cli(args, run=False)  # the same config, instantiated: the bag classifier's architecture for the probes
    probes = probe_run(run, config.model.bag, config.datamodule.labels)
    its = json.loads((run / "results.json").read_text())["iterations"]
    baseline = its[0]["seconds"]["embed"] + its[0]["seconds"]["bag"]
    rows = []
    for it, probe in zip(its, probes, strict=True):
        i, s = it["iteration"], it["seconds"]
        cost = baseline if i == 0 else its[i - 1]["seconds"]["couple"] + s["embed"] + s["bag"]
        rows.append(
            {
                "iteration": i,
                "val": it["val"]["auroc"],
                "test": it["test"]["auroc"],
                "probe": probe["probe_auroc"],
                "instance": probe["instance_auroc"],
                "seconds": cost,
                "cost": cost / baseline,
            }
        )
    cached.write_text(json.dumps(rows, indent=1))
    return rows


def end_to_end(root: Path, seed: int, epochs: int, resume: bool, extra: list[str]) -> dict:
    cached = root / "bench.json"
    if resume and cached.is_file():
        return json.loads(cached.read_text())
    shutil.rmtree(root, ignore_errors=True)
    cli(
        [
            "fit",
            "-c",
            str(ROOT / "experiments" / "demo_e2e.yaml"),
            f"--seed_everything={seed}",
            f"--data.init_args.splits.seed={seed}",
            f"--trainer.max_epochs={epochs}",
            f"--trainer.default_root_dir={root}",
            f"--trainer.logger.init_args.save_dir={root}",
            *extra,
        ]
    )
    it = json.loads(next(root.rglob("results.json")).read_text())["iterations"][0]
    row = {"val": it["val"]["auroc"], "test": it["test"]["auroc"], "seconds": it["seconds"]["fit"]}
    cached.write_text(json.dumps(row, indent=1))
    return row


Runs = dict[str, dict[int, list[dict]]]  # method -> seed -> per-iteration rows


def report(runs: Runs, e2e: dict[int, dict], epochs: int) -> None:
    """Per method and iteration: each measure's mean [95 % interval] over the method's seeds, and the paired
    difference to iteration 0 of the same seed; then every seed's slide test AUROC."""
    print("\nmean [95 % interval] over seeds; d = paired difference to iteration 0 of the same seed")
    header = f"{'method':<17s} {'seeds':>5s} {'iter':>4s}"
    for name in MEASURES:
        header += f" {name + ' AUROC':>22s} {'d ' + name:>23s}"
    print(header + f" {'x baseline':>10s}")
    for method, by_seed in runs.items():
        seeds = list(by_seed.values())
        for i in range(min(len(s) for s in seeds)):
            line = f"{method:<17s} {len(seeds):5d} {i:4d}"
            for name in MEASURES:
                values = [s[i][name] for s in seeds]
                diffs = [s[i][name] - s[0][name] for s in seeds]
                line += f" {mean_interval(values)!s:>22s} {(mean_interval(diffs) if i else '-')!s:>23s}"
            print(line + f" {mean_interval([s[i]['cost'] for s in seeds]).mean:10.2f}")
    if e2e:
        iteration0: dict[int, list[dict]] = {}  # every method's iteration 0 of a seed: one config, timed per method
        for by_seed in runs.values():
            for seed, rows in by_seed.items():
                iteration0.setdefault(seed, []).append(rows[0])
        diffs = [e["test"] - iteration0[seed][0]["test"] for seed, e in e2e.items()]
        cost = fmean(e["seconds"] / fmean(b["seconds"] for b in iteration0[seed]) for seed, e in e2e.items())
        print(
            f"{'end-to-end':<17s} {len(e2e):5d} {'-':>4s} {mean_interval([e['test'] for e in e2e.values()])!s:>22s} "
            f"{mean_interval(diffs)!s:>23s}  ({epochs} epochs, chunked; d to iteration 0; {cost:.2f}x baseline)"
        )
    print("\nslide test AUROC per seed (iterations 0 / 1 / ...)")
    for method, by_seed in runs.items():
        print(
            f"{method:<17s} "
            + "  ".join(f"s{k}: " + " / ".join(f"{it['test']:.3f}" for it in s) for k, s in by_seed.items())
        )
    if e2e:
        print(f"{'end-to-end':<17s} " + "  ".join(f"s{k}: {e['test']:.3f}" for k, e in e2e.items()))


def compare(runs: Runs, other: Path) -> None:
    """Paired differences, seed by seed, to the same method and iteration of the benchmark run in `other`."""

    def base(method: str, seed: int) -> list[dict]:
        return json.loads((other / f"seed{seed}" / method.replace(" ", "_") / "bench.json").read_text())

    paired(runs, base, f"{other} (same method, seed and iteration)")


def versus(runs: Runs, method: str) -> None:
    """Paired differences of every other method to `method` of this run, over the seeds both have."""
    if method not in runs:
        raise SystemExit(f"--versus: no finished run of {method!r} in this benchmark")
    others = {m: {k: s for k, s in by_seed.items() if k in runs[method]} for m, by_seed in runs.items() if m != method}
    paired({m: by_seed for m, by_seed in others.items() if by_seed}, lambda _, k: runs[method][k], method)


def paired(runs: Runs, base: Callable[[str, int], list[dict]], against: str) -> None:
    """Per method and iteration, the mean [95 % interval] of each measure's difference to `base(method, seed)`."""
    print(f"\npaired difference to {against}: mean [95 % interval] over seeds")
    print(f"{'method':<17s} {'seeds':>5s} {'iter':>4s}" + "".join(f" {'d ' + name:>23s}" for name in MEASURES))
    for method, by_seed in runs.items():
        bases = {k: base(method, k) for k in by_seed}
        for i in range(min(min(len(s), len(bases[k])) for k, s in by_seed.items())):
            line = f"{method:<17s} {len(by_seed):5d} {i:4d}"
            for name in MEASURES:
                line += f" {mean_interval([s[i][name] - bases[k][i][name] for k, s in by_seed.items()])!s:>23s}"
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[5], help="N (seeds 0 .. N-1), or a list of seeds")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_icmil")
    parser.add_argument("--e2e-epochs", type=int, default=6)
    parser.add_argument("--resume", action="store_true", help="keep finished runs in --out")
    parser.add_argument("--report", action="store_true", help="only print the table of the finished runs in --out")
    parser.add_argument("--methods", nargs="+", choices=[*METHODS, "end-to-end"], default=[*METHODS, "end-to-end"])
    parser.add_argument("--weights", type=Path, help="the embedder's starting weights (default: random init)")
    parser.add_argument("--iterations", type=int, help="ICMIL iterations (default: the demo's)")
    parser.add_argument("--compare", type=Path, help="another benchmark's --out: paired differences to it")
    parser.add_argument("--versus", choices=METHODS, help="paired differences of the other methods to this one")
    args = parser.parse_args()
    if not set(args.methods) & set(METHODS):
        parser.error("--methods: name at least one ICMIL method (end-to-end is compared with its iteration 0)")
    seeds = range(args.seeds[0]) if len(args.seeds) == 1 else args.seeds
    if not (args.resume or args.report):
        shutil.rmtree(args.out, ignore_errors=True)
    start = [f"--model.init_args.embedder.init_args.weights={args.weights.resolve()}"] if args.weights else []
    if args.iterations is not None:
        start.append(f"--model.init_args.iterations={args.iterations}")
    runs: Runs = {method: {} for method in METHODS if method in args.methods}
    e2e: dict[int, dict] = {}
    for seed in seeds:
        for method in runs:
            run = args.out / f"seed{seed}" / method.replace(" ", "_")
            if not args.report:
                runs[method][seed] = icmil(run, args.out / "logs", seed, [*METHODS[method], *start], args.resume)
            elif (run / "bench.json").is_file():
                runs[method][seed] = json.loads((run / "bench.json").read_text())
        root = args.out / f"seed{seed}" / "end_to_end"
        if "end-to-end" in args.methods and not args.report:
            e2e[seed] = end_to_end(root, seed, args.e2e_epochs, args.resume, start[:1] if args.weights else [])
        elif "end-to-end" in args.methods and (root / "bench.json").is_file():
            e2e[seed] = json.loads((root / "bench.json").read_text())
    runs = {method: by_seed for method, by_seed in runs.items() if by_seed}
    report(runs, e2e, args.e2e_epochs)
    if args.compare:
        compare(runs, args.compare)
    if args.versus:
        versus(runs, args.versus)


if __name__ == "__main__":
    main()
