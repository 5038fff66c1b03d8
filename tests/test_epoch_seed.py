import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from icmil_pl.callbacks import EpochSeed


class _Dropout(pl.LightningModule):
    """A linear model trained through dropout under a cosine schedule: every epoch draws random numbers."""

    def __init__(self, crash_at: int | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.dropout = torch.nn.Dropout(0.5)
        self.crash_at = crash_at

    def training_step(self, batch, batch_idx):
        if self.current_epoch == self.crash_at:
            raise RuntimeError("killed")
        return self.dropout(self.layer(batch[0])).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/score", -self.layer(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=0.1)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 4)}


def _fit(root, crash_at=None, ckpt_path=None) -> torch.Tensor:
    pl.seed_everything(0, verbose=False)
    model = _Dropout(crash_at)
    data = DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=4)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[EpochSeed(0), ModelCheckpoint(dirpath=root, monitor="val/score", mode="max", save_last=True)],
    )
    trainer.fit(model, data, data, ckpt_path=ckpt_path)
    return model.layer.weight.detach().clone()


@pytest.mark.parametrize("killed_in", [1, 2])
def test_a_run_resumed_from_its_last_checkpoint_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, killed_in):
    uninterrupted = _fit(tmp_path / "a")
    with pytest.raises(RuntimeError, match="killed"):
        _fit(tmp_path / "b", crash_at=killed_in)
    resumed = _fit(tmp_path / "b", ckpt_path=tmp_path / "b" / "last.ckpt")
    assert torch.equal(resumed, uninterrupted)
