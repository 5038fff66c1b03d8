"""The bag classifier's manual optimization: what it logs per epoch equals what each step computed, its validation
metrics are those of all the epoch's bags, and a trainer's gradient clipping reaches the module."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from data_modules.datasets.feature_bags import FeatureBagDataModule
from helpers import write_labels
from icmil_pl.aggregators import ABMIL
from icmil_pl.bag_classifier import BagClassifier
from icmil_pl.cli import main
from icmil_pl.slide_task import take_trainer_clipping


@pytest.fixture
def bags(tmp_path):
    """16 bags of 8-d features (the label shifts the first dimension), 10 train / 3 val / 3 test."""
    rng = np.random.default_rng(0)
    rows = []
    (tmp_path / "feats").mkdir()
    for i in range(16):
        features = rng.normal(size=(6 + i % 5, 8)).astype(np.float32)
        features[:, 0] += i % 2
        with h5py.File(tmp_path / "feats" / f"s{i}.h5", "w") as fh:
            fh["features"] = features
        rows.append((f"s{i}", i % 2, f"p{i}", "train" if i < 10 else "val" if i < 13 else "test"))
    labels = write_labels(tmp_path / "labels.csv", rows, ("slide_id", "label", "patient_id", "split"))
    return labels, tmp_path / "feats"


class _Recording(BagClassifier):
    """The gradient norm of each optimizer step, after clipping."""

    norms: list[float]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        grads = [p.grad.norm() for p in self.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack(grads))))


class _Steps(pl.Callback):
    """The loss each training step returned."""

    def __init__(self) -> None:
        self.losses: list[list[float]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.losses.append([])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if outputs:  # {} while a step's bags gather
            self.losses[-1].append(float(outputs["loss"]))


def _fit(bags, tmp_path, epochs=2, **model_kwargs):
    labels, feats = bags
    torch.manual_seed(0)
    model = _Recording(ABMIL(8, 2, hidden_dim=16, attention_dim=8), lr=1e-2, figures=False, **model_kwargs)
    model.norms = []
    data = FeatureBagDataModule(str(labels), str(feats))
    steps = _Steps()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        callbacks=[steps],
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path / "fit"),
    )
    trainer.fit(model, data)
    return model, data, trainer, steps


def test_the_epoch_loss_is_the_mean_of_the_steps_and_validation_covers_every_bag(bags, tmp_path):
    model, data, trainer, steps = _fit(bags, tmp_path)
    assert [len(epoch) for epoch in steps.losses] == [10, 10]  # one optimizer step per bag
    metrics = trainer.callback_metrics
    assert float(metrics["train/loss"]) == pytest.approx(np.mean(steps.losses[-1]), rel=1e-5)
    model.eval()
    outs, targets, losses = [], [], []
    with torch.no_grad():
        for item in data.dataset("val"):
            logits = model.aggregator(model.normalize(item["features"])).logits
            outs.append(torch.softmax(logits, -1)[1].item())
            targets.append(int(item["label"]))
            losses.append(F.cross_entropy(logits[None], item["label"].long().view(1)).item())
    assert float(metrics["val/loss"]) == pytest.approx(np.mean(losses), rel=1e-5)
    assert float(metrics["val/auroc"]) == pytest.approx(roc_auc_score(targets, outs))


def test_bags_per_step_steps_once_per_group_of_bags(bags, tmp_path):
    model, _, _, steps = _fit(bags, tmp_path, epochs=1, bags_per_step=4)
    assert len(steps.losses[0]) == 3 and len(model.norms) == 3  # 4 + 4 + the epoch's last 2


def test_gradient_clipping_bounds_the_bag_classifiers_steps(bags, tmp_path):
    free = _fit(bags, tmp_path / "free", epochs=1)[0]
    assert min(free.norms) > 1e-3
    clipped = _fit(bags, tmp_path / "clipped", epochs=1, gradient_clip_val=1e-3)[0]
    assert clipped.norms == pytest.approx([1e-3] * 10, rel=1e-3)


def test_the_trainer_settings_a_manual_optimization_takes_over():
    model = BagClassifier(ABMIL(8, 2))
    kwargs = {"gradient_clip_val": 5.0, "max_epochs": 3}
    take_trainer_clipping(model, kwargs)
    assert kwargs == {"max_epochs": 3} and model.gradient_clip_val == 5.0
    with pytest.raises(ValueError, match=r"^gradient_clip_val: the trainer says 1.0, the model 5.0; set one$"):
        take_trainer_clipping(model, {"gradient_clip_val": 1.0})
    with pytest.raises(ValueError, match=r"^trainer.gradient_clip_algorithm: expected 'norm'"):
        take_trainer_clipping(model, {"gradient_clip_algorithm": "value"})
    with pytest.raises(ValueError, match=r"^trainer.accumulate_grad_batches: expected 1 \(set the model's bags_per"):
        take_trainer_clipping(model, {"accumulate_grad_batches": 4})


def test_the_cli_hands_the_trainers_clipping_to_the_model(bags, tmp_path):
    labels, feats = bags
    cli = main(
        [
            "--model=BagClassifier",
            "--model.aggregator=ABMIL",
            "--model.aggregator.in_dim=8",
            "--model.figures=false",
            "--data=FeatureBagDataModule",
            f"--data.labels={labels}",
            f"--data.features={feats}",
            "--trainer.gradient_clip_val=2.5",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
        ],
        run=False,
    )
    assert cli.model.gradient_clip_val == 2.5 and cli.trainer.gradient_clip_val is None
