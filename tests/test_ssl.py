"""Self-supervised pretraining from its config: the weights file loads into a PatchEmbedder, the linear probe is
measured before and after every epoch against the generator's masks, and the held-out truth is the masks'."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from data_modules.datasets.patches import SlidePatchDataModule
from data_modules.datasets.unlabelled_patches import UnlabelledPatchDataModule
from data_modules.slides.tiling import TilingConfig
from data_modules.synthetic import slide_infos, tumour_patches
from icmil_pl.cli import main
from icmil_pl.encoders import PatchEmbedder

CONF = Path(__file__).parent / "conf" / "ssl.yaml"


def _args(cohort: Path, out: Path) -> list[str]:
    return [
        "fit",
        "-c",
        str(CONF),
        f"--model.init_args.weights={out / 'ssl' / 'embedder.pt'}",
        f"--data.init_args.cohort.init_args.labels={cohort / 'labels.csv'}",
        f"--data.init_args.cohort.init_args.slides={cohort / 'slides'}",
        f"--data.init_args.cohort.init_args.grid_cache={out / 'grids'}",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out / 'logs'}",
    ]


def test_pretraining_writes_weights_the_embedder_loads_and_a_probe_by_epoch(icmil_cohort, tmp_path, capsys):
    cli = main(_args(icmil_cohort, tmp_path))
    weights = tmp_path / "ssl" / "embedder.pt"
    loaded = PatchEmbedder("resnet18", truncate_after="layer1", weights=str(weights))
    trained = cli.model.embedder.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())
    assert loaded.weights_hash() != PatchEmbedder("resnet18", truncate_after="layer1").weights_hash()

    probes = cli.model.probe_aurocs
    assert len(probes) == 3 and all(0 <= p <= 1 for p in probes)  # before training, after epochs 0 and 1
    assert (tmp_path / "ssl" / "embedder_probe.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert f"embedder weights: {weights}" in printed and "linear-probe patch AUROC by epoch" in printed
    (metrics,) = (tmp_path / "logs").rglob("metrics.csv")
    with metrics.open() as fh:
        rows = list(csv.DictReader(fh))
    logged = [float(r["val/probe_auroc"]) for r in rows if r.get("val/probe_auroc")]
    assert logged == [round(p, 6) for p in probes[1:]] or np.allclose(logged, probes[1:], atol=1e-6)
    assert any(r.get("train/loss") for r in rows) and any(r.get("val/loss") for r in rows)


def test_held_out_truth_comes_from_the_tumour_masks(icmil_cohort, tmp_path):
    tiling = TilingConfig(mpp=1.0, patch_size=32, tissue_threshold=0.5)
    cohort = SlidePatchDataModule(str(icmil_cohort / "labels.csv"), str(icmil_cohort / "slides"), tiling, str(tmp_path))
    data = UnlabelledPatchDataModule(cohort, views=lambda image: [image, image], val_fraction=0.3, batch_size=8)
    data.setup()
    truth, slide_of = data.val_truth()
    infos = slide_infos(icmil_cohort)
    dataset = data.samples.dataset
    for k, index in enumerate(data.samples.val_indices[:50]):
        item = dataset[int(index)]
        assert dataset.slides[slide_of[k]].slide_id == item["slide_id"]
        side = dataset.slides[slide_of[k]].grid.level0_size
        assert truth[k] == tumour_patches(infos[item["slide_id"]], item["coords"].numpy()[None], side)[0]
        assert len(item["views"]) == 2 and torch.equal(item["views"][0], item["image"])
    assert 0 < truth.sum() < len(truth)
    rows = (icmil_cohort / "labels.csv").read_text().splitlines()
    (tmp_path / "labels.csv").write_text("".join(line.rsplit(",", 1)[0] + "\n" for line in rows))
    plain = UnlabelledPatchDataModule(
        SlidePatchDataModule(str(tmp_path / "labels.csv"), str(icmil_cohort / "slides")), views=lambda i: [i, i]
    )
    plain.samples = data.samples  # a cohort without annotations has no truth
    assert plain.val_truth() is None
