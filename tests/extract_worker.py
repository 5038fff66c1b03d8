"""One extraction process of a job array, run by `test_job_array.py` as several subprocesses on one cache: it waits
for a `go` file (so that all start together, past their imports), embeds at a set pace, and may kill itself mid-run
(SIGKILL, as a scheduler or the OOM killer does)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytorch_lightning as pl

from data_modules.datasets.patches import SlidePatchDataModule
from data_modules.slides.tiling import TilingConfig
from icmil_pl.callbacks import extract_features
from icmil_pl.encoders import PatchEmbedder


class Pace(pl.Callback):
    """Sleeps `delay` seconds after each batch; kills the process as batch `die_at` arrives (0: never)."""

    def __init__(self, delay: float, die_at: int) -> None:
        self.delay, self.die_at, self.batches = delay, die_at, 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.batches += 1
        if self.batches == self.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self.delay)


def extract(cohort: Path, cache_root: Path, grids: Path, delay: float = 0.0, die_at: int = 0, **data) -> Path:
    """The test's extraction: a random-init ResNet-18 cut after layer1 (seeded: the same weights in every process),
    64 px patches at 0.5 um/px."""
    pl.seed_everything(0, verbose=False)
    embedder = PatchEmbedder("resnet18", truncate_after="layer1")
    tiling = TilingConfig(mpp=0.5, patch_size=64, tissue_threshold=0.5)
    module = SlidePatchDataModule(
        str(cohort / "labels.csv"), str(cohort / "slides"), tiling, str(grids), batch_size=32, num_workers=0, **data
    )
    trainer = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "callbacks": [Pace(delay, die_at)]}
    return extract_features(embedder, module, str(cache_root), dtype="float32", trainer_kwargs=trainer).path


if __name__ == "__main__":
    cohort, cache_root, grids, go = map(Path, sys.argv[1:5])
    delay, die_at = float(sys.argv[5]), int(sys.argv[6])
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.01)
    extract(cohort, cache_root, grids, delay, die_at)
