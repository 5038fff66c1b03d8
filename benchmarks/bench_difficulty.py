"""How much room a synthetic cohort leaves for an embedder to learn from slide labels, measured before any method runs
on it, on patch-level truth from the generator's masks (a tumour patch is at least half inside a tumour focus; benign
mimic patches are negatives).

    python benchmarks/bench_difficulty.py --config experiments/hard_cohort.yaml --seed S [--weights <ssl embedder.pt>]
        [--oracle-epochs 16] [--calibration-patches 8192] [--<config key>=<value> ...]

Other `--key=value` arguments override the config (another cohort to measure: `--data.init_args.root=data/try
--data.init_args.cohort.tumour_contrast=0.2`); `--oracle-epochs 0` skips the oracle.

- frozen: the linear-probe patch AUROC (logistic regression fitted on the training slides' patches, scored on the
  test slides') of the config's embedder as it starts, after its BatchNorm statistics are re-estimated on the training
  patches (the best frozen features without labels; what ICMIL's `reestimate_batchnorm` gives iteration 0);
- ssl: the same for the embedder with `--weights` (an SSL-pretrained start, `experiments/pretrain_ssl.yaml`);
- oracle: the same architecture trained with patch labels from the training slides' masks (class-balanced logistic
  loss, best epoch by the validation slides' patch AUROC), scored on the test slides' patches: the ceiling that slide
  labels could reach. It starts from the better of the two starts by probe (the SSL weights where they probe best), as
  the methods do: from a random start, 5,000 patches with a few hundred positives train a weaker embedder than the
  SSL start already is, and that is no ceiling.

Each measure also says where its errors are: its AUROC against each kind of negative patch alone (normal tissue,
touching neither tumour nor mimic; benign mimics, at least half inside one; tumour edges, under half inside the
tumour), with their counts.

The splits are the ICMIL run's of that seed (`--seed_everything` and the split seed). The last line is exactly
`difficulty: frozen F ssl S oracle O room R` (S is `-` without weights; R = O minus the best of F and S).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_modules.cohort.splits import make_splits  # noqa: E402
from data_modules.datasets.patches import PatchDataset  # noqa: E402
from data_modules.synthetic import patch_mimic_fraction, patch_tumour_fraction, slide_infos  # noqa: E402
from icmil_pl.cli import main as cli  # noqa: E402
from icmil_pl.encoders import PatchEmbedder, reestimated, thaw_batchnorm  # noqa: E402
from icmil_pl.patch_probes import linear_probe_scores  # noqa: E402
from icmil_pl.run_dir import phase_seed  # noqa: E402

BATCH = 256


def setup(config: Path, seed: int, overrides: list[str], weights: Path | None = None):
    """The config's ICMIL model and cohort (written on first use) for `seed`, and that seed's run splits."""
    extra = [*overrides, *([f"--model.init_args.embedder.init_args.weights={weights}"] if weights else [])]
    args = ["-c", str(config), f"--seed_everything={seed}", f"--model.init_args.splits.seed={seed}", *extra]
    built = cli(args, run=False)
    icmil, data = built.model, built.datamodule
    data.prepare_data()
    data.setup()
    rows = [row for row in data.cohort.rows if row.slide_id not in data.skipped]
    splits = make_splits(rows, icmil.splits, data.cohort.labels_path, data.cohort.targets)
    slides = {name: [s for s in data.slide_patches if s.slide_id in set(ids)] for name, ids in splits.items()}
    return icmil, data, slides


def fraction(of, slides, infos) -> np.ndarray:
    """`of` (patch_tumour_fraction or patch_mimic_fraction) over the slides' patches, in order."""
    return np.concatenate([of(infos[s.slide_id], s.grid.coords, s.grid.level0_size) for s in slides])


def truth(slides, infos) -> np.ndarray:
    """The patch truth every measurement uses: at least half inside the tumour (`tumour_patches`)."""
    return fraction(patch_tumour_fraction, slides, infos) >= 0.5


def by_negatives(scores: np.ndarray, slides, infos) -> str:
    """The AUROC of `scores` against each kind of negative patch alone, with its count."""
    tumour, mimic = fraction(patch_tumour_fraction, slides, infos), fraction(patch_mimic_fraction, slides, infos)
    positive = tumour >= 0.5
    kinds = {
        "normal tissue": (tumour == 0) & (mimic == 0),
        "mimics": (mimic >= 0.5) & ~positive,
        "tumour edges": (tumour > 0) & ~positive,
    }
    parts = [
        f"{name} {roc_auc_score(positive[positive | negative], scores[positive | negative]):.3f} ({negative.sum()})"
        for name, negative in kinds.items()
        if negative.any() and positive.any()
    ]
    return "against " + ", ".join(parts)


@torch.no_grad()
def embed(embedder: nn.Module, slides) -> np.ndarray:
    embedder.eval()
    loader = DataLoader(PatchDataset(slides), batch_size=BATCH)
    return torch.cat([embedder(batch["image"]).float() for batch in loader]).numpy()


def probe(embedder: PatchEmbedder, slides: dict, infos, seed: int, patches: int) -> np.ndarray:
    """Linear-probe scores of the test patches after BatchNorm re-estimation on the training patches (as ICMIL's
    calibrate phase)."""
    calibrated = reestimated(
        embedder, slides["train"], patches, batch_size=BATCH, seed=phase_seed(seed, 0, "calibrate")
    )
    x_train, x_test = embed(calibrated, slides["train"]), embed(calibrated, slides["test"])
    return linear_probe_scores(x_train, truth(slides["train"], infos), x_test, seed)


def oracle(embedder: PatchEmbedder, slides: dict, infos, seed: int, epochs: int, patches: int) -> np.ndarray:
    """Test patch scores of the architecture trained on patch labels (BatchNorm learning too, a cosine schedule), at
    its best validation epoch."""
    torch.manual_seed(seed)
    start = reestimated(embedder, slides["train"], patches, batch_size=BATCH, seed=phase_seed(seed, 0, "calibrate"))
    thaw_batchnorm(start.backbone)
    model = nn.Sequential(copy.deepcopy(start), nn.Linear(start.feature_dim, 1))
    data, labels = PatchDataset(slides["train"]), torch.from_numpy(truth(slides["train"], infos)).float()
    positive = float(labels.mean())
    loss_of = nn.BCEWithLogitsLoss(pos_weight=torch.tensor((1 - positive) / max(positive, 1e-6)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs))
    rng = np.random.default_rng(seed)
    best, best_scores = -1.0, None
    for epoch in range(epochs):
        model.train()
        start_time = time.perf_counter()
        order = rng.permutation(len(data))
        for k in range(0, len(order), 128):
            index = np.sort(order[k : k + 128])
            images = torch.stack([data[int(i)]["image"] for i in index])
            images = torch.rot90(images, int(rng.integers(4)), (2, 3))  # any rotation or flip is a valid view
            images = images.flip(3) if rng.random() < 0.5 else images
            loss = loss_of(model(images).squeeze(1), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
        scores = {name: _scores(model, slides[name]) for name in ("val", "test")}
        val = roc_auc_score(truth(slides["val"], infos), scores["val"])
        test = roc_auc_score(truth(slides["test"], infos), scores["test"])
        took = time.perf_counter() - start_time
        print(f"oracle epoch {epoch}: val patch AUROC {val:.3f}, test {test:.3f} ({took:.0f} s)")
        if val > best:
            best, best_scores = val, scores["test"]
    return best_scores


@torch.no_grad()
def _scores(model: nn.Module, slides) -> np.ndarray:
    model.eval()
    loader = DataLoader(PatchDataset(slides), batch_size=BATCH)
    return torch.cat([model(batch["image"]).squeeze(1).float() for batch in loader]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="an ICMIL config on a synthetic cohort")
    parser.add_argument("--seed", type=int, default=0, help="seed_everything and the split seed")
    parser.add_argument("--weights", type=Path, help="an SSL-pretrained embedder's weights (the ssl measure)")
    parser.add_argument("--oracle-epochs", type=int, default=16)
    parser.add_argument("--calibration-patches", type=int, default=8192, help="patches BatchNorm is re-estimated on")
    args, overrides = parser.parse_known_args()
    icmil, data, slides = setup(args.config, args.seed, overrides)
    infos = slide_infos(data.root)
    counts = {name: (len(s), len(truth(s, infos)), int(truth(s, infos).sum())) for name, s in slides.items()}
    print("slides, patches, tumour patches per split: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    test = truth(slides["test"], infos)

    def measured(name: str, scores: np.ndarray) -> float:
        auroc = float(roc_auc_score(test, scores))
        print(f"{name}: patch AUROC {auroc:.3f}; {by_negatives(scores, slides['test'], infos)}")
        return auroc

    patches = args.calibration_patches
    frozen = measured("frozen (linear probe)", probe(icmil.embedder, slides, infos, args.seed, patches))
    ssl, start = None, icmil.embedder
    if args.weights:
        pretrained = setup(args.config, args.seed, overrides, args.weights)[0].embedder
        ssl = measured("ssl (linear probe)", probe(pretrained, slides, infos, args.seed, patches))
        start = pretrained if ssl > frozen else start
    shown = "-" if ssl is None else f"{ssl:.3f}"
    if not args.oracle_epochs:
        print(f"difficulty: frozen {frozen:.3f} ssl {shown} oracle - room -")
        return
    scores = oracle(start, slides, infos, args.seed, args.oracle_epochs, patches)
    best = measured("oracle (best validation epoch)", scores)
    room = best - max(frozen, ssl if ssl is not None else frozen)
    print(f"difficulty: frozen {frozen:.3f} ssl {shown} oracle {best:.3f} room {room:.3f}")


if __name__ == "__main__":
    main()
