"""The patch store: slide bags keep their patches decoded after the first read and serve the same pixels from there;
extraction reads them too; a changed slide or tiling, or a killed writer, never serves stale or partial patches."""

from __future__ import annotations

import dataclasses
import os
import pickle
import socket

import numpy as np
import pytest
import torch

import data_modules.datasets.slide_bags as slide_bags
from data_modules.cohort.splits import SplitConfig
from data_modules.datasets.patch_store import PatchStore, PatchWriter
from data_modules.datasets.patches import PatchDataset, SlidePatchDataModule
from data_modules.datasets.slide_bags import SlideBag, SlideBagDataModule
from data_modules.slides.tiling import TilingConfig
from data_modules.synthetic import CohortSpec, make_cohort
from icmil_pl.callbacks import extract_features
from icmil_pl.encoders import PatchEmbedder


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), CohortSpec(n_slides=8, seed=1, size=(768, 768)))


def _bags(cohort, tmp_path, store: str | None) -> SlideBagDataModule:
    data = SlideBagDataModule(
        str(cohort / "labels.csv"),
        str(cohort / "slides"),
        TilingConfig(mpp=1.0, patch_size=16, tissue_threshold=0.5),
        grid_cache=str(tmp_path / "grids"),
        splits=SplitConfig(folds=3, val_fraction=0.5),
        patch_store=store,
    )
    data.setup("fit")
    return data


def _no_slides(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a slide was opened")

    monkeypatch.setattr(slide_bags, "open_slide", refuse)


def test_a_bag_is_decoded_once_and_then_read_from_the_store(cohort, tmp_path, monkeypatch):
    decoded = _bags(cohort, tmp_path, None).dataset("train")[0]["patches"]
    stored = _bags(cohort, tmp_path, str(tmp_path / "store")).dataset("train")[0]["patches"]
    n = len(decoded)
    assert n > 70  # more than one shard of 64
    expected = decoded[0:n]
    assert torch.equal(stored[3:7], expected[3:7])  # the first read stores the whole slide
    entry = PatchStore(tmp_path / "store").path(stored.patches, "bilinear")
    assert entry.is_dir() and entry.parent.name == stored.patches.slide_id
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temporary left
    _no_slides(monkeypatch)
    again = SlideBag(stored.patches)  # a later epoch: a fresh bag
    assert torch.equal(again[0:n], expected) and again[0:n].dtype == torch.uint8
    for chosen in ([n - 1, 4, 65], [5, 3, 7]):  # within-bag sampling, across chunks, out of order (not a run)
        assert torch.equal(again.select(np.array(chosen))[0:3], expected[chosen])
    assert pickle.loads(pickle.dumps(again))._store is None  # nothing open travels between processes


def test_extraction_reads_the_stored_patches(cohort, tmp_path, monkeypatch):
    bag = _bags(cohort, tmp_path, str(tmp_path / "store")).dataset("train")[0]["patches"]
    expected = bag[0 : len(bag)]
    dataset = PatchDataset([bag.patches])
    _no_slides(monkeypatch)
    monkeypatch.setattr(PatchDataset, "_slide", lambda self, i: pytest.fail("a slide was opened"))
    assert torch.equal(torch.stack([dataset[i]["image"] for i in (0, 5, len(bag) - 1)]), expected[[0, 5, -1]])


def test_a_changed_slide_or_tiling_is_another_entry_and_a_killed_writer_leaves_nothing_read(cohort, tmp_path):
    bag = _bags(cohort, tmp_path, str(tmp_path / "store")).dataset("train")[0]["patches"]
    store = PatchStore(tmp_path / "store")
    assert store.open(bag.patches, "bilinear") is None
    with pytest.raises(RuntimeError, match="killed"):

        def killed(coords):
            raise RuntimeError("killed")

        store.fill(bag.patches, "bilinear", killed)
    assert store.open(bag.patches, "bilinear") is None and not any(store.root.rglob("*.zarr*"))
    bag[0:1]
    assert store.open(bag.patches, "bilinear") is not None
    assert store.open(bag.patches, "nearest") is None  # another resampling filter
    moved = dataclasses.replace(bag.patches, grid=dataclasses.replace(bag.patches.grid, mpp=0.5))
    assert store.open(moved, "bilinear") is None  # another tiling
    os.utime(bag.patches.path, (1, 1))  # the slide file changed
    assert store.open(bag.patches, "bilinear") is None


def test_a_second_writer_of_a_stored_slide_gets_the_first_ones_patches(cohort, tmp_path):
    bag = _bags(cohort, tmp_path, str(tmp_path / "store")).dataset("train")[0]["patches"]
    store = PatchStore(tmp_path / "store")
    first = store.fill(bag.patches, "bilinear", lambda coords: bag._decode(coords).numpy())
    second = store.fill(bag.patches, "bilinear", lambda coords: np.zeros((len(coords), 3, 16, 16), np.uint8))
    assert np.array_equal(second[:], first[:]) and second[:].any()
    late = PatchWriter(store.path(bag.patches, "bilinear"), len(bag), 16)  # began before the first one's rename
    late.append(np.zeros((len(bag), 3, 16, 16), np.uint8))
    assert np.array_equal(late.commit()[:], first[:])  # its rename loses, and its temporary goes
    assert len(list(store.path(bag.patches, "bilinear").parent.iterdir())) == 1


def test_the_first_extraction_stores_every_slide_it_embeds(cohort, tmp_path):
    """The feature writer stores each slide's patches as it embeds them; a second extraction reads them from there
    and gives the same features."""
    tiling = TilingConfig(mpp=1.0, patch_size=16, tissue_threshold=0.5)

    def extract(store: str | None, cache: str):
        data = SlidePatchDataModule(
            str(cohort / "labels.csv"), str(cohort / "slides"), tiling, str(tmp_path / "grids"), 50, 0,
            patch_store=store,
        )  # fmt: skip
        torch.manual_seed(0)
        embedder = PatchEmbedder("resnet18", truncate_after="layer1")
        kwargs = {"accelerator": "cpu", "enable_progress_bar": False}
        return data, extract_features(embedder, data, str(tmp_path / cache), dtype="float32", trainer_kwargs=kwargs)

    data, plain = extract(None, "plain")
    _, first = extract(str(tmp_path / "store"), "first")
    store = PatchStore(tmp_path / "store")
    assert len(data.slide_patches) == 8
    for entry in data.slide_patches:
        stored = store.open(dataclasses.replace(entry, patch_store=str(store.root)), "bilinear")
        bag = SlideBag(entry)
        assert stored is not None and np.array_equal(stored[:], bag[0 : len(bag)].numpy())
        np.testing.assert_array_equal(first.read(entry.slide_id).features, plain.read(entry.slide_id).features)
    assert not [p for p in store.root.rglob(".*") if p.is_dir()]  # no temporaries
    _, second = extract(str(tmp_path / "store"), "second")  # reads the store: the same features
    for entry in data.slide_patches:
        np.testing.assert_array_equal(second.read(entry.slide_id).features, plain.read(entry.slide_id).features)


def test_the_next_writer_removes_what_a_killed_writer_left_on_this_host(cohort, tmp_path):
    bag = _bags(cohort, tmp_path, str(tmp_path / "store")).dataset("train")[0]["patches"]
    store = PatchStore(tmp_path / "store")
    final = store.path(bag.patches, "bilinear")
    host = socket.gethostname()
    dead = final.parent / f".{final.name}.{host}-{2**22 + 7}-0000abcd"  # above any pid this kernel hands out
    live = final.parent / f".{final.name}.{host}-{os.getpid()}-0000abcd"
    elsewhere = final.parent / f".{final.name}.another-host-{2**22 + 7}-0000abcd"
    for folder in (dead, live, elsewhere):
        folder.mkdir(parents=True)
    store.writer(bag.patches, "bilinear").abort()
    assert not dead.exists() and live.is_dir() and elsewhere.is_dir()
