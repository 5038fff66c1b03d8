"""A phase's checkpoints: the latest epoch saved every epoch, each file written whole or not at all (a full disk names
the checkpoint and keeps the one before), the best epoch's ties broken on the validation loss, a damaged `last.ckpt`
set aside so the phase starts over, and a diverging phase stopped before it keeps non-finite weights."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import lightning_fabric.plugins.io.torch_io as torch_io
import pytest
import torch

from helpers import icmil_args
from icmil_pl.__main__ import message
from icmil_pl.bag_classifier import BagClassifier
from icmil_pl.cli import main

BAG_ONLY = "--model.init_args.iterations=0"  # embed and the bag phase (3 epochs): the phases that checkpoint


def _fit(cohort: Path, out: Path, *extra: str) -> dict:
    main(icmil_args(cohort, out, "fit", BAG_ONLY, *extra))
    return json.loads((out / "run" / "results.json").read_text())


def _checkpoints(out: Path) -> Path:
    return out / "run" / "iter0" / "bag" / "checkpoints"


@pytest.fixture(scope="module")
def uninterrupted(icmil_cohort, tmp_path_factory) -> dict:
    return _fit(icmil_cohort, tmp_path_factory.mktemp("uninterrupted"))


def _kill_in_epoch(monkeypatch, epoch: int) -> None:
    original = BagClassifier.training_step

    def crash(self, batch, batch_idx):
        if self.current_epoch == epoch:
            raise RuntimeError("killed")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(BagClassifier, "training_step", crash)


def _metrics(results: dict) -> list:
    return [{k: it[k] for k in ("val", "test")} for it in results["iterations"]]


def test_last_ckpt_is_the_latest_epoch_not_the_last_improvement(icmil_cohort, tmp_path, monkeypatch):
    """Lightning's `save_last` writes last.ckpt only when a best checkpoint is written: a kill after the last
    improvement resumed from there. Here it holds the epoch before the kill, whichever was best."""
    _kill_in_epoch(monkeypatch, 2)
    monkeypatch.setattr(BagClassifier, "validation_step", lambda self, batch, i: self.log("val/auroc", 0.5))
    with pytest.raises(RuntimeError, match="killed"):
        _fit(icmil_cohort, tmp_path)
    folder = _checkpoints(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["best-epoch=0.ckpt", "last.ckpt"]  # epoch 1 did not improve
    assert torch.load(folder / "last.ckpt", weights_only=False)["epoch"] == 1


def test_a_full_disk_names_the_checkpoint_keeps_the_last_one_and_the_rerun_resumes(
    icmil_cohort, tmp_path, monkeypatch, uninterrupted
):
    """A write cut short by a full disk used to leave a truncated last.ckpt (every resume then died in torch's zip
    reader) and name a temporary file; now the previous last.ckpt stays whole and the run continues from it."""
    write = torch_io._atomic_save
    epochs = []

    def full_disk(checkpoint: dict, path) -> None:
        epochs.append(checkpoint["epoch"])
        if checkpoint["epoch"] == 1 and "last" in Path(path).name:
            Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        write(checkpoint, path)

    monkeypatch.setattr(torch_io, "_atomic_save", full_disk)
    with pytest.raises(OSError) as failed:
        _fit(icmil_cohort, tmp_path)
    last = _checkpoints(tmp_path) / "last.ckpt"
    assert message(failed.value) == (
        f"error: {last}: could not write this checkpoint (No space left on device); the one before is kept"
    )
    assert torch.load(last, weights_only=False)["epoch"] == 0
    assert sorted(p.name for p in last.parent.iterdir() if "partial" in p.name) == []
    monkeypatch.setattr(torch_io, "_atomic_save", write)
    assert _metrics(_fit(icmil_cohort, tmp_path)) == _metrics(uninterrupted)


def test_a_damaged_last_ckpt_is_set_aside_and_the_phase_starts_over(
    icmil_cohort, tmp_path, monkeypatch, capsys, uninterrupted
):
    _kill_in_epoch(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="killed"):
        _fit(icmil_cohort, tmp_path)
    monkeypatch.undo()
    last = _checkpoints(tmp_path) / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # a write cut short, as versions that wrote in place left it
    assert _metrics(_fit(icmil_cohort, tmp_path)) == _metrics(uninterrupted)
    aside = last.parent.with_name("checkpoints.damaged")
    assert f"{last}: damaged (not a whole checkpoint); moved to {aside}" in capsys.readouterr().out
    assert (aside / "last.ckpt").stat().st_size == 1000 and (last.parent / "last.ckpt").is_file()


@pytest.mark.parametrize(
    ("lr", "what"),
    [("1e25", r"the training loss is nan"), ("1e12", r"the training loss is \S+, over 1e\+06 times its first, \S+,")],
)
def test_a_diverging_bag_phase_stops_naming_the_phase_epoch_and_learning_rate(icmil_cohort, tmp_path, lr, what):
    """lr 1e25 used to train on NaN, keep NaN weights as the best checkpoint and end with `Input contains NaN.`;
    lr 1e12 ended with exit 0 and AUROC 0.5 on losses of 1e27."""
    rate = lr.replace("e", r"e\+")
    with pytest.raises(ValueError, match=rf"^iter0/bag: {what} at epoch 0 \(learning rate {rate}\)"):
        _fit(icmil_cohort, tmp_path, f"--model.init_args.bag.init_args.lr={lr}")
    folder = _checkpoints(tmp_path)
    assert not folder.exists() or not list(folder.iterdir())


def _scripted_fit(tmp_path: Path, auroc: list[float], loss: list[float], state: dict | None = None):
    """A phase of one parameter whose validation logs a scripted metric and loss per epoch."""
    import pytorch_lightning as pl

    from icmil_pl.callbacks.checkpoints import best_checkpoint

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, i):
            return (self.w - 1).pow(2).sum()

        def validation_step(self, batch, i):
            self.log("val/auroc", auroc[self.current_epoch])
            self.log("val/loss", loss[self.current_epoch])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    checkpoint = best_checkpoint(tmp_path, "val/auroc", "max")
    if state is not None:
        checkpoint.load_state_dict(state)
    data = torch.utils.data.DataLoader(torch.zeros(1, 1))
    trainer = pl.Trainer(
        max_epochs=len(auroc),
        callbacks=[checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Module(), data, data)
    return checkpoint


@pytest.mark.parametrize(
    "auroc, loss, best",
    [
        ([0.9, 1.0, 1.0, 1.0, 0.95], [0.5, 0.3, 0.1, 0.2, 0.01], 2),  # a saturated metric: the lowest loss on it
        ([1.0, 1.0, 1.0], [0.169, 0.01, 8e-5], 2),  # saturated from epoch 0, the loss still falling
        ([0.8, 0.9, 0.9], [0.1, 0.3, 0.2], 2),  # the metric first, the loss only among equals
        ([0.9, 0.9], [0.1, 0.1], 0),  # a full tie keeps the earlier epoch
    ],
)
def test_equal_validation_metrics_keep_the_epoch_of_lower_validation_loss(tmp_path, auroc, loss, best):
    checkpoint = _scripted_fit(tmp_path, auroc, loss)
    assert Path(checkpoint.best_model_path).name == f"best-epoch={best}.ckpt"
    assert sorted(p.name for p in tmp_path.glob("best-*.ckpt")) == [f"best-epoch={best}.ckpt"]
    assert checkpoint.best_tie.item() == pytest.approx(loss[best])


def test_a_resumed_phase_remembers_the_loss_of_its_best_epoch(tmp_path):
    """The tie-break value travels in the callback's state: after a resume an equal metric with a higher loss than
    the best epoch's does not replace it."""
    first = _scripted_fit(tmp_path, [1.0], [0.05])
    state = first.state_dict()
    assert state["best_tie"].item() == pytest.approx(0.05)
    resumed = _scripted_fit(tmp_path, [1.0, 1.0], [0.5, 0.5], state=state)  # epochs 0, 1 again, worse loss
    assert Path(resumed.best_model_path).name == "best-epoch=0.ckpt"
    assert resumed.best_tie.item() == pytest.approx(0.05)
