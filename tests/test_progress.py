"""Progress without a progress bar: long stages print where they are, short ones stay quiet."""

from __future__ import annotations

import re

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from icmil_pl.callbacks import ProgressLog


class _Linear(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def predict_step(self, batch, batch_idx):
        return self.layer(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(callback: ProgressLog) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )


def test_a_long_stage_prints_its_progress_and_a_short_one_stays_quiet(capsys):
    data = DataLoader(TensorDataset(torch.ones(5, 2)), batch_size=1)
    _trainer(ProgressLog("final/predict", every_s=0.0)).predict(_Linear(), data)
    lines = capsys.readouterr().out.splitlines()
    assert [re.sub(r" \(\d+ s\)$", "", line) for line in lines] == [
        *(f"final/predict predicting: batch {k}/5" for k in range(1, 6)),
        "final/predict predicting: done",
    ]
    _trainer(ProgressLog("iter0/bag", every_s=0.0)).fit(_Linear(), data)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:6] == [
        *(f"iter0/bag training: epoch 1/2, batch {k}/5 (0 s)" for k in range(1, 6)),
        "iter0/bag training: epoch 1/2 (0 s)",
    ]
    assert lines[-2] == "iter0/bag training: epoch 2/2 (0 s)"
    assert lines[-1].startswith("iter0/bag training: done")
    _trainer(ProgressLog("iter0/bag")).predict(_Linear(), data)  # under 30 s: nothing to report
    assert capsys.readouterr().out == ""
