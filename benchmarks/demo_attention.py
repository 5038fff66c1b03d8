"""Does the demo's attention find the tumour? Patch-level ground truth on the test split of a finished demo run.

For every tumour slide of the test split: its patches n, its tumour patches k (at least half the patch inside the
generated tumour mask), how many of the k most attended patches are tumour patches, and how many k random patches
would be (k * k / n). Needs `make demo`, then `python -m icmil_pl predict -c runs/demo/config.yaml`.

    python benchmarks/demo_attention.py [--run runs/demo] [--cohort data/demo]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from data_modules.annotations import locate_annotations, read_annotations
from data_modules.cohort import read_labels
from data_modules.io import safe_name
from icmil_pl.outputs.patch_scores import read_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--cohort", type=Path, default=Path("data/demo"))
    args = parser.parse_args()
    test = set(json.loads((args.run / "splits.json").read_text())["test"])
    predict = args.run / "final" / "predict"
    with (predict / "predictions.csv").open() as fh:
        predicted = {row["slide_id"]: row["predicted"] for row in csv.DictReader(fh)}
    labels = args.cohort / "labels.csv"
    truths = {s: read_annotations(f) for s, f in locate_annotations(read_labels(labels), labels).items()}
    print(f"{'slide':10s} {'predicted':>9s} {'n':>4s} {'k':>4s} {'top-k hits':>10s} {'chance':>6s}")
    hits_total = chance_total = 0.0
    tumour = sorted(s for s in test if not truths[s].tumour.is_empty)
    for slide_id in tumour:
        scores = read_scores(predict, safe_name(slide_id))
        coords, attention = scores.coords, scores.scores
        truth = truths[slide_id].patch_truth(coords, scores.patch_side)
        n, k = len(truth), int(truth.sum())
        hits = int(truth[np.argsort(-attention, kind="stable")[:k]].sum())
        hits_total, chance_total = hits_total + hits, chance_total + k * k / n
        print(f"{slide_id:10s} {predicted[slide_id]:>9s} {n:4d} {k:4d} {hits:10d} {k * k / n:6.1f}")
    print(
        f"\nall {len(tumour)} test tumour slides: {hits_total:.0f} top-k hits, "
        f"{chance_total:.1f} by chance ({hits_total / chance_total:.2f}x)"
    )


if __name__ == "__main__":
    main()
