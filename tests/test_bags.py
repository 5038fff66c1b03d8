"""Whole slides as lazy bags, and end-to-end MIL on slide files from the command line."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from data_modules.bags import PatchBagDataModule, SlideBag
from data_modules.cohort import TilingConfig
from data_modules.slides import open_slide
from data_modules.synthetic import make_cohort
from icmil_pl.cli import main


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    make_cohort(root, 6, seed=1, size=(768, 768), mpp=0.5)
    return root


@pytest.fixture(scope="module")
def data(cohort, tmp_path_factory):
    data = PatchBagDataModule(str(cohort / "labels.csv"), str(cohort / "slides"),
                              TilingConfig(mpp=1.0, patch_size=32, tissue_threshold=0.5),
                              grid_cache=str(tmp_path_factory.mktemp("grids")), folds=3, val_fraction=0.5)
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
    assert torch.equal(single[0:len(single)], bag[0:len(bag)])  # threaded reads are the same pixels, in order
    picked = bag.select(np.array([4, 1]))
    assert torch.equal(picked[0:2], torch.stack([bag[4:5][0], bag[1:2][0]]))
    assert pickle.loads(pickle.dumps(bag))._slide is None  # a handle never travels between processes
    with pytest.raises(TypeError, match="slices"):
        bag[3]


def test_end_to_end_fit_on_slides(cohort, tmp_path):
    main(["fit", "--seed_everything=0",
          "--model=EndToEndMIL", "--model.embedder=LeNetEmbedder", "--model.embedder.image_size=32",
          "--model.aggregator=ABMIL", "--model.aggregator.in_dim=500", "--model.aggregator.hidden_dim=32",
          "--model.chunk_size=16",
          "--data=PatchBagDataModule", f"--data.labels={cohort / 'labels.csv'}", f"--data.slides={cohort / 'slides'}",
          "--data.tiling.mpp=1.0", "--data.tiling.patch_size=32", f"--data.grid_cache={tmp_path / 'grids'}",
          "--data.folds=3", "--data.val_fraction=0.5",
          "--trainer.max_epochs=1", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
          f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}"])
    results = next(tmp_path.glob("lightning_logs/version_0/results.json"))
    assert '"auroc"' in results.read_text()
