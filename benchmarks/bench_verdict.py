"""Does training the embedder from slide labels beat frozen features? Every embedder-training method on one cohort over
seeds, each against the best frozen baseline of the same seed, on slide labels and on patch-level truth.

    python benchmarks/bench_verdict.py --config experiments/hard_cohort.yaml --ssl runs/ssl_hard/embedder.pt
        [--seeds 5] [--arms frozen BagGradient ...] [--out runs/bench_verdict] [--resume] [--report]
        [--oracle-seed 0] [--<config key>=<value> ...]

Arms (`ARMS`): the frozen baselines (ICMIL iteration 0 with E_0's BatchNorm statistics re-estimated on the training
patches: from the config's random-init start, and from the SSL-pretrained start `--ssl`); one ICMIL iteration with
`BagGradient` or `Distillation` (the authors' preset; TMI's confidence weights) from either start, with and without
stain augmentation; end to end (exact chunked gradients), warm-started from a frozen baseline's iteration 0 (its
embedder and bag head), with its own embedder learning rate, until the validation loss stops improving, with stain
augmentation or an EMA of the weights (validated, selected and tested as the average); and end to end with within-bag
sampling (approximate, always evaluated on whole bags). Seed s sets `seed_everything` and the
split seed. An ICMIL arm continues a copy of its start's frozen run (iteration 0 does not depend on the coupling), so
every method of a seed starts from the very same E_0 and bag head; its cost still counts iteration 0. Other
`--key=value` arguments override the config in every arm (e.g. `--model.init_args.reestimate_batchnorm=8192` on a
config without it).

Per arm: slide test AUROC; the linear-probe patch AUROC of its embedder (logistic regression on the training slides'
patches, scored on the test slides'); the instance AUROC of its bag head per patch; each as a mean with its 95 %
interval, the paired difference to the best frozen baseline of the seed (by test AUROC), the share of the probe room
closed, (probe - best frozen probe) / (oracle - best frozen probe), and the cost: the arm's seconds over its two-stage
baseline's (calibrate + embed + bag). The oracle is `bench_difficulty.py`'s patch-label ceiling, measured once, on
`--oracle-seed`'s split (about 11 minutes on 2 CPU cores): the cohort's ceiling, used for every seed's room.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_modules.annotations import annotations_of  # noqa: E402
from data_modules.datasets.patches import PatchDataset  # noqa: E402
from icmil_pl.cli import main as cli  # noqa: E402
from icmil_pl.patch_probes import linear_probe_auroc, probe_run  # noqa: E402
from icmil_pl.tools.statistics import mean_interval  # noqa: E402

DISTILLATION = ["-c", str(ROOT / "experiments" / "coupling" / "distillation.yaml")]
# HED jitter between light and strong (data_modules.datasets.augment.StainJitter)
STAIN = '{"sigma": 0.1, "bias": 0.01}'
# an EMA of the weights (icmil_pl.callbacks.WeightEMA), a window of about 100 steps: two epochs of 48 bags
EMA = '--trainer.callbacks+={"class_path": "WeightEMA", "init_args": {"decay": 0.99}}'
# arm -> (kind, start, extra arguments); kind: "frozen", "icmil" (iteration 1 of ICMIL) or "e2e" (from a frozen arm)
ARMS: dict[str, tuple[str, str, list[str]]] = {
    "frozen": ("frozen", "random", []),
    "frozen ssl": ("frozen", "ssl", []),
    "BagGradient": ("icmil", "random", []),
    "BagGradient ssl": ("icmil", "ssl", []),
    "BagGradient stain": ("icmil", "random", [f"--model.init_args.coupling.init_args.stain_jitter={STAIN}"]),
    "Distillation": ("icmil", "random", DISTILLATION),
    "Distillation ssl": ("icmil", "ssl", DISTILLATION),
    "Distillation TMI": ("icmil", "random", [*DISTILLATION, "--model.init_args.coupling.init_args.confidence_beta=6"]),
    "Distillation stain": (
        "icmil",
        "random",
        [*DISTILLATION, f"--model.init_args.coupling.init_args.stain_jitter={STAIN}"],
    ),
    "end to end": ("e2e", "random", []),
    "end to end ssl": ("e2e", "ssl", []),
    "end to end stain": ("e2e", "random", [f"--model.init_args.stain_jitter={STAIN}"]),
    "end to end sampled": ("e2e", "random", ["--model.init_args.max_instances=32"]),
    "end to end ssl ema": ("e2e", "ssl", [EMA]),
}
MEASURES = ("test", "probe", "instance")


def icmil_arm(run: Path, config: Path, seed: int, iterations: int, extra: list[str], start: Path | None) -> dict:
    """ICMIL on `config` for `seed` with `iterations`, continuing a copy of the finished run `start` (its iteration 0)
    when given; its last iteration's measures and its cost."""
    shutil.rmtree(run, ignore_errors=True)
    if start is not None:
        shutil.copytree(start, run, ignore=shutil.ignore_patterns("bench.json", "config.yaml", "final", "logs"))
    args = ["-c", str(config), *extra, f"--seed_everything={seed}", f"--model.init_args.splits.seed={seed}"]
    args += [f"--model.init_args.run_dir={run}", f"--model.init_args.iterations={iterations}"]
    args += [f"--trainer.logger.init_args.save_dir={run / 'logs'}"]
    cli(["fit", *args])
    built = cli(args, run=False)
    probes = probe_run(run, built.model.bag, built.datamodule.labels)
    its = json.loads((run / "results.json").read_text())["iterations"]
    seconds = sum(sum(it["seconds"].values()) for it in its)
    baseline = sum(its[0]["seconds"].get(p, 0) for p in ("calibrate", "embed", "bag"))
    last, probe = its[-1], probes[-1]
    return {
        "test": last["test"]["auroc"],
        "val": last["val"]["auroc"],
        "probe": probe["probe_auroc"],
        "instance": probe["instance_auroc"],
        "seconds": seconds,
        "baseline_seconds": baseline,
    }


def e2e_arm(
    run: Path, frozen: Path, config: Path, seed: int, epochs: int, extra: list[str], overrides: list[str]
) -> dict:
    """End to end warm-started from the frozen run's iteration 0, early-stopped on the validation loss."""
    shutil.rmtree(run, ignore_errors=True)
    built = cli(["-c", str(config), *overrides, f"--seed_everything={seed}"], run=False)
    data, tiling = built.datamodule, built.datamodule.tiling
    head = frozen / json.loads((frozen / "results.json").read_text())["iterations"][0]["checkpoint"]
    splits = built.model.splits
    args = [
        "--seed_everything",
        str(seed),
        "--model=EndToEndMIL",
        "--model.embedder=PatchEmbedder",
        "--model.embedder.backbone=resnet18",
        "--model.embedder.truncate_after=layer2",
        f"--model.embedder.weights={frozen / 'iter0' / 'embedder.pt'}",
        "--model.aggregator=ABMIL",
        "--model.aggregator.in_dim=128",
        f"--model.head={head}",
        "--model.chunk_size=128",
        "--model.lr=5e-4",
        "--model.embedder_lr=1e-4",
        "--model.weight_decay=1e-4",
        "--model.gradient_clip_val=5.0",
        "--data=SlideBagDataModule",
        f"--data.labels={Path(data.labels).resolve()}",
        f"--data.slides={Path(data.slides).resolve()}",
        f"--data.tiling.mpp={tiling.mpp}",
        f"--data.tiling.patch_size={tiling.patch_size}",
        f"--data.tiling.tissue_threshold={tiling.tissue_threshold}",
        f"--data.grid_cache={Path(data.grid_cache).resolve()}",
        "--data.read_threads=2",
        f"--data.splits.folds={splits.folds}",
        f"--data.splits.fold={splits.fold}",
        f"--data.splits.val_fraction={splits.val_fraction}",
        f"--data.splits.seed={seed}",
        f"--trainer.max_epochs={epochs}",
        "--trainer.accelerator=auto",
        "--trainer.enable_progress_bar=false",
        '--trainer.callbacks=[{"class_path": "EarlyStopping", "init_args": {"monitor": "val/loss", "patience": 2}}]',
        f"--trainer.default_root_dir={run}",
        f"--trainer.logger.init_args.save_dir={run}",
        *extra,
    ]
    start = time.perf_counter()
    fitted = cli(["fit", *args])
    seconds = time.perf_counter() - start
    folder = next(run.rglob("results.json")).parent
    result = json.loads((folder / "results.json").read_text())["iterations"][0]
    model = fitted.model
    model.load_state_dict(torch.load(folder / result["checkpoint"], weights_only=False)["state_dict"])
    probe, instance = _patch_measures(model, data, json.loads((folder / "splits.json").read_text()))
    return {
        "test": result["test"]["auroc"],
        "val": result["val"]["auroc"],
        "probe": probe,
        "instance": instance,
        "seconds": seconds,
        "baseline_seconds": json.loads((frozen / "bench.json").read_text())["baseline_seconds"],
    }


@torch.no_grad()
def _patch_measures(model, data, splits: dict) -> tuple[float, float]:
    """The end-to-end model's probe AUROC (its embedder) and instance AUROC (its head per patch)."""
    data.prepare_data()
    data.setup()
    model.eval()
    features, truth = {}, {}
    for name in ("train", "test"):
        slides = [s for s in data.slide_patches if s.slide_id in set(splits[name])]
        loader = torch.utils.data.DataLoader(PatchDataset(slides), batch_size=256)
        features[name] = torch.cat([model.embedder(b["image"]).float() for b in loader])
        truth[name] = np.concatenate(
            [
                annotations_of(data.slide_annotations, s.slide_id).patch_truth(s.grid.coords, s.grid.level0_size)
                for s in slides
            ]
        )
    probe = linear_probe_auroc(features["train"].numpy(), truth["train"], features["test"].numpy(), truth["test"])
    logits = model.aggregator.instance_logits(model.normalize(features["test"])).float()
    margin = logits[:, -1] - logits[:, :-1].logsumexp(-1)
    return probe, float(roc_auc_score(truth["test"], margin.numpy()))


def oracle(config: Path, seed: int, ssl: Path | None, out: Path, overrides: list[str]) -> dict:
    """`bench_difficulty.py`'s measures for the seed, from its last line (all it printed: difficulty.txt)."""
    cached = out / "difficulty.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_difficulty.py"), "--config", str(config)]
    command += ["--seed", str(seed), *(["--weights", str(ssl)] if ssl else []), *overrides]
    printed = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    out.mkdir(parents=True, exist_ok=True)
    (out / "difficulty.txt").write_text(printed)
    last = printed.strip().splitlines()[-1]
    found = dict(zip(*[iter(last.removeprefix("difficulty: ").split())] * 2, strict=True))
    result = {k: None if v == "-" else float(v) for k, v in found.items()}
    cached.write_text(json.dumps(result))
    return result


def report(rows: dict[str, dict[int, dict]], difficulty: dict | None) -> None:
    seeds = sorted({k for by_seed in rows.values() for k in by_seed})
    best = {
        k: max((rows[a][k] for a in ("frozen", "frozen ssl") if k in rows.get(a, {})), key=lambda r: r["test"])
        for k in seeds
    }
    print("\nmean [95 % interval] over seeds; d = paired difference to the best frozen baseline of the seed")
    print(
        f"{'arm':<20s} {'seeds':>5s}"
        + "".join(f" {m + ' AUROC':>22s} {'d ' + m:>23s}" for m in MEASURES)
        + f" {'room closed':>22s} {'x baseline':>10s}"
    )
    ceiling = difficulty["oracle"] if difficulty and difficulty.get("oracle") is not None else float("nan")
    for arm, by_seed in rows.items():
        ks = [k for k in seeds if k in by_seed]
        if not ks:
            continue
        line = f"{arm:<20s} {len(ks):5d}"
        for m in MEASURES:
            line += f" {mean_interval([by_seed[k][m] for k in ks])!s:>22s}"
            line += f" {mean_interval([by_seed[k][m] - best[k][m] for k in ks])!s:>23s}"
        share = [(by_seed[k]["probe"] - best[k]["probe"]) / max(ceiling - best[k]["probe"], 1e-9) for k in ks]
        cost = [by_seed[k]["seconds"] / by_seed[k]["baseline_seconds"] for k in ks]
        print(line + f" {mean_interval(share)!s:>22s} {np.mean(cost):10.2f}")
    print("\nper seed: slide test AUROC (the best frozen baseline marked *)")
    for arm, by_seed in rows.items():
        cells = [f"s{k}: {by_seed[k]['test']:.3f}{'*' if by_seed[k] is best[k] else ''}" for k in seeds if k in by_seed]
        print(f"{arm:<20s} " + "  ".join(cells))
    if difficulty:
        print(
            "\ndifficulty (bench_difficulty.py, the oracle's seed): "
            + " ".join(f"{n} {v}" for n, v in difficulty.items())
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--ssl", type=Path, help="the SSL-pretrained embedder's weights (the ssl arms)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[5], help="N (seeds 0 .. N-1), or a list of seeds")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_verdict")
    parser.add_argument("--e2e-epochs", type=int, default=12)
    parser.add_argument("--oracle-seed", type=int, default=0, help="the split the oracle is measured on")
    parser.add_argument("--resume", action="store_true", help="keep finished arms in --out")
    parser.add_argument("--report", action="store_true", help="only print the table of the finished arms in --out")
    args, overrides = parser.parse_known_args()
    seeds = range(args.seeds[0]) if len(args.seeds) == 1 else args.seeds
    arms = [a for a in args.arms if args.ssl or ARMS[a][1] != "ssl"]
    rows: dict[str, dict[int, dict]] = {arm: {} for arm in arms}
    cached = args.out / "difficulty.json"
    if args.report:
        difficulty = json.loads(cached.read_text()) if cached.is_file() else None
    else:
        difficulty = oracle(args.config, args.oracle_seed, args.ssl, args.out, overrides)
    for seed in seeds:
        folder = args.out / f"seed{seed}"
        for arm in arms:
            run = folder / arm.replace(" ", "_")
            finished = run / "bench.json"
            if finished.is_file() and (args.resume or args.report):
                rows[arm][seed] = json.loads(finished.read_text())
                continue
            if args.report:
                continue
            kind, start, extra = ARMS[arm]
            frozen = folder / ("frozen_ssl" if start == "ssl" else "frozen")
            if kind == "e2e":
                row = e2e_arm(run, frozen, args.config, seed, args.e2e_epochs, extra, overrides)
            else:
                weights = (
                    [f"--model.init_args.embedder.init_args.weights={args.ssl.resolve()}"] if start == "ssl" else []
                )
                copied = frozen if kind == "icmil" and (frozen / "bench.json").is_file() else None
                row = icmil_arm(run, args.config, seed, int(kind == "icmil"), [*weights, *overrides, *extra], copied)
            finished.write_text(json.dumps(row, indent=1))
            rows[arm][seed] = row
    report(rows, difficulty)


if __name__ == "__main__":
    main()
