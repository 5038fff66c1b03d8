"""predict's time per slide: the slide outputs it writes (heatmap and patch figures, scores.zarr, QuPath GeoJSON)
against the model's work alone, on one finished ICMIL run.

The run is the tiny test configuration (`tests/conf/icmil.yaml`, bag phase only) on `--slides` synthetic slides of
1024 px; predict then runs twice in this process on its final model: with `figures: false` (the embedding of every
patch, the bag head, predictions.csv) and with the figures. The difference per slide is what the outputs cost.

    python benchmarks/bench_predict.py [--slides 12]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=12)
    args = parser.parse_args()
    from dataclasses import replace

    from data_modules.synthetic import make_cohort
    from helpers import ICMIL_COHORT, icmil_args
    from icmil_pl.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        cohort = make_cohort(Path(tmp) / "cohort", replace(ICMIL_COHORT, n_slides=args.slides))
        out = Path(tmp) / "out"
        cli(icmil_args(cohort, out, "fit", "--model.init_args.iterations=0"))
        config = ["-c", str(out / "run" / "config.yaml")]
        seconds = {}
        for figures in ("false", "true"):
            start = time.perf_counter()
            cli(["predict", *config, f"--model.init_args.bag.init_args.figures={figures}"])
            seconds[figures] = time.perf_counter() - start
    plain, drawn = seconds["false"] / args.slides, seconds["true"] / args.slides
    print(f"\npredict per slide ({args.slides} slides): model only {plain:.2f} s, with the outputs {drawn:.2f} s")
    print(f"the outputs cost {drawn - plain:.2f} s a slide, {drawn / plain:.2f}x the model's work")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
