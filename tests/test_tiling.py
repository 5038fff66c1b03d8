"""Tissue masks, patch grids and the patch dataset on generated slides."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import tifffile
import torch
from torch.utils.data import DataLoader

import data_modules.slides.tiling as tiling
from data_modules import PatchDataset, SlideError, SlidePatches, TissueParams, open_slide, patch_grid, tissue_mask
from data_modules.synthetic import CohortSpec, write_slide


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiling") / "s.svs"
    write_slide(path, CohortSpec(size=(3072, 2048), mpp=0.5), seed=7, tumour=True, flavour="svs")
    return path


def test_mask_finds_tissue_not_glass(slide_path):
    slide = open_slide(slide_path)
    mask = tissue_mask(slide, TissueParams(mask_mpp=8.0))
    assert mask.shape == (128, 192)  # 3072 x 2048 px at 0.5 um/px, seen at 8 um/px
    thumb = slide.get_thumbnail((192, 128)).astype(float)
    assert 0.1 < mask.mean() < 0.9
    assert thumb[~mask].mean() > 225  # background is glass-white
    assert thumb[mask].mean() < thumb[~mask].mean() - 25  # tissue is stained


def test_grid_geometry_and_tissue_fraction(slide_path):
    grid = patch_grid(slide_path, mpp=1.0, patch_size=64, tissue_threshold=0.8)
    assert grid.level0_size == 128
    assert grid.coords.dtype == np.int32 and grid.coords.shape[1] == 2
    assert (grid.coords % 128 == 0).all()
    assert (grid.coords[:, 0] + 128 <= 3072).all() and (grid.coords[:, 1] + 128 <= 2048).all()
    assert (grid.tissue_fraction >= 0.8).all()
    # every kept patch is mostly tissue in the mask it came from
    cell = 128 * 0.5 / grid.mask_mpp
    for x, y in grid.coords[:50]:
        sub = grid.mask[
            int(y * 0.5 / grid.mask_mpp) : int((y + 128) * 0.5 / grid.mask_mpp),
            int(x * 0.5 / grid.mask_mpp) : int((x + 128) * 0.5 / grid.mask_mpp),
        ]
        assert sub.size == cell * cell and sub.mean() >= 0.75
    looser = patch_grid(slide_path, mpp=1.0, patch_size=64, tissue_threshold=0.1)
    assert len(looser) > len(grid)


def test_grid_cache_makes_the_second_call_free(slide_path, tmp_path, monkeypatch):
    first = patch_grid(slide_path, mpp=1.0, patch_size=64, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.grid.npz"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("the slide was opened again")

    monkeypatch.setattr(tiling, "open_slide", refuse)
    second = patch_grid(slide_path, mpp=1.0, patch_size=64, cache_dir=tmp_path)
    np.testing.assert_array_equal(first.coords, second.coords)
    assert second.level0_size == first.level0_size and second.mask.shape == first.mask.shape
    with pytest.raises(AssertionError, match="opened again"):  # other parameters are another cache entry
        patch_grid(slide_path, mpp=1.0, patch_size=32, cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.tmp*"))


def test_blank_slide_has_no_tissue(tmp_path):
    path = tmp_path / "blank.tif"
    rng = np.random.default_rng(0)
    glass = (236 + rng.integers(0, 8, (1024, 1024, 3))).astype(np.uint8)
    tifffile.imwrite(
        path, glass, tile=(256, 256), photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER"
    )
    assert open_slide(path).mpp == pytest.approx(0.5)
    with pytest.raises(SlideError, match=r"blank\.tif: no tissue found"):
        patch_grid(path, mpp=0.5, patch_size=256)


def test_grid_needs_the_resolution(tmp_path):
    path = tmp_path / "nompp.tif"
    tifffile.imwrite(path, np.zeros((512, 512, 3), np.uint8), tile=(256, 256), photometric="rgb")
    with pytest.raises(SlideError, match=r"nompp\.tif: microns per pixel unknown"):
        patch_grid(path, mpp=0.5, patch_size=256)


def test_bad_grid_parameters(slide_path):
    with pytest.raises(ValueError, match="patch_size"):
        patch_grid(slide_path, mpp=0.5, patch_size=0)
    with pytest.raises(ValueError, match="tissue_threshold"):
        patch_grid(slide_path, mpp=0.5, patch_size=64, tissue_threshold=1.5)


def test_patch_dataset_serves_patches_in_worker_processes(slide_path):
    grid = patch_grid(slide_path, mpp=1.0, patch_size=64, tissue_threshold=0.8)
    entries = [SlidePatches("a", slide_path, grid), SlidePatches("b", slide_path, grid)]
    dataset = PatchDataset(entries)
    assert len(dataset) == 2 * len(grid)
    sample = dataset[len(grid) + 3]
    assert sample["slide_id"] == "b" and sample["image"].shape == (3, 64, 64) and sample["image"].dtype == torch.uint8
    x, y = grid.coords[3]
    assert sample["coords"].tolist() == [x, y]
    expected = open_slide(slide_path).read_at_mpp((int(x), int(y)), (64, 64), mpp=1.0)
    np.testing.assert_array_equal(sample["image"].permute(1, 2, 0).numpy(), expected)
    assert dataset.slide_ranges() == [("a", 0, len(grid)), ("b", len(grid), 2 * len(grid))]

    pickle.dumps(dataset)  # after a read in this process: open handles are not pickled
    subset = torch.utils.data.Subset(dataset, range(0, len(dataset), max(1, len(dataset) // 24)))
    serial = [b["image"] for b in DataLoader(subset, batch_size=4, num_workers=0)]
    parallel = [b["image"] for b in DataLoader(subset, batch_size=4, num_workers=2)]
    assert len(serial) == len(parallel) and all(torch.equal(a, b) for a, b in zip(serial, parallel, strict=True))


def test_patch_dataset_bounds_open_slides(slide_path):
    grid = patch_grid(slide_path, mpp=1.0, patch_size=64)
    dataset = PatchDataset([SlidePatches(str(i), slide_path, grid) for i in range(5)], max_open_slides=2)
    for i in range(5):
        dataset[i * len(grid)]
    assert len(dataset._open) == 2
    with pytest.raises(IndexError):
        dataset[len(dataset)]
