"""Pictures people judge a slide model by: attention heatmaps on the slide, the patches that drove the call, ROC
curves (per label for multi-label tasks), confusion matrices, predicted-vs-true scatters (regression), Kaplan-Meier
curves of risk groups (survival) and a metric by ICMIL iteration.

Rendering only: every function takes arrays and returns a matplotlib `Figure` (object API, no pyplot state, so it is
safe in callbacks and threads); `save_png` writes one atomically. Callers decide what to draw and where it goes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image
from scipy.stats import rankdata
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from data_modules.io import atomic_path

__all__ = [
    "confusion_figure",
    "kaplan_meier_figure",
    "multilabel_roc_figure",
    "scatter_figure",
    "grid_step",
    "heatmap_figure",
    "iteration_figure",
    "montage_figure",
    "percentiles",
    "prediction_title",
    "probe_figure",
    "roc_figure",
    "save_png",
    "score_map",
]

CMAP = "coolwarm"  # blue (low) to red (high), the pathology heatmap convention; tissue stays visible under it
TRUTH_RGB = (255, 200, 0)  # the ground truth's outline, gold on heatmaps, in QuPath and in the viewer alike
TRUTH_COLOUR = "#{:02x}{:02x}{:02x}".format(*TRUTH_RGB)


def grid_step(coords: np.ndarray) -> float:
    """A patch grid's step in level-0 pixels (= the patch size for non-overlapping grids), from the coordinates alone,
    so heatmaps need no tiling metadata: the smallest positive gap between distinct x (or y) positions."""
    gaps = [np.diff(np.unique(coords[:, axis])) for axis in (0, 1)]
    gaps = np.concatenate([g[g > 0] for g in gaps])
    if gaps.size == 0:
        raise ValueError("coords: need at least two distinct patch positions to infer the grid step")
    return float(gaps.min())


def score_map(
    shape: tuple[int, int], downsample: float, coords: np.ndarray, patch: float, scores: np.ndarray
) -> np.ndarray:
    """(H, W) float map at `downsample` (level-0 pixels per map pixel): each patch's score over its footprint, NaN
    where no patch lies; where patches overlap, the highest score shows."""
    out = np.full(shape, np.nan, np.float32)
    x0 = np.floor(coords[:, 0] / downsample).astype(int)
    y0 = np.floor(coords[:, 1] / downsample).astype(int)
    # end at ceil((x + patch) / ds): a rounded side would leave one-pixel gaps between neighbours at some downsamples
    x1 = np.maximum(x0 + 1, np.ceil((coords[:, 0] + patch) / downsample).astype(int))
    y1 = np.maximum(y0 + 1, np.ceil((coords[:, 1] + patch) / downsample).astype(int))
    for i in np.argsort(scores):  # ascending: higher scores are painted last
        out[max(y0[i], 0) : max(y1[i], 0), max(x0[i], 0) : max(x1[i], 0)] = scores[i]
    return out


def percentiles(scores: np.ndarray) -> np.ndarray:
    """Each score's rank in its slide as a fraction in [0, 1] (ties share their mean rank). Attention is peaky: on a
    min-max scale a few patches are hot and the rest one colour, while ranks show the whole ordering (as CLAM's
    heatmaps do)."""
    scores = np.asarray(scores, np.float64)
    if len(scores) < 2:
        return np.full(len(scores), 0.5)
    return (rankdata(scores) - 1) / (len(scores) - 1)


def prediction_title(slide_id: str, class_names: Sequence[str], label: int | None, probs: Sequence[float]) -> str:
    """What a slide's figures say above it: the true class beside the call, so a miss is seen at a glance."""
    k = int(np.argmax(probs))
    truth = "label unknown" if label is None else f"true {class_names[label]}"
    return f"{slide_id} ({truth}): predicted {class_names[k]}, p = {probs[k]:.2f}"


def heatmap_figure(
    thumbnail: np.ndarray,
    downsample: float,
    coords: np.ndarray,
    scores: np.ndarray,
    title: str,
    *,
    patch: float | None = None,
    label: str = "attention (percentile in slide)",
    alpha: float = 0.45,
    truth: dict | None = None,
) -> Figure:
    """The slide thumbnail beside the same thumbnail with the per-patch scores overlaid as percentiles in the slide,
    a colour bar and the outline of the tiled tissue on both (named in a legend, since a black line on a slide could
    be an annotation), and the ground truth's outline where the slide has annotations (`truth`, a GeoJSON geometry in
    level-0 pixels). `downsample` = level-0 pixels per thumbnail pixel;
    `patch` = patch side in level-0 pixels (inferred from the grid when None)."""
    h, w = thumbnail.shape[:2]
    side, dpi = 5.5, 100  # inches per panel along the slide's longer axis
    panel = (side, side * h / w) if w >= h else (side * w / h, side)
    pixels = (max(1, round(panel[0] * dpi)), max(1, round(panel[1] * dpi)))
    if w > pixels[0]:  # drawn at the panel's own pixels: Agg would resample a larger image on every draw
        downsample *= w / pixels[0]
        thumbnail = np.asarray(Image.fromarray(thumbnail).resize(pixels, Image.Resampling.LANCZOS))
    heat = score_map(thumbnail.shape[:2], downsample, coords, patch or grid_step(coords), percentiles(scores))
    width, height = 2 * panel[0] + 1.0, panel[1] + 0.7
    fig = Figure(figsize=(width, height), dpi=dpi)  # axes placed by hand: a layout engine costs more than the drawing

    def rect(left: float, wide: float) -> list[float]:
        return [left / width, 0.1 / height, wide / width, panel[1] / height]

    plain, ax = fig.add_axes(rect(0.1, panel[0])), fig.add_axes(rect(0.2 + panel[0], panel[0]))
    bar = fig.add_axes(rect(0.3 + 2 * panel[0], 0.15))
    tiled = np.isfinite(heat).astype(np.float32)
    outlined = 0 < tiled.mean() < 1
    rings = [np.asarray(ring, np.float64) / downsample for ring in _rings(truth)]
    for a in (plain, ax):
        a.imshow(thumbnail)
        if outlined:
            a.contour(tiled, levels=[0.5], colors="black", linewidths=0.6)
        for ring in rings:
            a.plot(ring[:, 0], ring[:, 1], color=TRUTH_COLOUR, linewidth=0.9)
        a.set_axis_off()
    handles = [Line2D([], [], color="black", linewidth=0.6, label="tiled tissue")] if outlined else []
    if rings:
        handles.append(Line2D([], [], color=TRUTH_COLOUR, linewidth=0.9, label="tumour (ground truth)"))
    if handles:
        plain.legend(handles=handles, loc="lower left", fontsize=8, framealpha=0.8)
    image = ax.imshow(np.ma.masked_invalid(heat), cmap=CMAP, vmin=0, vmax=1, alpha=alpha, interpolation="nearest")
    fig.suptitle(title, y=1 - 0.15 / height)
    fig.colorbar(image, cax=bar, label=label)
    return fig


def _rings(geometry: dict | None) -> list[list]:
    """Every ring (outer and holes) of a GeoJSON Polygon or MultiPolygon."""
    if geometry is None:
        return []
    polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    return [ring for polygon in polygons for ring in polygon]


def montage_figure(
    top: Sequence[np.ndarray],
    bottom: Sequence[np.ndarray],
    top_scores: Sequence[float],
    bottom_scores: Sequence[float],
    title: str,
) -> Figure:
    """Two rows of patches: the k highest-scoring (top) and the k lowest-scoring (bottom), each with its score. One
    image of all the patches in one axes (sixteen axes cost most of predict's time per slide)."""
    k = max(len(top), len(bottom), 1)
    tile = max([p.shape[0] for p in (*top, *bottom)] or [1])
    gap, label = max(2, tile // 16), max(12, tile // 5)  # between patches; above each, for its score
    step = tile + gap
    mosaic = np.full((2 * (tile + label) + gap, k * step - gap, 3), 255, np.uint8)
    fig = Figure(figsize=(1.6 * k, 3.8), dpi=100)
    ax = fig.add_axes([0.3 / (1.6 * k), 0.02, 1 - 0.32 / (1.6 * k), 0.82])
    for row, (patches, scores, name) in enumerate([(top, top_scores, "highest"), (bottom, bottom_scores, "lowest")]):
        y = row * (tile + label + gap) + label
        for j, patch in enumerate(patches):
            if patch.shape[:2] != (tile, tile):
                patch = np.asarray(Image.fromarray(patch).resize((tile, tile), Image.Resampling.BILINEAR))
            mosaic[y : y + tile, j * step : j * step + tile] = patch
            ax.text(j * step + tile / 2, y - label / 4, f"{scores[j]:.3g}", ha="center", va="bottom", fontsize=8)
        ax.text(-gap, y + tile / 2, name, rotation=90, va="center", ha="right")
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    fig.suptitle(title, y=1 - 0.1 / 3.8)
    return fig


def roc_figure(labels: Sequence[int], scores: Sequence[float], title: str = "ROC") -> Figure:
    """ROC of the positive-class probability against binary labels, AUROC in the legend."""
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    if len(np.unique(labels)) < 2:
        raise ValueError("labels: a ROC curve needs slides of both classes")
    fpr, tpr, _ = roc_curve(labels, scores)
    fig = Figure(figsize=(4.5, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.plot(fpr, tpr, lw=2, label=f"AUROC {roc_auc_score(labels, scores):.3f} (n = {len(labels)})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.legend(loc="lower right")
    return fig


def multilabel_roc_figure(
    targets: np.ndarray, probs: np.ndarray, names: Sequence[str], title: str = "ROC per label"
) -> Figure:
    """One ROC curve per label (a label present on every slide or on none has no curve and says so)."""
    fig = Figure(figsize=(4.5, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    for k, name in enumerate(names):
        truth = np.asarray(targets)[:, k] > 0.5
        if truth.all() or not truth.any():
            ax.plot([], [], label=f"{name}: one class only")
            continue
        fpr, tpr, _ = roc_curve(truth, probs[:, k])
        ax.plot(fpr, tpr, lw=2, label=f"{name}: AUROC {roc_auc_score(truth, probs[:, k]):.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title(f"{title} (n = {len(targets)})")
    ax.legend(loc="lower right")
    return fig


def scatter_figure(true: Sequence[float], predicted: Sequence[float], name: str, title: str = "test") -> Figure:
    """Predicted against true values with the identity line, Pearson r in the title."""
    true, predicted = np.asarray(true, np.float64), np.asarray(predicted, np.float64)
    r = np.corrcoef(true, predicted)[0, 1] if len(true) > 1 and true.std() > 0 and predicted.std() > 0 else np.nan
    fig = Figure(figsize=(4.5, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.scatter(true, predicted, s=14, alpha=0.8)
    low, high = float(min(true.min(), predicted.min())), float(max(true.max(), predicted.max()))
    ax.plot([low, high], [low, high], ls="--", c="grey", lw=1)
    ax.set(xlabel=f"true {name}", ylabel=f"predicted {name}", title=f"{title}: Pearson r = {r:.3f} (n = {len(true)})")
    return fig


def kaplan_meier_figure(
    time: Sequence[float], event: Sequence[bool], risk: Sequence[float], title: str = "test"
) -> Figure:
    """Kaplan-Meier curves of the slides above and at-or-below the median predicted risk, with the log-rank p."""
    from sksurv.compare import compare_survival
    from sksurv.nonparametric import kaplan_meier_estimator
    from sksurv.util import Surv

    time, event, risk = np.asarray(time, np.float64), np.asarray(event, bool), np.asarray(risk, np.float64)
    high = risk > np.median(risk)
    fig = Figure(figsize=(5, 4), dpi=100, layout="constrained")
    ax = fig.subplots()
    for group, name in ((~high, "low risk"), (high, "high risk")):
        if group.any():
            t, s = kaplan_meier_estimator(event[group], time[group])
            ax.step(np.r_[0, t], np.r_[1, s], where="post", lw=2, label=f"{name} (n = {int(group.sum())})")
    p = np.nan
    if high.any() and (~high).any() and event.any():
        p = compare_survival(Surv.from_arrays(event, time), high.astype(int))[1]
    ax.set(xlabel="time", ylabel="survival probability", ylim=(0, 1.02), title=f"{title}: log-rank p = {p:.3g}")
    ax.legend(loc="upper right")
    return fig


def confusion_figure(
    labels: Sequence[int], predicted: Sequence[int], class_names: Sequence[str], title: str = "confusion matrix"
) -> Figure:
    """Counts of true (rows) against predicted (columns) classes."""
    n = len(class_names)
    matrix = confusion_matrix(labels, predicted, labels=list(range(n)))
    fig = Figure(figsize=(1.2 * n + 2.5, 1.2 * n + 1.8), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    for i in range(n):
        for j in range(n):
            dark = matrix[i, j] > matrix.max() / 2
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color="white" if dark else "black")
    ax.set(
        xticks=range(n),
        yticks=range(n),
        xticklabels=class_names,
        yticklabels=class_names,
        xlabel="predicted",
        ylabel="true",
        title=title,
    )
    return fig


def iteration_figure(iterations: Sequence[dict], metric: str = "auroc") -> Figure:
    """Validation and test `metric` by ICMIL iteration (the `iterations` list of `results.json`)."""
    its = [r["iteration"] for r in iterations]
    name = metric.upper() if metric == "auroc" else metric
    fig = Figure(figsize=(4.5, 3.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    for stage in ("val", "test"):
        if any(metric in r[stage] for r in iterations):  # no validation slides: test alone
            ax.plot(its, [r[stage].get(metric, float("nan")) for r in iterations], marker="o", label=stage)
    ax.set(xlabel="ICMIL iteration", ylabel=name, xticks=its, title=f"{name} by ICMIL iteration")
    ax.legend()
    return fig


def probe_figure(aurocs: Sequence[float]) -> Figure:
    """Linear-probe patch AUROC by pretraining epoch, from -1 (the initial weights)."""
    fig = Figure(figsize=(4.5, 3.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    epochs = list(range(-1, len(aurocs) - 1))
    ax.plot(epochs, aurocs, marker="o")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="epoch (-1 = initial weights)", ylabel="patch AUROC", title="Linear probe of the embedder")
    return fig


def save_png(fig: Figure, path: str | os.PathLike) -> Path:
    """Write `fig` as PNG atomically (temp file, then rename), so a killed run leaves no half image."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
