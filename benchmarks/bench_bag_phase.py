"""The bag phase's framework cost: `BagClassifier` fitted through Lightning on cached features, against a plain
PyTorch loop over the same features doing the same work.

Both train the same gated ABMIL (seeded alike) with Adam for `--epochs` epochs, one bag per step, validate every epoch
(slide AUROC) and keep the best epoch's weights in a file. The plain loop reads every bag once into memory, as a
hand-written loop would; ours reads them through `FeatureBagDataModule` as a run does, and writes what a run writes
(best and last checkpoints, CSV metrics, predictions and results are left to the test stage, not timed here). Bags are
synthetic features written as CLAM-style `.h5` (`--instances` patches of `--dim` features, label in a few dimensions).
Each size runs in this process, `--repeats` rounds of: the plain loop, the same loop as a bare LightningModule (no data
module, callbacks, logger or metric objects: Lightning's own cost), ours reading every bag from its files each epoch
(`keep_in_memory_gb: 0`), ours keeping the bags after their first read (the default). The figures are the medians of
the rounds' ratios to the plain loop of the same round (target <= 1.3x): this machine's speed drifts by up to 2x over
minutes, so only times taken side by side compare.

    python benchmarks/bench_bag_phase.py [--bags 64 1000] [--epochs 20] [--repeats 3] [--instances 118] [--dim 128]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from sklearn.metrics import roc_auc_score

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from data_modules.datasets.feature_bags import FeatureBagDataModule  # noqa: E402 - imported before any timing
from icmil_pl.bag_classifier import BagClassifier  # noqa: E402


def write_bags(folder: Path, n: int, instances: int, dim: int, seed: int = 0) -> Path:
    """`n` bags as `<slide>.h5` and a labels.csv with fixed splits (60 % train, 20 % val, 20 % test)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n):
        label = k % 2
        features = rng.normal(size=(instances, dim)).astype(np.float32)
        if label:
            features[: max(1, instances // 10), :4] += 1.5  # a few positive instances
        with h5py.File(folder / f"bag_{k:05d}.h5", "w") as fh:
            fh["features"] = features
            fh["coords"] = np.stack([np.arange(instances) * 64, np.zeros(instances)], 1).astype(np.int64)
        split = "train" if k % 5 < 3 else "val" if k % 5 == 3 else "test"
        rows.append({"slide_id": f"bag_{k:05d}", "label": label, "split": split})
    with (folder / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["slide_id", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


def aggregator(dim: int):
    from icmil_pl.aggregators import ABMIL

    torch.manual_seed(0)
    return ABMIL(dim, 2)


def read_bags(folder: Path) -> tuple[dict[str, torch.Tensor], list[dict], list[dict]]:
    """Every bag in memory, as a hand-written loop would hold them; the training and validation rows."""
    with (folder / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    bags = {}
    for row in rows:
        with h5py.File(folder / f"{row['slide_id']}.h5", "r") as fh:
            bags[row["slide_id"]] = torch.from_numpy(fh["features"][:])
    return bags, [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "val"]


def plain(folder: Path, epochs: int, dim: int, out: Path) -> float:
    """The hand-written loop; returns its wall seconds."""
    start = time.perf_counter()
    bags, train, val = read_bags(folder)
    model = aggregator(dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4, weight_decay=1e-4)
    best = -1.0
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        for i in torch.randperm(len(train), generator=generator).tolist():
            logits = model(bags[train[i]["slide_id"]]).logits
            loss = F.cross_entropy(logits[None], torch.tensor([int(train[i]["label"])]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            scores = [torch.softmax(model(bags[r["slide_id"]]).logits, -1)[1].item() for r in val]
        auroc = roc_auc_score([int(r["label"]) for r in val], scores)
        if auroc > best:
            best = auroc
            torch.save(model.state_dict(), out / "best.pt")
    return time.perf_counter() - start


class _Bare(pl.LightningModule):
    """The plain loop's work as a LightningModule and nothing more (no data module, callbacks, logging or
    metrics objects): what Lightning's own loop costs."""

    def __init__(self, dim: int, out: Path) -> None:
        super().__init__()
        self.model, self.out, self.best = aggregator(dim), out, -1.0
        self.automatic_optimization = False
        self.scores: list[tuple[float, int]] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        features, label = batch
        loss = F.cross_entropy(self.model(features).logits[None], label.view(1))
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        features, label = batch
        self.scores.append((torch.softmax(self.model(features).logits, -1)[1].item(), int(label)))

    def on_validation_epoch_end(self) -> None:
        scores, labels = zip(*self.scores, strict=True)
        self.scores = []
        auroc = roc_auc_score(labels, scores)
        if auroc > self.best:
            self.best = auroc
            torch.save(self.model.state_dict(), self.out / "best.pt")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=2e-4, weight_decay=1e-4)


def bare(folder: Path, epochs: int, dim: int, out: Path) -> float:
    """`_Bare` fitted by a Trainer with everything optional off; returns its wall seconds."""
    start = time.perf_counter()
    bags, train, val = read_bags(folder)

    def loader(rows: list[dict], shuffle: bool) -> torch.utils.data.DataLoader:
        items = [(bags[r["slide_id"]], torch.tensor(int(r["label"]))) for r in rows]
        return torch.utils.data.DataLoader(items, batch_size=None, shuffle=shuffle)

    out.mkdir(parents=True, exist_ok=True)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(_Bare(dim, out), loader(train, True), loader(val, False))
    return time.perf_counter() - start


def ours(folder: Path, epochs: int, dim: int, out: Path, keep_gb: float) -> float:
    """`BagClassifier` through Lightning as a two-stage fit runs it, bags kept in memory up to `keep_gb` after their
    first read (0: read from the files every epoch); returns its wall seconds."""
    start = time.perf_counter()
    pl.seed_everything(0, verbose=False)
    model = BagClassifier(aggregator(dim), lr=2e-4, weight_decay=1e-4, figures=False)
    data = FeatureBagDataModule(str(folder / "labels.csv"), str(folder), keep_in_memory_gb=keep_gb)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(out, name="logs"),
        default_root_dir=out,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bags", type=int, nargs="+", default=[64, 1000])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--instances", type=int, default=118)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    print(
        f"epochs={args.epochs} instances={args.instances} dim={args.dim} threads={torch.get_num_threads()} "
        f"repeats={args.repeats} (medians)"
    )
    print(f"{'bags':>6} {'plain s':>9} {'bare Lightning':>18} {'ours, read every epoch':>24} {'ours, bags kept':>18}")
    for n in args.bags:
        times: dict[str, list[float]] = {"plain": [], "bare": [], "read": [], "kept": []}
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_bags(Path(tmp) / "bags", n, args.instances, args.dim)
            for r in range(args.repeats):
                times["plain"].append(plain(folder, args.epochs, args.dim, Path(tmp)))
                times["bare"].append(bare(folder, args.epochs, args.dim, Path(tmp) / f"bare{r}"))
                for name, keep_gb in (("read", 0.0), ("kept", 4.0)):
                    times[name].append(ours(folder, args.epochs, args.dim, Path(tmp) / f"{name}{r}", keep_gb))
        a = np.median(times["plain"])
        med = {k: np.median(times[k]) for k in ("bare", "read", "kept")}
        ratio = {k: np.median(np.array(times[k]) / np.array(times["plain"])) for k in ("bare", "read", "kept")}
        cells = [f"{med[k]:>{w}.2f} s {ratio[k]:>6.2f}x" for k, w in (("bare", 8), ("read", 14), ("kept", 8))]
        print(f"{n:>6} {a:>9.2f} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
