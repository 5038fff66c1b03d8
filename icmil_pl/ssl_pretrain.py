"""Self-supervised pretraining of a patch embedder on a cohort's unlabelled patches: what pathology groups do when no
suitable pretrained weights exist, and the start ICMIL's paper assumes (an embedder that already sees tissue)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from pytorch_lightning.utilities import rank_zero_only
from torch import Tensor

from data_modules.datasets.unlabelled_patches import UnlabelledPatchDataModule
from data_modules.io import atomic_path, check

from .callbacks import ProgressLog
from .encoders import PatchEmbedder
from .outputs.plots import probe_figure, save_png
from .patch_probes import linear_probe_auroc

__all__ = ["SSLPretrain"]


class SSLPretrain(pl.LightningModule):
    """SimCLR (Chen et al., 2020) on an `UnlabelledPatchDataModule`, with lightly's projection head and NT-Xent loss.

    Each step embeds two views of each patch of a batch, projects them (`SimCLRProjectionHead`: `hidden_dim`, then
    `projection_dim`) and pulls the two views of a patch together against every other view of the batch
    (`NTXentLoss` at `temperature`, gathered across processes under DDP). Adam at `lr`, cosine-annealed over the
    trainer's `max_epochs`. Validation: the same loss on the held-out patches, and, where the data knows each
    patch's truth (synthetic cohorts), `val/probe_auroc`: a linear probe of the embedder's features of the clean
    held-out patches, fitted on the patches of half their slides, scored on the other half; measured before training
    too (epoch -1, the initial weights). At the end, `weights` receives the embedder's state dict, which
    `PatchEmbedder(weights=...)` loads, and `<weights stem>_probe.png` plots the probe by epoch.

    The embedder's BatchNorm layers should normalise with batch statistics here (`batchnorm: train`): training from
    random weights needs them, and the running statistics they learn travel in the weights file.
    """

    def __init__(
        self,
        embedder: PatchEmbedder,
        weights: str = "runs/ssl/embedder.pt",
        projection_dim: int = 128,
        hidden_dim: int = 512,
        temperature: float = 0.2,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
    ) -> None:
        super().__init__()
        check("temperature", temperature > 0, "a float > 0", temperature)
        check("lr", lr > 0, "a float > 0", lr)
        check("weight_decay", weight_decay >= 0, "a float >= 0", weight_decay)
        self.save_hyperparameters(ignore=["embedder"])
        self.embedder = embedder
        self.projection = SimCLRProjectionHead(embedder.feature_dim, hidden_dim, projection_dim)
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=True)
        self.weights = Path(weights)
        self.probe_aurocs: list[float] = []  # epoch -1 (the initial weights), 0, 1, ...

    def _loss(self, views: list[Tensor]) -> Tensor:
        z = self.projection(self.embedder(torch.cat(views)))
        z0, z1 = z.chunk(2)
        return self.criterion(z0, z1)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self._loss(batch["views"])
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch["image"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch["views"]), on_epoch=True, batch_size=len(batch["image"]), sync_dist=True)

    def on_train_start(self) -> None:
        self._record_probe()

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            auroc = self._record_probe()
            if not math.isnan(auroc):
                self.log("val/probe_auroc", auroc)

    @torch.no_grad()
    def _record_probe(self) -> float:
        """The linear probe of the current embedder on the held-out patches (NaN without ground truth)."""
        data = self.trainer.datamodule
        truth = data.val_truth() if isinstance(data, UnlabelledPatchDataModule) else None
        auroc = float("nan")
        if truth is not None:
            labels, slide_of = truth
            training = self.embedder.training
            self.embedder.eval()
            features = np.concatenate(
                [self.embedder(batch["image"].to(self.device)).float().cpu().numpy() for batch in data.val_dataloader()]
            )
            self.embedder.train(training)
            fit = slide_of % 2 == 0
            if all(len(np.unique(labels[rows])) == 2 for rows in (fit, ~fit)):  # both halves hold both classes
                auroc = linear_probe_auroc(features[fit], labels[fit], features[~fit], labels[~fit])
        self.probe_aurocs.append(auroc)
        return auroc

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.trainer.max_epochs))
        return [optimizer], [scheduler]

    def configure_callbacks(self) -> list[pl.Callback]:
        """Progress lines when the trainer shows no bar (logs of batch jobs)."""
        return [ProgressLog("ssl pretraining")] if self.trainer.progress_bar_callback is None else []

    def on_fit_end(self) -> None:
        self._save()

    @rank_zero_only
    def _save(self) -> None:
        with atomic_path(self.weights) as tmp:
            torch.save(self.embedder.state_dict(), tmp)
        lines = [f"embedder weights: {self.weights} (--model.init_args.embedder.init_args.weights={self.weights})"]
        if any(not math.isnan(a) for a in self.probe_aurocs):
            figure = save_png(probe_figure(self.probe_aurocs), self.weights.with_name(f"{self.weights.stem}_probe.png"))
            probes = ", ".join(f"{a:.3f}" for a in self.probe_aurocs)
            lines.append(f"linear-probe patch AUROC by epoch (-1 = initial weights): {probes}; figure: {figure}")
        print("\n".join(lines))
