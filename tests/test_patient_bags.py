"""Patient-level bags (`bag_level: patient`): a patient's slides as one bag, read across slide boundaries, trained,
tested and predicted from features, with per-slide scores; BagGradient holds out patients whole; the exact chunked
gradient over a patient's concatenated slides; and an ICMIL run with patient bags from the command line."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from data_modules import slide_bags
from data_modules.cohort.splits import SplitConfig
from data_modules.datasets.feature_bags import FeatureBagDataModule
from data_modules.datasets.patient_bags import ConcatBag, PatientBags
from helpers import assert_same_chunked_gradients, icmil_args, lenet_end_to_end, write_labels
from icmil_pl.aggregators import ABMIL
from icmil_pl.bag_classifier import BagClassifier
from icmil_pl.cli import main
from icmil_pl.coupling import bag_gradient
from icmil_pl.coupling.bag_gradient import hold_out_bags
from icmil_pl.outputs.patch_scores import read_scores, scored_slides
from icmil_pl.results import read_results, record_fit
from icmil_pl.tasks import Classification


class _Tensors:
    """A lazy bag over a tensor, with the `select` a slide bag has."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: slice) -> torch.Tensor:
        return self.data[index]

    def select(self, indices: np.ndarray) -> _Tensors:
        return _Tensors(self.data[torch.as_tensor(indices)])


def test_a_concatenated_bag_reads_across_its_slides_and_selects_in_order():
    a, b, c = torch.arange(5.0), torch.arange(10.0, 13.0), torch.arange(20.0, 24.0)
    bag, full = ConcatBag([_Tensors(a), _Tensors(b), _Tensors(c)]), torch.cat([a, b, c])
    assert len(bag) == 12
    for start, stop in [(0, 12), (3, 9), (5, 8), (4, 5), (11, 12), (7, 7)]:
        torch.testing.assert_close(bag[start:stop], full[start:stop])
    picked = bag.select(np.array([1, 4, 5, 9, 11]))
    torch.testing.assert_close(picked[0:5], full[[1, 4, 5, 9, 11]])
    with pytest.raises(TypeError, match="ConcatBag supports slices"):
        bag[3]


def test_the_chunked_gradient_over_a_patients_slides_equals_the_full_bag():
    torch.manual_seed(0)
    embedder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 6))
    head = ABMIL(6, num_classes=2, hidden_dim=8, attention_dim=4)
    slides = [torch.randn(n, 3, 4, 4) for n in (7, 3, 6)]

    def loss(h):
        return torch.nn.functional.cross_entropy(head(h).logits.unsqueeze(0), torch.tensor([1]))

    assert_same_chunked_gradients(
        embedder, head, loss, [(torch.cat(slides), 16), (ConcatBag([_Tensors(s) for s in slides]), 5)]
    )


def _cohort(tmp_path, patients: int = 18) -> tuple[list[tuple], object]:
    """Two slides per patient (10 and 6 patches of 8-d features); a tumour patient's first slide alone carries the
    signal, as when one block of a resection holds the tumour."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "feats"
    folder.mkdir()
    rows = []
    for p in range(patients):
        label = p % 2
        for k, n in enumerate((10, 6)):
            features = rng.normal(size=(n, 8)).astype(np.float32)
            if label and k == 0:
                features[:3, 0] += 6
            with h5py.File(folder / f"p{p}_{k}.h5", "w") as fh:
                fh["features"] = features
                fh["coords"] = np.stack([np.arange(n) * 32, np.full(n, 64 * k)], 1).astype(np.int64)
            rows.append((f"p{p}_{k}", str(label), f"p{p}"))
    return rows, folder


def test_patient_bags_hold_every_slide_of_a_patient_in_csv_order(tmp_path):
    rows, folder = _cohort(tmp_path)
    labels = write_labels(tmp_path / "labels.csv", rows)
    data = FeatureBagDataModule(str(labels), str(folder), splits=SplitConfig(folds=3), bag_level="patient")
    data.setup("fit")
    bags = data.dataset("test")
    assert len(bags) == len(data.splits["test"]) // 2
    bag = bags[0]
    first, second = (h5py.File(folder / f"{bag['slide_id']}_{k}.h5") for k in (0, 1))
    assert bag["slides"] == [(f"{bag['slide_id']}_0", 10), (f"{bag['slide_id']}_1", 6)]
    torch.testing.assert_close(
        bag["features"], torch.from_numpy(np.concatenate([first["features"], second["features"]]))
    )
    assert bag["coords"][10:, 1].eq(64).all() and len(bag["coords"]) == 16  # each slide's own coordinates
    assert len(data.bag_targets("train")) == len(data.splits["train"]) // 2
    assert len(data.predict_dataloader()) == 18

    rows[1] = ("p0_1", "1", "p0")
    labels = write_labels(tmp_path / "mixed.csv", rows)
    data = FeatureBagDataModule(str(labels), str(folder), splits=SplitConfig(folds=3), bag_level="patient")
    with pytest.raises(ValueError, match=r"mixed\.csv: patient 'p0' has slides with different targets \('p0_0' and"):
        data.predict_dataloader()


def test_a_patient_level_model_trains_and_predicts_each_slide(tmp_path):
    rows, folder = _cohort(tmp_path)
    labels = write_labels(tmp_path / "labels.csv", rows)
    data = FeatureBagDataModule(
        str(labels), str(folder), splits=SplitConfig(folds=3, val_fraction=0.25), bag_level="patient"
    )
    torch.manual_seed(0)
    model = BagClassifier(ABMIL(8, num_classes=2, hidden_dim=16), lr=5e-3)
    trainer = pl.Trainer(max_epochs=12, accelerator="cpu", logger=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    out = record_fit(trainer, model, data, 1.0)
    assert read_results(out)["iterations"][0]["test"]["auroc"] > 0.9  # the signal is in one slide of two
    with (out / "predictions.csv").open() as fh:
        written = list(csv.DictReader(fh))
    assert list(written[0])[:3] == ["patient_id", "label", "predicted"]
    assert sorted(r["patient_id"] for r in written) == sorted({s[:-2] for s in data.splits["test"]})

    trainer.predict(model, datamodule=data)
    root = next(p.parent for p in tmp_path.rglob("scores.zarr"))
    names = list(scored_slides(root))
    assert sorted(names) == sorted(r[0] for r in rows)  # per slide, not per patient
    first, second = read_scores(root, "p1_0"), read_scores(root, "p1_1")
    assert (len(first.coords), len(second.coords)) == (10, 6)
    assert first.slide_probs == second.slide_probs  # the patient's one prediction
    attention = np.concatenate([first.scores, second.scores])
    assert attention.sum() == pytest.approx(1.0, abs=1e-4)  # one softmax over the patient's patches
    assert first.scores[:3].min() > second.scores.max()  # the tumour slide's signal patches lead


def test_bag_gradient_holds_out_patients_whole():
    slides = [f"p{p}_{k}" for p in range(10) for k in range(3)]
    patients = {s: s.split("_")[0] for s in slides}
    labels = {s: torch.tensor(int(s[1]) % 2) for s in slides}
    fit, val = hold_out_bags(slides, labels, patients, Classification(), 0.3, seed=0)
    assert sorted(fit + val) == sorted(slides) and val
    assert not {patients[s] for s in fit} & {patients[s] for s in val}
    assert len(val) == 12 and {int(labels[s]) for s in val} == {0, 1}  # 2 of each class's 5 patients
    assert hold_out_bags(slides, labels, None, Classification(), 0.3, seed=0)[1] != val  # slides, not patients


def _paired(cohort) -> list[tuple[str, str, str]]:
    """The cohort's slides as (slide_id, label, patient_id), two slides of one label per patient."""
    with (cohort / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    by_label: dict[str, list[str]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row["slide_id"])
    return [(slide, label, f"{label}-{i // 2}") for label, ids in by_label.items() for i, slide in enumerate(ids)]


def test_end_to_end_trains_on_patient_bags_of_lazy_slides(icmil_cohort, tmp_path):
    paired = _paired(icmil_cohort)
    labels = write_labels(tmp_path / "patients.csv", paired)
    common = [
        "--seed_everything=0",
        *lenet_end_to_end(16),
        "--data=SlideBagDataModule",
        f"--data.labels={labels}",
        f"--data.slides={icmil_cohort / 'slides'}",
        "--data.tiling.mpp=1.0",
        "--data.tiling.patch_size=32",
        f"--data.grid_cache={tmp_path / 'grids'}",
        "--data.splits.folds=3",
        "--data.splits.val_fraction=0.5",
        "--data.bag_level=patient",
        "--trainer.max_epochs=1",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    main(["fit", *common])
    run = tmp_path / "lightning_logs" / "version_0"
    with (run / "predictions.csv").open() as fh:
        written = list(csv.DictReader(fh))
    patient_of = {slide: patient for slide, _, patient in paired}
    splits = json.loads((run / "splits.json").read_text())
    assert sorted(r["patient_id"] for r in written) == sorted({patient_of[s] for s in splits["test"]})
    main(
        [
            "predict",
            *common,
            f"--ckpt_path={run / json.loads((run / 'results.json').read_text())['iterations'][0]['checkpoint']}",
        ]
    )
    root = next(p.parent for p in tmp_path.rglob("scores.zarr"))
    assert sorted(scored_slides(root)) == sorted(patient_of)  # every slide scored, drawn on its own
    assert len(list(root.glob("figures/*_heatmap.png"))) == len(patient_of)


def test_an_icmil_run_with_patient_bags_couples_through_bag_gradient(icmil_cohort, tmp_path, monkeypatch):
    coupled: list[list] = []  # the slides of each bag BagGradient stepped on

    class Recorded(PatientBags):
        def __getitem__(self, index: int) -> dict:
            bag = super().__getitem__(index)
            coupled.append([slide for slide, _ in bag["slides"]])
            return bag

    monkeypatch.setattr(slide_bags, "PatientBags", Recorded)
    paired = _paired(icmil_cohort)
    labels = write_labels(tmp_path / "patients.csv", paired)
    main(
        icmil_args(
            icmil_cohort,
            tmp_path,
            "fit",
            f"--data.init_args.labels={labels}",
            "--model.init_args.bag_level=patient",
            '--model.init_args.coupling={"class_path": "BagGradient", "init_args": {"chunk_size": 8, '
            '"max_instances": 16, "max_epochs": 1, "read_threads": 1}}',
        )
    )
    patient_of = {slide: patient for slide, _, patient in paired}
    assert coupled and any(len(slides) == 2 for slides in coupled)
    assert all(len({patient_of[s] for s in slides}) == 1 for slides in coupled)
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert len(results["iterations"]) == 2 and all("auroc" in it["test"] for it in results["iterations"])
    predictions = next((run / "iter1").rglob("predictions.csv"))
    with predictions.open() as fh:
        written = list(csv.DictReader(fh))
    splits = json.loads((run / "splits.json").read_text())
    assert list(written[0])[0] == "patient_id"
    assert sorted(r["patient_id"] for r in written) == sorted({patient_of[s] for s in splits["test"]})


def test_bag_gradient_holds_out_patients_whole_with_slide_bags_too(icmil_cohort, tmp_path, monkeypatch):
    """Under the default `bag_level: slide` the coupling's own hold-out used to split patients (on the demo, seed 2,
    patient_009 and patient_017 on both sides), selecting coupling epochs on leaked validation."""
    held: list[dict] = []  # the coupling's (train, val) slides

    class Recorded(slide_bags.SlideBagSplits):
        def __init__(self, splits, labels, threads, seed, patients=None) -> None:
            held.append({name: [s.slide_id for s in slides] for name, slides in splits.items()})
            assert patients is None  # bags of one slide
            super().__init__(splits, labels, threads, seed, patients)

    monkeypatch.setattr(bag_gradient, "SlideBagSplits", Recorded)
    rows = []  # a class's first 6 slides: 2 training patients of 2 slides, one validation and one test slide
    for label in ("0", "1"):
        slides = [slide for slide, of, _ in _paired(icmil_cohort) if of == label][:6]
        patients = [f"{label}-a", f"{label}-a", f"{label}-b", f"{label}-b", slides[4], slides[5]]
        rows += zip(slides, [label] * 6, patients, ["train"] * 4 + ["val", "test"], strict=True)
    labels = write_labels(tmp_path / "patients.csv", rows, ("slide_id", "label", "patient_id", "split"))
    main(
        icmil_args(
            icmil_cohort,
            tmp_path,
            "fit",
            f"--data.init_args.labels={labels}",
            '--model.init_args.coupling={"class_path": "BagGradient", "init_args": {"chunk_size": 8, '
            '"max_instances": 16, "max_epochs": 1, "read_threads": 1, "val_fraction": 0.75}}',
        )
    )
    patient_of = {slide: patient for slide, _, patient, _ in rows}
    (split,) = held
    assert split["val"] and split["train"]
    assert not {patient_of[s] for s in split["train"]} & {patient_of[s] for s in split["val"]}
