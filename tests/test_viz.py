"""Pictures of a run: the rendering functions of `icmil_pl.outputs.plots`, and `FigureWriter` on a trained model
whose heatmap must find the tumour of a generated slide (the tumour region of a synthetic slide is known exactly)."""

from __future__ import annotations

import csv
import json
import types
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import shapely
import torch
import zarr
from matplotlib.contour import ContourSet
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import roc_curve
from torch.utils.data import DataLoader

from data_modules.annotations import read_annotations
from data_modules.datasets.feature_bags import FeatureBagDataModule
from data_modules.datasets.feature_cache import FeatureCache
from data_modules.datasets.patches import SlidePatchDataModule
from data_modules.slides import open_slide
from data_modules.slides.tiling import TilingConfig
from data_modules.synthetic import CohortSpec, make_cohort, slide_infos, tumour_mask
from icmil_pl.aggregators import ABMIL, MILOutput
from icmil_pl.bag_classifier import BagClassifier
from icmil_pl.callbacks import FigureWriter, extract_features
from icmil_pl.encoders import PatchEmbedder
from icmil_pl.outputs.patch_scores import read_scores
from icmil_pl.outputs.plots import (
    TRUTH_RGB,
    confusion_figure,
    grid_step,
    heatmap_figure,
    iteration_figure,
    montage_figure,
    percentiles,
    prediction_title,
    roc_figure,
    save_png,
    score_map,
)
from icmil_pl.views.viewer import RunViewer


def _png(path: Path) -> tuple[int, int]:
    """(width, height) of a file that must decode as a PNG."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # decodes every pixel: a truncated file fails here
        return image.size


def _pixels(fig: Figure) -> tuple[int, int]:
    """The PNG size a figure is saved at: figsize * dpi, truncated as Agg does."""
    w, h = fig.get_size_inches() * fig.dpi
    return int(w), int(h)


def _grid(nx: int, ny: int, step: int, origin=(0, 0)) -> np.ndarray:
    xs, ys = np.meshgrid(origin[0] + step * np.arange(nx), origin[1] + step * np.arange(ny))
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


# -- grid_step ---------------------------------------------------------------------------------------------------------
def test_grid_step_is_the_smallest_gap_between_patch_positions():
    grid = _grid(5, 4, 256, origin=(1000, 3000))
    assert grid_step(grid) == 256.0
    assert grid_step(grid[[0, 3, 7, 12, 19]]) == 256.0  # holes in the tissue leave the step as it is
    assert grid_step(_grid(1, 6, 64)) == 64.0  # a single column: the step comes from the rows
    assert grid_step(np.concatenate([grid, grid + 128])) == 128.0  # 50 % overlapping grid: the stride


def test_grid_step_needs_two_patch_positions():
    with pytest.raises(ValueError, match="need at least two distinct patch positions"):
        grid_step(np.array([[512, 768]]))
    with pytest.raises(ValueError, match="need at least two distinct patch positions"):
        grid_step(np.array([[512, 768], [512, 768]]))


# -- score_map ---------------------------------------------------------------------------------------------------------
def test_score_map_paints_each_patch_footprint_and_nan_elsewhere():
    coords = np.array([[0, 0], [64, 0], [128, 64]])
    out = score_map((40, 50), 4.0, coords, 64, np.array([0.2, 0.5, 0.9]))
    assert out.shape == (40, 50) and out.dtype == np.float32
    expected = np.full((40, 50), np.nan, np.float32)
    expected[0:16, 0:16], expected[0:16, 16:32], expected[16:32, 32:48] = 0.2, 0.5, 0.9
    np.testing.assert_array_equal(out, expected)  # NaN where expected is NaN, the score elsewhere


def test_score_map_shows_the_highest_score_where_patches_overlap():
    coords = np.array([[0, 0], [32, 32]])  # 64 px patches at downsample 4: [0, 16)^2 and [8, 24)^2, overlap [8, 16)^2
    for scores in ([0.9, 0.1], [0.1, 0.9]):  # whatever the order of the patches
        out = score_map((24, 24), 4.0, coords, 64, np.array(scores))
        assert (out[8:16, 8:16] == max(scores)).all()
        assert (out[:8, :16] == scores[0]).all() and (out[:16, :8] == scores[0]).all()  # patch 0 alone
        assert (out[16:, 8:] == scores[1]).all() and (out[8:, 16:] == scores[1]).all()  # patch 1 alone
        assert np.isnan(out[0, 16:]).all() and np.isnan(out[16:, 0]).all()


def test_score_map_clips_patches_at_the_map_edge():
    out = score_map((10, 10), 8.0, np.array([[48, 48], [-16, 0]]), 64, np.array([1.0, 2.0]))
    assert (out[6:, 6:] == 1.0).all() and (out[:8, :6] == 2.0).all()
    assert np.isnan(out[9, 0]) and np.isnan(out[0, 9])


def test_score_map_leaves_no_gap_between_adjacent_patches():
    # an 80 000 px wide slide drawn 1024 px wide: 78.125 level-0 px per thumbnail px, 256 px patches = 3.28 px
    coords = _grid(10, 10, 256)
    out = score_map((40, 40), 78.125, coords, 256, np.ones(len(coords)))
    inside = out[: int(2560 / 78.125), : int(2560 / 78.125)]
    assert not np.isnan(inside).any()


# -- heatmap and montage -----------------------------------------------------------------------------------------------
def test_percentiles_rank_the_scores_of_a_slide():
    ranks = percentiles([3.0, 5.0, 4.0, 7.0, 4.0, 6.0])
    np.testing.assert_allclose(ranks, [0.0, 0.6, 0.3, 1.0, 0.3, 0.8])  # ties share their mean rank
    np.testing.assert_allclose(percentiles([1e-9, 0.98, 1e-8]), [0.0, 1.0, 0.5])  # peaky attention spreads out
    np.testing.assert_allclose(percentiles(np.full(4, 0.25)), 0.5)
    np.testing.assert_allclose(percentiles([0.7]), [0.5])
    assert percentiles([]).shape == (0,)


def test_heatmap_shows_the_thumbnail_beside_the_score_percentiles():
    thumbnail = np.full((40, 80, 3), 230, np.uint8)  # a 320 x 160 px slide at downsample 4
    coords = _grid(3, 2, 64, origin=(64, 32))
    scores = np.array([3.0, 5.0, 4.0, 7.0, 4.0, 6.0])
    fig = heatmap_figure(thumbnail, 4.0, coords, scores, "slide_x", label="attention")
    assert _pixels(fig) == (1200, int((5.5 * 40 / 80 + 0.7) * 100))  # two 5.5 x 2.75 in panels and a colour bar
    plain, ax, bar = fig.axes
    assert fig.get_suptitle() == "slide_x" and bar.get_ylabel() == "attention"
    assert len(plain.images) == 1 and np.array_equal(plain.images[0].get_array(), thumbnail)  # the plain slide
    assert np.array_equal(ax.images[0].get_array(), thumbnail)
    heat = ax.images[1].get_array()
    assert heat.shape == (40, 80)
    expected = np.full((40, 80), np.nan)
    for (x, y), value in zip(coords // 4, percentiles(scores), strict=True):
        expected[y : y + 16, x : x + 16] = value
    np.testing.assert_array_equal(heat.mask, np.isnan(expected))  # nothing drawn where no patch lies
    np.testing.assert_allclose(heat.filled(np.nan), expected)  # lowest score 0, highest 1, ties alike
    for a in (plain, ax):
        assert any(isinstance(c, ContourSet) for c in a.collections)  # the outline of the tiled area on both
    assert [t.get_text() for t in plain.get_legend().get_texts()] == ["tiled tissue"]  # and what the line is

    flat = heatmap_figure(thumbnail, 4.0, coords, np.ones(6), "flat").axes[1].images[1].get_array()
    np.testing.assert_allclose(flat.compressed(), 0.5)  # no contrast: mid colour, not a division by zero
    full = heatmap_figure(thumbnail[:8, :16], 4.0, _grid(2, 1, 32), np.array([1.0, 2.0]), "all tiled")
    assert not any(isinstance(c, ContourSet) for a in full.axes for c in a.collections)  # nothing untiled to outline
    assert full.axes[0].get_legend() is None


def test_a_slide_title_names_the_true_class_beside_the_call():
    names = ["normal", "tumour"]
    assert prediction_title("s1", names, 0, [0.22, 0.78]) == "s1 (true normal): predicted tumour, p = 0.78"
    assert prediction_title("s2", names, None, [0.9, 0.1]) == "s2 (label unknown): predicted normal, p = 0.90"


def test_montage_shows_top_and_bottom_patches_with_their_scores():
    patches = [np.full((8, 8, 3), v, np.uint8) for v in (10, 20, 30)]
    fig = montage_figure(patches, patches[:2], [0.91234, 0.5, 0.25], [0.01, 0.02], "slide_y")
    assert len(fig.axes) == 1 and _pixels(fig) == (480, 380)
    assert fig.get_suptitle() == "slide_y"
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["0.912", "0.5", "0.25", "highest", "0.01", "0.02", "lowest"]
    mosaic = ax.images[0].get_array()
    tile, gap, label = 8, 2, 12
    for row, values in enumerate([(10, 20, 30), (10, 20)]):
        y = row * (tile + label + gap) + label
        for j, v in enumerate(values):
            assert (mosaic[y : y + tile, j * (tile + gap) : j * (tile + gap) + tile] == v).all()
    y = tile + label + gap + label
    assert (mosaic[y : y + tile, 2 * (tile + gap) :] == 255).all()  # a short row leaves its last slot empty


# -- ROC, confusion, iterations ----------------------------------------------------------------------------------------
def test_roc_figure_plots_the_curve_with_its_auroc():
    labels, scores = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    ax = roc_figure(labels, scores, "val ROC").axes[0]
    fpr, tpr, _ = roc_curve(labels, scores)
    np.testing.assert_allclose(ax.lines[0].get_xdata(), fpr)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), tpr)
    assert ax.get_legend().get_texts()[0].get_text() == "AUROC 0.750 (n = 4)"
    assert ax.get_title() == "val ROC"


def test_roc_figure_needs_both_classes():
    with pytest.raises(ValueError, match="needs slides of both classes"):
        roc_figure([1, 1, 1], [0.2, 0.5, 0.9])


def test_confusion_figure_counts_true_against_predicted():
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    predicted = [0, 0, 1, 1, 0, 2, 2, 2, 1]
    fig = confusion_figure(labels, predicted, ["normal", "tumour", "other"], "test")
    ax = fig.axes[0]
    counts = np.array([int(t.get_text()) for t in ax.texts]).reshape(3, 3)  # written row by row
    np.testing.assert_array_equal(counts, [[2, 1, 0], [1, 1, 0], [0, 1, 3]])
    np.testing.assert_array_equal(ax.images[0].get_array(), counts)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["normal", "tumour", "other"]
    assert ax.get_xlabel() == "predicted" and ax.get_ylabel() == "true" and ax.get_title() == "test"
    dark = {t.get_text(): t.get_color() for t in ax.texts}
    assert dark["3"] == "white" and dark["0"] == "black"  # readable on the dark and light cells
    # a class nobody has or predicts still gets its row and column of zeros
    sparse = confusion_figure([0, 1], [1, 1], ["a", "b", "c"]).axes[0]
    np.testing.assert_array_equal([int(t.get_text()) for t in sparse.texts], [0, 1, 0, 0, 1, 0, 0, 0, 0])


def test_iteration_figure_plots_val_and_test_by_iteration():
    iterations = [
        {"iteration": i, "val": {"auroc": v, "f1": v / 2}, "test": {"auroc": t, "f1": t / 2}}
        for i, v, t in [(0, 0.7, 0.65), (1, 0.8, 0.75), (2, 0.85, 0.9)]
    ]
    ax = iteration_figure(iterations).axes[0]
    assert [line.get_label() for line in ax.lines] == ["val", "test"]
    for line, stage in zip(ax.lines, ("val", "test"), strict=True):
        np.testing.assert_array_equal(line.get_xdata(), [0, 1, 2])
        np.testing.assert_allclose(line.get_ydata(), [r[stage]["auroc"] for r in iterations])
    assert list(ax.get_xticks()) == [0, 1, 2] and ax.get_ylabel() == "AUROC"
    assert ax.get_title() == "AUROC by ICMIL iteration"
    f1 = iteration_figure(iterations, "f1").axes[0]
    np.testing.assert_allclose(f1.lines[1].get_ydata(), [0.325, 0.375, 0.45])
    assert f1.get_ylabel() == "f1" and f1.get_title() == "f1 by ICMIL iteration"


# -- save_png ----------------------------------------------------------------------------------------------------------
def test_save_png_writes_a_png_of_figsize_times_dpi_and_no_temp_file(tmp_path):
    fig = Figure(figsize=(3.2, 2.4), dpi=50)
    fig.subplots().plot([0, 1], [1, 0])
    path = save_png(fig, tmp_path / "new" / "folder" / "plot.png")
    assert path == tmp_path / "new" / "folder" / "plot.png"
    assert _png(path) == (160, 120)
    assert [p.name for p in path.parent.iterdir()] == ["plot.png"]

    bigger = Figure(figsize=(4, 4), dpi=50)
    assert save_png(bigger, path) == path  # replaces the old picture
    assert _png(path) == (200, 200) and [p.name for p in path.parent.iterdir()] == ["plot.png"]


def test_save_png_leaves_nothing_when_rendering_fails(tmp_path):
    fig = Figure(figsize=(2, 2), dpi=50)

    def broken(fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise RuntimeError("disk full")

    fig.savefig = broken
    with pytest.raises(RuntimeError, match="disk full"):
        save_png(fig, tmp_path / "plot.png")
    assert list(tmp_path.iterdir()) == []


# -- FigureWriter on a trained model -----------------------------------------------------------------------------------
PATCH = 64  # level-0 px per patch: 64 px at 0.5 um/px on 0.5 um/px slides
SEED = 2  # cohort, embedder and training seed; IoU measured for seeds 0-5 below
# Patch-level IoU between the patches with the highest attention (as many as there are tumour patches) and the tumour
# patches (> 50 % of the footprint inside `tumour_mask`), on the held-out tumour slide. Measured with this set-up
# (12 slides: 8 train, 2 val, 2 test; ABMIL 128-64-32, 30 epochs, lr 1e-3): 0.733, 0.931, 0.795, 0.700, 0.739, 0.926
# for seeds 0-5, where k random patches give 0.04-0.16 (seed 2: 0.144); over every tumour slide of those runs (train
# and val too) 0.41-1.0. With only 4 training slides one seed of six learnt a shortcut (attention on tissue-edge
# patches, IoU 0), hence 8. A model whose attention ignores the tumour (IoU near the random baseline) fails the bound.
IOU_BOUND = 0.5


def _tumour_patches(info, coords: np.ndarray) -> np.ndarray:
    """Patches more than half inside the slide's known tumour region."""
    ds = 4
    mask = tumour_mask(info, ds)
    return np.array([mask[y // ds : (y + PATCH) // ds, x // ds : (x + PATCH) // ds].mean() > 0.5 for x, y in coords])


def _top_k_iou(scores: np.ndarray, truth: np.ndarray) -> float:
    top = np.zeros(len(scores), bool)
    top[np.argsort(-scores, kind="stable")[: truth.sum()]] = True
    return float((top & truth).sum() / (top | truth).sum())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    # One torch thread: these ops are too small to gain from more, and on a shared machine OpenMP threads spin against
    # the other processes (training was 10x slower with 2 threads on 2 busy cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield _train(tmp_path_factory.mktemp("viz"))
    finally:
        torch.set_num_threads(threads)


def _train(root: Path) -> types.SimpleNamespace:
    """A 12-slide cohort with high tumour contrast, random-init ResNet-18 (layer2) features, and ABMIL trained on 8
    slides; the splits are fixed so that the test split holds one tumour and one normal slide never trained on."""
    spec = CohortSpec(
        n_slides=12, seed=SEED, size=(1024, 1024), flavours=("tiff",), tumour_contrast=3.0, tumour_area=(0.1, 0.2)
    )
    cohort = make_cohort(root / "cohort", spec)
    rows = list(csv.DictReader((cohort / "labels.csv").open()))
    tumour = [r["slide_id"] for r in rows if r["label"] == "1"]
    normal = [r["slide_id"] for r in rows if r["label"] == "0"]
    split = {tumour[0]: "test", normal[0]: "test", tumour[1]: "val", normal[1]: "val"}
    labels = root / "labels.csv"
    with labels.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide_id", "label", "patient_id", "split"])
        # one patient per slide: the generated patients span slides, and a given split may not part a patient
        writer.writerows([r["slide_id"], r["label"], r["slide_id"], split.get(r["slide_id"], "train")] for r in rows)
    # the held-out slides, unlabelled, as new slides come to a trained model; the tumour slide annotated in QuPath (the
    # generator writes its truth as QuPath exports it), the normal one not
    predict = root / "predict.csv"
    predict.write_text(f"slide_id,annotations\n{tumour[0]},cohort/annotations/{tumour[0]}.geojson\n{normal[0]},\n")

    torch.manual_seed(0)
    patches = SlidePatchDataModule(
        str(labels),
        str(cohort / "slides"),
        TilingConfig(mpp=0.5, patch_size=PATCH),
        str(root / "grids"),
        batch_size=64,
        num_workers=0,
    )
    cache = extract_features(
        PatchEmbedder("resnet18", "layer2"),
        patches,
        str(root / "features"),
        dtype="float32",
        trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False},
    )
    pl.seed_everything(SEED, verbose=False)
    bags = FeatureBagDataModule(str(labels), str(cache.path), slides=str(cohort / "slides"))
    model = BagClassifier(ABMIL(128, 2, hidden_dim=64, attention_dim=32), lr=1e-3, gradient_clip_val=5.0)
    pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=30,
        check_val_every_n_epoch=10,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root / "fit"),
    ).fit(model, bags)
    infos = slide_infos(cohort)
    return types.SimpleNamespace(
        root=root,
        cohort=cohort,
        predict=predict,
        features=cache.path,
        bags=bags,
        model=model,
        infos=infos,
        test_tumour=tumour[0],
        test_normal=normal[0],
    )


def _trainer(root: Path, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        **kwargs,
    )


def test_heatmap_of_a_trained_model_finds_the_known_tumour(trained, tmp_path):
    """Acceptance: predict the two held-out slides (one tumour, one normal, unlabelled) with the FigureWriter every
    SlideTask adds by itself; each slide gets a heatmap and a patch montage that decode as PNGs of the size their
    figures imply, and its per-patch attention with coordinates in scores.zarr; on the tumour slide the most attended
    patches are the tumour (patch IoU >= IOU_BOUND, while k random patches would give ~ k / (2n - k))."""
    slides = FeatureBagDataModule(str(trained.predict), str(trained.features), slides=str(trained.cohort / "slides"))
    _trainer(tmp_path).predict(trained.model, datamodule=slides)  # the slides folder comes from the data module
    figures = tmp_path / "figures"
    store = zarr.open_group(str(tmp_path / "scores.zarr"), mode="r")
    for slide_id in (trained.test_tumour, trained.test_normal):
        bag = FeatureCache(trained.features).read(slide_id)
        features, coords = bag.features, bag.coords
        group = store[slide_id]
        np.testing.assert_array_equal(group["coords"][:], coords)
        scores = group["scores"][:]
        assert scores.shape == (len(features),) and np.isfinite(scores).all()
        assert scores.sum() == pytest.approx(1.0, abs=1e-4)  # ABMIL attention: a softmax over the bag
        scored = read_scores(tmp_path, slide_id)
        assert (scored.kind, scored.slide_id, scored.label, scored.classes) == ("attention", slide_id, None, ["0", "1"])
        # the truth is the labels CSV's annotations (the tumour slide's), not the generator's manifest
        assert scored.patch_side == PATCH and (scored.truth is not None) == (slide_id == trained.test_tumour)
        assert scored.slide_path == str((trained.cohort / "slides" / f"{slide_id}.tif").resolve())
        with torch.no_grad():
            expected = trained.model.instance_logits(torch.from_numpy(features)).softmax(-1).numpy()
        np.testing.assert_allclose(scored.probs, expected, rtol=1e-5, atol=1e-7)
        _check_geojson(tmp_path / "qupath" / f"{slide_id}.geojson", scored)

        with open_slide(trained.cohort / "slides" / f"{slide_id}.tif") as slide:
            h, w = slide.get_thumbnail((1024, 1024)).shape[:2]
        assert (h, w) == (1024, 1024)
        assert _png(figures / f"{slide_id}_heatmap.png") == (1200, 620)  # (2 x 5.5 + 1) x (5.5 + 0.7) in
        assert _png(figures / f"{slide_id}_patches.png") == (int(1.6 * 8 * 100), 380)  # top_k = 8 per row
    assert sorted(p.name for p in figures.iterdir()) == sorted(
        f"{s}_{kind}.png" for s in (trained.test_tumour, trained.test_normal) for kind in ("heatmap", "patches")
    )

    slide_id = trained.test_tumour
    annotations = read_annotations(trained.cohort / "annotations" / f"{slide_id}.geojson")
    assert shapely.geometry.shape(read_scores(tmp_path, slide_id).truth).equals(annotations.tumour)
    gold = _truth_pixels(figures / f"{slide_id}_heatmap.png")  # the truth's outline, drawn on both panels
    assert gold > 200 and _truth_pixels(figures / f"{trained.test_normal}_heatmap.png") < gold / 10
    assert RunViewer(tmp_path).slide_info(slide_id)["truth"] == read_scores(tmp_path, slide_id).truth
    coords = store[slide_id]["coords"][:]
    assert grid_step(coords) == PATCH
    truth = _tumour_patches(trained.infos[slide_id], coords)
    n, k = len(coords), int(truth.sum())
    assert 5 <= k <= n / 2  # a tumour to find, and not most of the slide
    random_iou = (k * k / n) / (2 * k - k * k / n)  # expected intersection of k random patches: k^2 / n
    assert random_iou < IOU_BOUND / 2  # the bound is far from what chance gives on this slide
    iou = _top_k_iou(store[slide_id]["scores"][:], truth)
    assert iou >= IOU_BOUND, f"top-{k} attention IoU with the tumour {iou:.3f} (random ~ {random_iou:.3f})"


def _truth_pixels(png: Path) -> int:
    """Pixels of a figure in the ground truth's colour."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int((np.abs(rgb - np.array(TRUTH_RGB)).max(-1) < 40).sum())


def _check_geojson(path: Path, scored) -> None:
    """QuPath's tile layout: one locked square tile per patch inside the slide, its measurements equal to scores.zarr,
    classified by its most probable class; then the tiled tissue as one annotation covering every tile."""
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection"
    tiles = [f for f in collection["features"] if f["properties"]["objectType"] == "tile"]
    annotations = [f for f in collection["features"] if f["properties"]["objectType"] == "annotation"]
    names = ["tiled tissue"] + (["tumour (ground truth)"] if scored.truth is not None else [])
    assert len(tiles) == len(scored.coords) and [a["properties"]["name"] for a in annotations] == names
    w, h = scored.dimensions
    tissue = shapely.geometry.shape(annotations[0]["geometry"])
    for tile, (x, y), attention, probs in zip(tiles, scored.coords, scored.scores, scored.probs, strict=True):
        square = shapely.geometry.shape(tile["geometry"])
        assert square.bounds == (x, y, x + PATCH, y + PATCH) and square.area == PATCH * PATCH
        assert 0 <= x and x + PATCH <= w and 0 <= y and y + PATCH <= h
        assert tissue.contains(square.centroid)
        measured = tile["properties"]["measurements"]
        assert measured["attention"] == pytest.approx(float(attention), rel=1e-6)
        assert [measured["prob_0"], measured["prob_1"]] == pytest.approx(probs.tolist(), rel=1e-6)
        assert tile["properties"]["isLocked"] is True
        assert tile["properties"]["classification"]["name"] == scored.classes[int(probs.argmax())]
    assert tissue.area == pytest.approx(len(tiles) * PATCH * PATCH)


def test_test_run_writes_roc_and_confusion(trained, tmp_path):
    _trainer(tmp_path, callbacks=[FigureWriter()]).test(trained.model, datamodule=trained.bags, verbose=False)
    assert _png(tmp_path / "figures" / "test_roc.png") == (450, 450)
    assert _png(tmp_path / "figures" / "test_confusion.png") == (490, 420)  # two classes: 1.2 * 2 + 2.5 by + 1.8 in
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["test_confusion.png", "test_roc.png"]


def test_without_slides_only_scores_are_written(trained, tmp_path):
    bags = FeatureBagDataModule(str(trained.predict), str(trained.features))  # no slides folder: nothing to draw on
    _trainer(tmp_path).predict(trained.model, datamodule=bags)
    assert sorted(zarr.open_group(str(tmp_path / "scores.zarr"), mode="r").group_keys()) == sorted(
        [trained.test_tumour, trained.test_normal]
    )
    assert not (tmp_path / "figures").exists()


def test_models_without_attention_get_patch_probabilities(trained, tmp_path, monkeypatch):
    model = trained.model
    with_attention = model.aggregator.forward
    monkeypatch.setattr(model.aggregator, "forward", lambda h: MILOutput(with_attention(h).logits))
    bags = FeatureBagDataModule(str(trained.predict), str(trained.features))
    _trainer(tmp_path).predict(model, datamodule=bags)
    group = zarr.open_group(str(tmp_path / "scores.zarr"), mode="r")[trained.test_tumour]
    assert group.attrs["kind"] == "patch probability"
    features = torch.from_numpy(FeatureCache(trained.features).read(trained.test_tumour).features)
    with torch.no_grad():
        expected = model.instance_logits(features).softmax(-1)[:, 1].numpy()
    np.testing.assert_allclose(group["scores"][:], expected, rtol=1e-5)


def test_a_one_patch_slide_still_gets_its_figures_with_its_own_patch_side(trained, tmp_path):
    """A one-patch bag has no grid to guess a side from (it got a 256 px square, outside a small slide): the side
    recorded with the features is the one scores.zarr, QuPath and the heatmap use."""
    cached = FeatureCache(trained.features).read(trained.test_tumour)
    assert cached.patch_side == PATCH
    bag = {
        "features": torch.from_numpy(cached.features[:1]),
        "coords": torch.from_numpy(cached.coords[:1].astype(np.int64)),
        "label": torch.tensor(1),
        "slide_id": trained.test_tumour,
        "patch_side": cached.patch_side,
    }
    writer = FigureWriter(slides=str(trained.cohort / "slides"))
    _trainer(tmp_path, callbacks=[writer]).predict(trained.model, DataLoader([bag], batch_size=None))
    assert _png(tmp_path / "figures" / f"{trained.test_tumour}_heatmap.png")[0] == 1200
    assert read_scores(tmp_path, trained.test_tumour).patch_side == PATCH != 256
    tile = json.loads((tmp_path / "qupath" / f"{trained.test_tumour}.geojson").read_text())["features"][0]
    assert shapely.geometry.shape(tile["geometry"]).area == PATCH * PATCH


def test_figures_are_a_component_of_the_model(trained, tmp_path):
    """`figures`: a FigureWriter is used as given, False draws nothing; predictions.csv is written either way."""
    state = trained.model.state_dict()
    bags = FeatureBagDataModule(str(trained.predict), str(trained.features), slides=str(trained.cohort / "slides"))
    custom = BagClassifier(ABMIL(128, 2, hidden_dim=64, attention_dim=32), figures=FigureWriter(top_k=2))
    custom.load_state_dict(state)
    _trainer(tmp_path / "custom").predict(custom, datamodule=bags)
    assert _png(tmp_path / "custom" / "figures" / f"{trained.test_tumour}_patches.png")[0] == 160 * 2  # 1.6 in a patch
    off = BagClassifier(ABMIL(128, 2, hidden_dim=64, attention_dim=32), figures=False)
    off.load_state_dict(state)
    _trainer(tmp_path / "off").predict(off, datamodule=bags)
    assert sorted(p.name for p in (tmp_path / "off").iterdir()) == ["predictions.csv"]


def test_figure_writer_checks_its_settings():
    with pytest.raises(ValueError, match=r"top_k: expected an int >= 1, got 0"):
        FigureWriter(top_k=0)
    with pytest.raises(ValueError, match=r"thumbnail_px: expected an int >= 64, got 32"):
        FigureWriter(thumbnail_px=32)
