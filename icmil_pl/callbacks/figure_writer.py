"""The pictures of a test or predict run, as a callback on any `SlideTask` (bag classifier or end-to-end model).

After `test`: the task's figures (classification `figures/test_roc.png` and `test_confusion.png`; multilabel per-label
ROC `test_roc.png`; regression `test_scatter.png`; survival Kaplan-Meier `test_km.png`). After each predicted slide: its
per-patch scores with coordinates (`scores.zarr/<slide>`, see `icmil_pl.outputs.patch_scores`), its QuPath tiles
(`qupath/<slide>.geojson`, `icmil_pl.outputs.qupath`), and where the slide file is found its heatmap
(`figures/<slide>_heatmap.png`) and top/bottom patches (`figures/<slide>_patches.png`), `<slide>` being
`safe_name(slide_id)`; the slide's ground truth, where the data module found its annotations, is outlined in the
heatmap, the QuPath file and the viewer. A patient bag's slides get theirs one by one. Scores are the aggregator's
attention (every aggregator here returns one); a custom aggregator without attention gets each patch's last output on
its own (`instance_logits`: the positive-class probability, the risk, the value). Everything goes under the run's log
directory; with a W&B logger the images and a per-slide prediction table are logged too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import zarr
from pytorch_lightning.loggers import WandbLogger

from data_modules.annotations import annotations_of
from data_modules.cohort import SlideFinder
from data_modules.io import check
from data_modules.slides import open_slide

from ..outputs.patch_scores import SCORES_STORE, PatchScores, write_scores
from ..outputs.plots import grid_step, heatmap_figure, montage_figure, save_png
from ..outputs.qupath import write_geojson
from .outputs import output_dir
from .prediction_writer import PredictionWriter

__all__ = ["SLIDE_FIGURES", "FigureWriter", "resolve_figures"]

SLIDE_FIGURES = ("_heatmap.png", "_patches.png")  # figures/<slide><suffix> of every predicted slide


class FigureWriter(pl.Callback):
    """Writes the figures of `test` and `predict` (see the module docstring).

    `slides`: a folder (or list of folders) the slide files are found in as `SlideFinder` finds them, for heatmaps
    and patches (default: the data module's `slide_paths` when it has them; without slides only the scores and test
    figures are written). `top_k` patches per montage row; `thumbnail_px` the heatmap's longest side.
    """

    def __init__(self, slides: str | list[str] | None = None, top_k: int = 8, thumbnail_px: int = 1024) -> None:
        check("top_k", top_k >= 1, "an int >= 1", top_k)
        check("thumbnail_px", thumbnail_px >= 64, "an int >= 64", thumbnail_px)
        self._finder = None if slides is None else SlideFinder(slides)
        self.top_k = top_k
        self.thumbnail_px = thumbnail_px
        self._root = Path(".")  # the predict run's output folder, set in on_predict_start

    # -- test --------------------------------------------------------------------------------------------------------
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the prediction writer's epoch end, which gathered every process's rows."""
        out, rows = output_dir(trainer) / "figures", PredictionWriter.of(trainer).rows
        if not trainer.is_global_zero or not rows:
            return
        names = pl_module.class_labels
        targets = torch.stack([row["label"].float() for row in rows])
        outputs = torch.stack([row["outputs"] for row in rows])
        figures = pl_module.task.test_figures(targets, outputs, names)
        paths = [save_png(figure, out / name) for name, figure in figures.items()]
        self._log_images(trainer, "test/figures", paths)
        self._log_table(trainer, "test/predictions", rows, pl_module)

    # -- predict -----------------------------------------------------------------------------------------------------
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resolve the output folder once, on every process (`log_dir` is a collective), and create the scores store
        before the processes write their slides into it."""
        self._root = output_dir(trainer)
        if trainer.is_global_zero:
            zarr.open_group(str(self._root / SCORES_STORE), mode="a")
        trainer.strategy.barrier(SCORES_STORE)

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        coords = batch.get("coords")
        if outputs is None or coords is None or len(coords) == 0:  # None: skipped as unreadable
            return
        coords, start = coords.cpu().numpy(), 0
        for slide_id, n in outputs.get("slides") or [(outputs["slide_id"], len(coords))]:  # a patient bag: per slide
            rows = slice(start, start + n)
            start += n
            side = batch.get("patch_side")
            self._write_slide(trainer, pl_module, _slide_outputs(outputs, slide_id, rows), coords[rows], side)

    def _write_slide(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: dict,
        coords: np.ndarray,
        patch_side: float | None,
    ) -> None:
        slide_id = outputs["slide_id"]
        path = self._slide_path(trainer, slide_id)
        scores = self._patch_scores(trainer, pl_module, outputs, coords, path, patch_side)
        write_scores(self._root, scores)
        write_geojson(self._root, scores)
        if path is None:
            return
        title = pl_module.task.title(slide_id, outputs["label"], outputs["outputs"], pl_module.class_labels)
        with open_slide(path) as slide:
            w0, h0 = slide.dimensions
            thumbnail = slide.get_thumbnail((self.thumbnail_px, self.thumbnail_px))
            heatmap = heatmap_figure(
                thumbnail,
                w0 / thumbnail.shape[1],
                scores.coords,
                scores.scores,
                title,
                patch=scores.patch_side,
                label=f"{scores.kind} (percentile in slide)",
                truth=scores.truth,
            )
            montage = self._montage(slide, scores.coords, scores.scores, int(scores.patch_side), title)
        out = self._root / "figures"
        name = scores.name
        figures = zip((heatmap, montage), SLIDE_FIGURES, strict=True)
        paths = [save_png(figure, out / f"{name}{suffix}") for figure, suffix in figures]
        self._log_images(trainer, f"predict/{slide_id}", paths)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows = PredictionWriter.of(trainer).rows
        if trainer.is_global_zero and rows:
            self._log_table(trainer, "predict/predictions", rows, pl_module)

    # -- helpers -----------------------------------------------------------------------------------------------------
    def _patch_scores(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: dict,
        coords: np.ndarray,
        path: Path | None,
        patch_side: float | None,
    ) -> PatchScores:
        """Everything `scores.zarr` keeps of one predicted slide. Scores are the attention; an aggregator without one
        gets each patch's last output on its own (the positive-class probability, the risk, the value). The patch
        side is the bag's own (its tiling, or the features' attributes), guessed from the grid only for foreign
        features that do not record it."""
        task, names = pl_module.task, pl_module.class_labels
        instance = outputs["instance_outputs"].numpy()
        attention = outputs.get("attention")
        side = patch_side if patch_side is not None else _guessed_side(coords)
        dimensions = None
        if path is not None:
            with open_slide(path) as slide:
                dimensions = slide.dimensions
        return PatchScores(
            slide_id=outputs["slide_id"],
            coords=coords.astype(np.int64),
            scores=instance[:, -1] if attention is None else attention.reshape(-1).numpy(),
            kind=("patch probability" if task.probabilities == "softmax" else "patch output")
            if attention is None
            else "attention",
            probs=instance,
            classes=list(names) if task.probabilities else task.output_names(names),
            label=None if outputs["label"] is None else task.describe_target(outputs["label"], names),
            predicted=task.describe_call(outputs["outputs"], names),
            slide_probs=outputs["outputs"].reshape(-1).tolist(),
            patch_side=float(side),
            slide_path=None if path is None else str(path.resolve()),
            dimensions=dimensions,
            truth=self._truth(trainer, outputs["slide_id"]),
            task=task.kind,
        )

    def _montage(self, slide, coords: np.ndarray, scores: np.ndarray, side: int, title: str):
        order = np.argsort(-scores, kind="stable")
        k = min(self.top_k, len(order))

        def patch(i: int) -> np.ndarray:
            x, y = coords[i]
            level = slide.get_best_level_for_downsample(side / 128)
            ds = slide.level_downsamples[level]
            return slide.read_region((int(x), int(y)), level, (round(side / ds), round(side / ds)))

        top, bottom = order[:k], order[::-1][:k]
        return montage_figure([patch(i) for i in top], [patch(i) for i in bottom], scores[top], scores[bottom], title)

    def _slide_path(self, trainer: pl.Trainer, slide_id: str) -> Path | None:
        if self._finder is not None:
            return self._finder.find(slide_id)
        return getattr(trainer.datamodule, "slide_paths", {}).get(slide_id)

    @staticmethod
    def _truth(trainer: pl.Trainer, slide_id: str) -> dict | None:
        """The outline of the slide's ground truth, where the data module found its annotations."""
        found = annotations_of(getattr(trainer.datamodule, "slide_annotations", {}), slide_id)
        return None if found is None else found.outline()

    @staticmethod
    def _log_images(trainer: pl.Trainer, key: str, paths: list[os.PathLike]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=key, images=[str(p) for p in paths], caption=[Path(p).stem for p in paths])

    @staticmethod
    def _log_table(trainer: pl.Trainer, key: str, rows: list[dict], pl_module: pl.LightningModule) -> None:
        """predictions.csv's rows as a W&B table."""
        task, names = pl_module.task, pl_module.class_labels
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                data = [
                    [
                        r["slide_id"],
                        task.describe_target(r["label"], names),
                        task.describe_call(r["outputs"], names),
                        *r["outputs"].reshape(-1).tolist(),
                    ]
                    for r in rows
                ]
                columns = ["slide_id", "label", "predicted", *task.output_names(names)]
                logger.log_table(key=key, columns=columns, data=data)


def _slide_outputs(outputs: dict, slide_id: str, rows: slice) -> dict:
    """One slide's part of a bag's predict outputs: its patches' rows, the bag's prediction (a patient bag's slides
    share their patient's)."""
    attention = outputs.get("attention")
    return {
        **outputs,
        "slide_id": slide_id,
        "instance_outputs": outputs["instance_outputs"][rows],
        "attention": None if attention is None else attention.reshape(-1)[rows],
    }


def resolve_figures(figures: FigureWriter | bool) -> FigureWriter | None:
    """A model's `figures` component: an object is used as given, `True` is the default `FigureWriter`, `False` none."""
    if isinstance(figures, FigureWriter):
        return figures
    return FigureWriter() if figures else None


def _guessed_side(coords: np.ndarray) -> float:
    """A patch side from the grid of foreign features that do not record theirs: the step between positions, or
    for a single patch 256 px, the commonest tiling."""
    return grid_step(coords) if len(np.unique(coords, axis=0)) > 1 else 256.0
