"""Whole slides as lazy bags, and end-to-end MIL on slide files from the command line."""

from __future__ import annotations

import csv
import json
import pickle

import numpy as np
import pytest
import torch

from data_modules.cohort.splits import SplitConfig
from data_modules.datasets.slide_bags import PatchBagDataModule, SlideBag, SlideBagDataModule
from data_modules.slides import open_slide
from data_modules.slides.tiling import TilingConfig
from data_modules.synthetic import CohortSpec, make_cohort
from helpers import lenet_end_to_end
from icmil_pl.cli import main


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), CohortSpec(n_slides=8, seed=1, size=(768, 768)))


@pytest.fixture(scope="module")
def data(cohort, tmp_path_factory):
    data = SlideBagDataModule(
        str(cohort / "labels.csv"),
        str(cohort / "slides"),
        TilingConfig(mpp=1.0, patch_size=32, tissue_threshold=0.5),
        grid_cache=str(tmp_path_factory.mktemp("grids")),
        splits=SplitConfig(folds=3, val_fraction=0.5),
    )
    data.setup("fit")
    return data


def test_slide_bags_read_chunks_lazily(data, cohort):
    item = data.dataset("train")[0]
    bag = item["patches"]
    assert isinstance(bag, SlideBag) and len(bag) > 5
    chunk = bag[2:5]
    assert chunk.shape == (3, 3, 32, 32) and chunk.dtype == torch.uint8
    x, y = bag.coords[3]
    expected = open_slide(bag.patches.path).read_at_mpp((int(x), int(y)), (32, 32), mpp=1.0)
    np.testing.assert_array_equal(chunk[1].permute(1, 2, 0).numpy(), expected)
    single = SlideBag(bag.patches, threads=1)
    assert torch.equal(single[0 : len(single)], bag[0 : len(bag)])  # threaded reads are the same pixels, in order
    picked = bag.select(np.array([4, 1]))
    assert torch.equal(picked[0:2], torch.stack([bag[4:5][0], bag[1:2][0]]))
    assert pickle.loads(pickle.dumps(bag))._slide is None  # a handle never travels between processes
    with pytest.raises(TypeError, match="slices"):
        bag[3]


def test_a_bag_collected_in_one_of_its_own_reader_threads_closes_quietly(data):
    """The garbage collector may finalise a bag in any thread, one of its pool's included (seen in CI logs as
    "cannot join current thread"); closing there must not wait for itself."""
    bag = data.dataset("train")[0]["patches"]
    bag[0:4]  # opens the slide and starts the reader threads
    assert bag._pool is not None
    bag._pool.submit(bag.__del__).result()
    assert bag._slide is None and bag._pool is None


def test_the_former_name_still_builds_the_same_data_module(cohort, tmp_path):
    old = PatchBagDataModule(str(cohort / "labels.csv"), str(cohort / "slides"), grid_cache=str(tmp_path))
    assert isinstance(old, SlideBagDataModule)


@pytest.mark.parametrize("data_class, store", [("SlideBagDataModule", False), ("PatchBagDataModule", True)])
def test_end_to_end_fit_on_slides(cohort, tmp_path, data_class, store):
    """Also with a patch store: every slide the fit and its test read is stored decoded."""
    main(
        [
            "fit",
            "--seed_everything=0",
            *lenet_end_to_end(16),
            f"--data={data_class}",
            f"--data.labels={cohort / 'labels.csv'}",
            f"--data.slides={cohort / 'slides'}",
            "--data.tiling.mpp=1.0",
            "--data.tiling.patch_size=32",
            f"--data.grid_cache={tmp_path / 'grids'}",
            "--data.splits.folds=3",
            "--data.splits.val_fraction=0.5",
            "--trainer.max_epochs=1",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            *([f"--data.patch_store={tmp_path / 'store'}"] if store else []),
        ]
    )
    run = tmp_path / "lightning_logs" / "version_0"
    results = json.loads((run / "results.json").read_text())
    (entry,) = results["iterations"]
    assert results["model"] == "EndToEndMIL" and entry["iteration"] == 0
    for stage in ("val", "test"):
        assert set(entry[stage]) == {"auroc", "accuracy", "f1", "balanced_accuracy"}
        assert all(0.0 <= v <= 1.0 for v in entry[stage].values())
    assert entry["seconds"]["fit"] > 0 and (run / entry["checkpoint"]).is_file()
    assert entry["checkpoint"].startswith("checkpoints/")
    splits = json.loads((run / "splits.json").read_text())
    if store:
        stored = sorted(p.parent.name for p in (tmp_path / "store").glob("*/*.zarr"))
        assert stored == sorted(s for split in splits.values() for s in split)
    with (run / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["slide_id"] for r in rows) == sorted(splits["test"]) and rows  # one row per test slide
    for row in rows:
        p0, p1 = float(row["prob_0"]), float(row["prob_1"])
        assert p0 + p1 == pytest.approx(1.0, abs=1e-5) and row["predicted"] == ("1" if p1 > p0 else "0")
    accuracy = np.mean([r["predicted"] == r["label"] for r in rows])
    assert entry["test"]["accuracy"] == pytest.approx(accuracy)  # results.json and predictions.csv agree
