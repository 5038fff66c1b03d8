"""ICMIL coupling: the distillation loss by hand, confidence weights, augmentation, and both strategies fitting on tiny
generated slides on the CPU (the input embedder and head untouched, the teacher never trained)."""

from __future__ import annotations

import copy
import csv

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from torchmetrics.classification import MultilabelAccuracy

from data_modules.datasets.augment import random_flip_resized_crop
from data_modules.slides.tiling import SlidePatches, TissueParams, patch_grid
from data_modules.synthetic import CohortSpec, make_cohort
from icmil_pl.aggregators import ABMIL, DSMIL, DTFDMIL
from icmil_pl.bag_classifier import BagClassifier
from icmil_pl.coupling import (
    BagGradient,
    Distillation,
    StandardizedHead,
    confidence_weights,
    distillation_loss,
    reduced_features,
)
from icmil_pl.coupling.distillation import DistillationModule
from icmil_pl.coupling.distillation import strategy as distillation_strategy
from icmil_pl.encoders import LoRA, PatchEmbedder
from icmil_pl.tasks import MultiLabel
from icmil_pl.tasks.ordinal import Ordinal

# ---------------------------------------------------------------------------------------------------- pure functions


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * np.log(p / q)).sum(1)


T = np.array([[2.0, 0.0], [0.5, 1.5]])  # teacher instance logits
S = np.array([[1.0, 1.0], [0.0, 2.0]])  # student head on student features
U = np.array([[1.5, 0.5], [1.0, 1.0]])  # student head on teacher features
ZT = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]])  # teacher reduced features
ZS = np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 1.0]])  # student reduced features


def test_distillation_loss_equals_hand_computation():
    k1, k2, k3 = _kl(_softmax(T), _softmax(S)), _kl(_softmax(T), _softmax(U)), _kl(_softmax(ZT), _softmax(ZS))
    np.testing.assert_allclose(k1, [0.32781333, 0.08260774], rtol=1e-6)  # the numbers, written out
    expected = k1.mean() + 0.5 * k2.mean() + 0.5 * k3.mean()
    assert expected == pytest.approx(0.30180245, rel=1e-7)

    t, s, u, zt, zs = (torch.tensor(x, dtype=torch.float32) for x in (T, S, U, ZT, ZS))
    loss = distillation_loss(t, s, u, zt, zs, head_weight=0.5, feature_weight=0.5)
    assert loss.total.item() == pytest.approx(expected, rel=1e-5)
    assert loss.instance.item() == pytest.approx(k1.mean(), rel=1e-5)
    assert loss.head.item() == pytest.approx(k2.mean(), rel=1e-5)
    assert loss.feature.item() == pytest.approx(k3.mean(), rel=1e-5)
    # the teacher is the target: each term is kl_div(student log-probs, teacher, batchmean)
    batchmean = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    assert loss.instance.item() == pytest.approx(batchmean.item(), rel=1e-6)

    weighted = distillation_loss(t, s, u, zt, zs, head_weight=0.5, feature_weight=0.5, weights=torch.tensor([1, 0.25]))
    assert weighted.total.item() == pytest.approx(0.27082455, rel=1e-5)  # (k1 . [1, 0.25]) / 2 + the same others
    no_features = distillation_loss(t, s, u, head_weight=2.0)
    assert no_features.total.item() == pytest.approx(k1.mean() + 2.0 * k2.mean(), rel=1e-5)


def test_the_authors_reduction_is_the_mean_over_every_element():
    """KLDivLoss(reduction="none")(...).mean(), as the authors' code: the logit terms over B x C elements, the feature
    term over B x D."""
    k1, k2, k3 = _kl(_softmax(T), _softmax(S)), _kl(_softmax(T), _softmax(U)), _kl(_softmax(ZT), _softmax(ZS))
    t, s, u, zt, zs = (torch.tensor(x, dtype=torch.float32) for x in (T, S, U, ZT, ZS))
    loss = distillation_loss(t, s, u, zt, zs, reduction="mean", weights=torch.tensor([1.0, 0.25]))
    assert loss.instance.item() == pytest.approx((k1 * [1.0, 0.25]).sum() / (2 * 2), rel=1e-5)
    assert loss.head.item() == pytest.approx(k2.sum() / (2 * 2), rel=1e-5)
    assert loss.feature.item() == pytest.approx(k3.sum() / (2 * 3), rel=1e-5)
    assert loss.total.item() == pytest.approx(loss.instance.item() + 0.5 * (loss.head + loss.feature).item(), rel=1e-6)
    elementwise = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), log_target=True, reduction="none").mean()
    assert loss.feature.item() == pytest.approx(elementwise.item(), rel=1e-6)  # what the authors' code computes


def test_a_multilabel_teacher_is_a_binary_teacher_per_label():
    """With sigmoid outputs each label's logit x is the two-class softmax of (0, x): the logit terms are the sum over
    labels of those binary KLs, by hand, and a two-class softmax head gives the same loss as its logit difference."""
    t, s, u = (torch.tensor(x, dtype=torch.float32) for x in (T, S, U))

    def binary(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # sum over labels of KL(softmax(0, a_l) || softmax(0, b_l))
        pairs = [
            _kl(_softmax(np.stack([0 * a[:, j], a[:, j]], 1)), _softmax(np.stack([0 * b[:, j], b[:, j]], 1)))
            for j in range(a.shape[1])
        ]
        return np.sum(pairs, axis=0)

    loss = distillation_loss(t, s, u, head_weight=0.5, feature_weight=0.0, outputs="sigmoid")
    assert loss.instance.item() == pytest.approx(binary(T, S).mean(), rel=1e-5)
    assert loss.head.item() == pytest.approx(binary(T, U).mean(), rel=1e-5)
    margin = [x[:, 1:] - x[:, :1] for x in (t, s, u)]  # a two-class head's one binary choice
    as_labels = distillation_loss(*margin, head_weight=0.5, outputs="sigmoid")
    as_classes = distillation_loss(t, s, u, head_weight=0.5)
    assert as_labels.total.item() == pytest.approx(as_classes.total.item(), rel=1e-5)


@pytest.mark.parametrize("feature_input, reaches", [("teacher", False), ("student", True)])
def test_the_feature_term_reaches_the_embedder_only_on_student_features(feature_input, reaches):
    """The authors' feature term reduces the teacher's features with the student head: it trains the head, never the
    embedder. Ours reduces the student's augmented features, so it trains the embedder too."""
    embedder, bag = _models()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)

    def embedder_grad(feature_weight: float) -> torch.Tensor:
        cfg = Distillation(head_weight=0.0, feature_weight=feature_weight, feature_input=feature_input)
        module = DistillationModule(embedder, bag, cfg, seed=0)
        torch.manual_seed(1)  # the same augmented view in both calls
        with pytest.warns(UserWarning, match="self.log"):  # no Trainer here: nothing is logged
            module.training_step({"image": images}, 0).backward()
        return torch.cat([p.grad.flatten() for p in module.student.parameters() if p.grad is not None])

    assert torch.equal(embedder_grad(0.5), embedder_grad(0.0)) is not reaches


def test_confidence_weights():
    scores = torch.tensor([-1.0, 0.5, 2.0])  # a = [0, 0.5, 1]
    torch.testing.assert_close(confidence_weights(scores, 2.0), torch.tensor([1.0, 0.0, 1.0]))
    scores = torch.tensor([0.0, 1.0, 4.0, 3.0])  # a = [0, 0.25, 1, 0.75] -> |2a - 1| = [1, 0.5, 1, 0.5]
    torch.testing.assert_close(confidence_weights(scores, 6.0), torch.tensor([1.0, 0.5**6, 1.0, 0.5**6]))
    torch.testing.assert_close(confidence_weights(scores, None), torch.ones(4))
    torch.testing.assert_close(confidence_weights(torch.full((3,), 1 / 3), 6.0), torch.ones(3))  # no information


def test_confidence_weights_come_from_the_raw_attention_scores():
    """TMI ICMIL min-maxes the teacher's scores before the softmax (ABMIL isNorm=False); the softmax is not a
    rescaling, so weights of softmaxed attention differ, and are near 1 for most patches."""
    torch.manual_seed(0)
    head = ABMIL(8, hidden_dim=16, attention_dim=4)
    h = torch.randn(100, 8)
    scores = head.attention_scores(h)
    assert scores.shape == (100,)
    torch.testing.assert_close(torch.softmax(scores, 0), head(h).attention)  # the scores the bag's softmax takes
    a = (scores - scores.min()) / (scores.max() - scores.min())  # the hand computation, beta 6
    torch.testing.assert_close(confidence_weights(scores, 6.0), (2 * a - 1).abs() ** 6)
    softmaxed = confidence_weights(head(h).attention, 6.0)
    assert not torch.allclose(softmaxed, confidence_weights(scores, 6.0))
    _, bag = _models(ABMIL(8, hidden_dim=16, attention_dim=4))
    standardized = StandardizedHead(bag, frozen=True)  # the teacher: standardisation folded in
    expected = bag.aggregator.attention_scores((h - bag.feature_mean) / bag.feature_std)
    torch.testing.assert_close(standardized.attention_scores(h), expected)
    assert DSMIL(8).attention_scores(h) is None


def test_dtfd_dual_confidence_weights_by_hand():
    """The authors' DTFD "dual" weights: each tier's attention softmaxed over the batch (their default isNorm),
    min-max normalised, multiplied, then |2a - 1|^beta."""
    scores = torch.tensor([[0.0, 0.0], [1.0, 2.0], [2.0, 1.0], [3.0, 3.0]])  # (N, 2): tier 1, tier 2
    e1, e2 = np.exp([0.0, 1.0, 2.0, 3.0]), np.exp([0.0, 2.0, 1.0, 3.0])  # min-max of a softmax = of exp(score)
    a = (e1 - e1.min()) / (e1.max() - e1.min()) * (e2 - e2.min()) / (e2.max() - e2.min())
    np.testing.assert_allclose(a, [0.0, 0.03013855, 0.03013855, 1.0], rtol=1e-6)  # the numbers, written out
    torch.testing.assert_close(confidence_weights(scores, 2.0), torch.tensor(np.abs(2 * a - 1) ** 2).float())
    torch.testing.assert_close(confidence_weights(scores[:, 0], 2.0), torch.tensor([1.0, 1 / 9, 1 / 9, 1.0]))
    flat = torch.tensor([[0.0, 1.0], [0.0, 2.0]])  # tier 1 says nothing
    torch.testing.assert_close(confidence_weights(flat, 2.0), torch.ones(2))

    torch.manual_seed(0)
    head = DTFDMIL(8, hidden_dim=16, attention_dim=4)
    h = torch.randn(5, 8)
    z = head.reduce(h)
    expected = torch.stack([head.tier1_attention(z), head.tier2_attention(z)], dim=1)
    torch.testing.assert_close(head.attention_scores(h), expected)
    torch.testing.assert_close(head.tier1_instance_logits(h), head.tier1_classifier(z))


def test_dtfd_teacher_mixes_the_tiers():
    """TMI's DTFD teacher: 0.7 x tier-2 + 0.3 x tier-1 classifier on each patch's reduced feature."""
    torch.manual_seed(0)
    embedder, bag = _models(DTFDMIL(64, hidden_dim=16, attention_dim=4))
    module = DistillationModule(embedder, bag, Distillation(tier1_weight=0.3, confidence_beta=2.0), seed=0)
    features = torch.randn(6, 64)
    z = bag.aggregator.reduce((features - bag.feature_mean) / bag.feature_std)
    expected = 0.7 * bag.aggregator.tier2_classifier(z) + 0.3 * bag.aggregator.tier1_classifier(z)
    torch.testing.assert_close(module.teacher_logits(features), expected)
    plain = DistillationModule(embedder, bag, Distillation(), seed=0)
    torch.testing.assert_close(plain.teacher_logits(features), bag.aggregator.tier2_classifier(z))


def test_flip_resized_crop():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    whole = random_flip_resized_crop(images, scale=(1.0, 1.0), generator=torch.Generator().manual_seed(0))
    x = images.float() / 255
    flips = [x, x.flip(-1), x.flip(-2), x.flip(-1, -2)]
    matches = [[torch.allclose(whole[i], f[i], atol=1e-5) for f in flips] for i in range(16)]
    assert all(sum(m) == 1 for m in matches)  # scale 1: the whole patch, exactly one of its four flips
    assert len({m.index(True) for m in matches}) == 4  # and all four occur

    images = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8).expand(64, 3, 8, 8) / 63
    crops = random_flip_resized_crop(images, scale=(0.25, 0.25), generator=torch.Generator().manual_seed(1))
    assert crops.shape == images.shape and crops.min() >= 0 and crops.max() <= 1
    # a quarter of the area, resized to the full patch: the value range shrinks, to 1/2 of it for a square crop
    spans = crops.amax((1, 2, 3)) - crops.amin((1, 2, 3))
    assert (spans < 0.9).all() and (spans > 0.3).all()
    again = random_flip_resized_crop(images, scale=(0.25, 0.25), generator=torch.Generator().manual_seed(1))
    assert torch.equal(crops, again)


def test_reduced_features_are_the_heads_hidden_layer():
    head = ABMIL(8, hidden_dim=4).eval()
    h = torch.randn(5, 8)
    torch.testing.assert_close(reduced_features(head, h), head.embed(h))
    assert reduced_features(DSMIL(8), h) is None
    bag = BagClassifier(head)
    bag.feature_mean.fill_(1.0)
    bag.feature_std.fill_(2.0)
    standardized = StandardizedHead(bag, frozen=True)
    torch.testing.assert_close(standardized.instance_logits(h), bag.instance_logits(h))
    torch.testing.assert_close(standardized.reduced_features(h), head.embed((h - 1) / 2))
    standardized.train()
    assert not standardized.training and not any(p.requires_grad for p in standardized.parameters())


# ---------------------------------------------------------------------------------------------------------- fitting


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[list[SlidePatches], dict[str, int]]:
    root = make_cohort(tmp_path_factory.mktemp("cohort"), CohortSpec(n_slides=4, seed=0, size=(512, 512)))
    tissue = TissueParams(mask_mpp=2.0, min_object_um2=0)  # a 256 um slide: finer mask, no speck removal
    with (root / "labels.csv").open() as fh:
        labels = {row["slide_id"]: int(row["label"]) for row in csv.DictReader(fh)}
    slides = []
    for slide_id in sorted(labels):
        path = next((root / "slides").glob(f"{slide_id}.*"))
        slides.append(SlidePatches(slide_id, path, patch_grid(path, mpp=1.0, patch_size=32, tissue=tissue)))
    return slides, labels


def _models(aggregator=None) -> tuple[PatchEmbedder, BagClassifier]:
    torch.manual_seed(0)
    embedder = PatchEmbedder("resnet18", truncate_after="layer1")
    bag = BagClassifier(aggregator or ABMIL(64, hidden_dim=32, attention_dim=16))
    bag.feature_mean.uniform_(0.0, 1.0)  # standardisation is part of the head
    bag.feature_std.uniform_(0.5, 2.0)
    return embedder, bag


class _Probe(pl.Callback):
    """Records, after every backward, whether a frozen part got a gradient, and the module the strategy built."""

    def __init__(self, frozen: str) -> None:
        self.frozen, self.frozen_grads, self.steps, self.start = frozen, 0, 0, None

    def on_train_start(self, trainer, pl_module) -> None:
        self.module = pl_module
        self.start = copy.deepcopy(getattr(pl_module, self.frozen.split(",")[0]).state_dict())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps += 1
        for name in self.frozen.split(","):
            self.frozen_grads += sum(p.grad is not None for p in getattr(pl_module, name).parameters())


def _trainer_kwargs(tmp_path, *callbacks, **kwargs) -> dict:
    return dict(
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path, name="log"),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **kwargs,
    )


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_distillation_fit(cohort, tmp_path):
    slides, _ = cohort
    embedder, bag = _models()
    before, bag_before = copy.deepcopy(embedder), copy.deepcopy(bag)
    probe = _Probe("teacher,teacher_head")
    strategy = Distillation(
        lr=1e-3, batch_size=16, patches_per_epoch=64, confidence_beta=6.0, num_workers=0, max_epochs=2
    )
    student = strategy.fit(
        embedder, bag, slides, trainer_kwargs=_trainer_kwargs(tmp_path, probe), root=tmp_path, seed=0
    )

    assert isinstance(student, PatchEmbedder) and student is not embedder
    assert student.weights_hash() != before.weights_hash()
    assert _same(embedder, before) and _same(bag, bag_before)  # the inputs are untouched
    assert probe.steps == 2 * 4 and probe.frozen_grads == 0  # 64 patches / 16 per epoch; the teacher never learns
    assert not probe.module.teacher.training and not probe.module.teacher_head.training
    assert _same(probe.module.teacher, before)

    with (tmp_path / "log" / "version_0" / "metrics.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("val/agreement")]
    agreement = [float(r["val/agreement"]) for r in rows]
    assert len(agreement) == 2 and all(0.0 <= a <= 1.0 for a in agreement)
    best = int(np.argmax(agreement))  # ties: the earlier epoch
    (checkpoint,) = (tmp_path / "checkpoints").glob("best-*.ckpt")
    assert checkpoint.name == f"best-epoch={best}.ckpt"
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[f"student.{k}"]) for k, v in student.state_dict().items())


@pytest.mark.parametrize("task", [MultiLabel(), Ordinal()], ids=["multilabel", "ordinal"])
def test_distillation_couples_a_head_of_binary_teachers(cohort, tmp_path, task):
    """Multi-label heads teach each label, ordinal (CORN) heads each threshold, as a binary (sigmoid) teacher."""
    slides, _ = cohort
    torch.manual_seed(0)
    embedder = PatchEmbedder("resnet18", truncate_after="layer1")
    bag = BagClassifier(ABMIL(64, num_classes=3, hidden_dim=32, attention_dim=16), task=task)
    module = DistillationModule(embedder, bag, Distillation(), seed=0)
    assert module.outputs == "sigmoid" and isinstance(module.agreement, MultilabelAccuracy)
    strategy = Distillation(lr=1e-3, batch_size=16, patches_per_epoch=32, num_workers=0, max_epochs=1)
    student = strategy.fit(embedder, bag, slides, trainer_kwargs=_trainer_kwargs(tmp_path), root=tmp_path, seed=0)
    assert student.weights_hash() != embedder.weights_hash()
    with (tmp_path / "log" / "version_0" / "metrics.csv").open() as fh:
        (row,) = [r for r in csv.DictReader(fh) if r.get("val/agreement")]
    assert 0.0 <= float(row["val/agreement"]) <= 1.0 and 0.0 <= float(row["val/mae"]) <= 1.0


@pytest.mark.parametrize("pool", ["train", "train+val"])
def test_distillation_patch_pool(cohort, tmp_path, monkeypatch, pool):
    """The authors distil every patch of their training folder: with "train+val" the bag phase's validation slides
    join the pool; patches_per_epoch null is a full pass over the pool's training part each epoch."""
    slides, _ = cohort
    embedder, bag = _models()
    seen = {}
    real = distillation_strategy.PatchSampleDataModule

    def spy(pool_slides, **kwargs):
        data = real(pool_slides, **kwargs)
        seen.update(ids=[s.slide_id for s in pool_slides], data=data)
        return data

    monkeypatch.setattr(distillation_strategy, "PatchSampleDataModule", spy)
    strategy = Distillation(batch_size=16, patches_per_epoch=None, num_workers=0, max_epochs=1, patch_pool=pool)
    probe = _Probe("teacher,teacher_head")
    kwargs = _trainer_kwargs(tmp_path, probe)
    strategy.fit(embedder, bag, slides[:2], val=slides[2:], trainer_kwargs=kwargs, root=tmp_path, seed=0)
    used = slides if pool == "train+val" else slides[:2]
    assert seen["ids"] == [s.slide_id for s in used]
    n = sum(len(s.grid) for s in used)
    n_train = n - round(0.1 * n)
    assert len(seen["data"].pool) == n_train and probe.steps == -(-n_train // 16)  # every training patch once


def test_distillation_fits_with_dtfd_dual_weights(cohort, tmp_path):
    """The TMI DTFD-MIL setting end to end: dual confidence weights (beta 2) and the 0.7 / 0.3 tier-mixed teacher."""
    slides, _ = cohort
    embedder, bag = _models(DTFDMIL(64, hidden_dim=16, attention_dim=8))
    strategy = Distillation(
        lr=1e-3, batch_size=16, patches_per_epoch=32, num_workers=0, max_epochs=1, confidence_beta=2.0, tier1_weight=0.3
    )
    student = strategy.fit(embedder, bag, slides, trainer_kwargs=_trainer_kwargs(tmp_path), root=tmp_path, seed=0)
    assert student.weights_hash() != embedder.weights_hash()


def test_distillation_can_select_the_epoch_by_the_authors_mae(cohort, tmp_path):
    slides, _ = cohort
    embedder, bag = _models()
    strategy = Distillation(lr=1e-3, batch_size=16, patches_per_epoch=64, num_workers=0, max_epochs=2, select_by="mae")
    strategy.fit(embedder, bag, slides, trainer_kwargs=_trainer_kwargs(tmp_path), root=tmp_path, seed=0)
    with (tmp_path / "log" / "version_0" / "metrics.csv").open() as fh:
        mae = [float(r["val/mae"]) for r in csv.DictReader(fh) if r.get("val/mae")]
    assert len(mae) == 2 and all(0.0 <= m <= 1.0 for m in mae)
    (checkpoint,) = (tmp_path / "checkpoints").glob("best-*.ckpt")
    assert checkpoint.name == f"best-epoch={int(np.argmin(mae))}.ckpt"  # the lowest error wins


def test_head_clipping_touches_the_student_head_only():
    embedder, bag = _models()
    module = DistillationModule(embedder, bag, Distillation(head_clip_norm=1e-3), seed=0)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with pytest.warns(UserWarning, match="self.log"):
        module.training_step({"image": images}, 0).backward()
    before = [p.grad.clone() for p in module.student.parameters() if p.grad is not None]
    module.on_before_optimizer_step(None)
    head = torch.cat([p.grad.flatten() for p in module.student_head.parameters() if p.grad is not None])
    assert head.norm().item() == pytest.approx(1e-3, rel=1e-3)  # clipped down to the norm
    after = [p.grad for p in module.student.parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # the embedder's as they were


@pytest.mark.parametrize("student_batchnorm, adapts", [("as_embedder", False), ("train", True)])
def test_the_students_batchnorm_adapts_only_when_asked(student_batchnorm, adapts):
    embedder, bag = _models()
    module = DistillationModule(embedder, bag, Distillation(student_batchnorm=student_batchnorm), seed=0).train()
    statistics = {k: v.clone() for k, v in module.state_dict().items() if k.endswith("running_mean")}
    with pytest.warns(UserWarning, match="self.log"):
        module.training_step({"image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)}, 0)
    after = module.state_dict()
    changed = {k for k, v in statistics.items() if not torch.equal(v, after[k])}
    assert bool(changed) is adapts and all(k.startswith("student.") for k in changed)  # never the teacher's
    assert not module.teacher.training and module.student.training


def test_distillation_without_reduced_features_warns(cohort, tmp_path):
    slides, _ = cohort
    embedder, bag = _models(DSMIL(64, query_dim=16))
    strategy = Distillation(batch_size=16, patches_per_epoch=16, num_workers=0, max_epochs=1)
    with pytest.warns(UserWarning, match="feature term"):
        student = strategy.fit(
            embedder, bag, slides[:1], trainer_kwargs=_trainer_kwargs(tmp_path), root=tmp_path, seed=0
        )
    assert student.weights_hash() != embedder.weights_hash()


@pytest.mark.parametrize("train_head, n_slides", [(False, 4), (True, 2)])
def test_bag_gradient_fit(cohort, tmp_path, train_head, n_slides):
    slides, labels = cohort
    if n_slides == 2:  # one per class: too few to hold any out
        slides = [next(s for s in slides if labels[s.slide_id] == c) for c in (0, 1)]
    embedder, bag = _models()
    before, bag_before = copy.deepcopy(embedder), copy.deepcopy(bag)
    probe = _Probe("aggregator")
    strategy = BagGradient(
        lr=1e-3, chunk_size=8, max_instances=12, train_head=train_head, bags_per_step=2, read_threads=1, max_epochs=1
    )
    tuned = strategy.fit(
        embedder, bag, slides, labels=labels, root=tmp_path, seed=0, trainer_kwargs=_trainer_kwargs(tmp_path, probe)
    )

    assert isinstance(tuned, PatchEmbedder) and tuned is not embedder
    assert tuned.weights_hash() != before.weights_hash()
    assert _same(embedder, before) and _same(bag, bag_before)
    assert probe.steps == 1  # two training slides (4 with 2 held out, or 2 without validation), two bags per step
    head_after = probe.module.aggregator.state_dict()
    head_changed = any(not torch.equal(head_after[k], v) for k, v in probe.start.items())
    assert head_changed == train_head and (probe.frozen_grads > 0) == train_head
    assert len(list((tmp_path / "checkpoints").glob("best-*.ckpt"))) == 1
    with (tmp_path / "log" / "version_0" / "metrics.csv").open() as fh:
        logged = {k for row in csv.DictReader(fh) for k, v in row.items() if v}
    assert ("val/loss" in logged) == (n_slides == 4) and "train/loss" in logged


def test_bag_gradient_passes_shard_bags_on_with_every_bag_for_every_process(cohort, tmp_path, monkeypatch):
    """One setting: the module splits each bag's chunks, and its Trainer gives every process every bag."""
    from icmil_pl.coupling import bag_gradient

    seen = {}
    monkeypatch.setattr(bag_gradient, "fit_best", lambda module, *args, **kw: seen.update(module=module, kw=kw))
    slides, labels = cohort
    embedder, bag = _models()
    BagGradient(shard_bags=True, chunk_size=8, read_threads=1).fit(
        embedder, bag, slides, labels=labels, root=tmp_path, seed=0, trainer_kwargs={}
    )
    assert seen["module"].cfg.shard_bags and seen["kw"]["use_distributed_sampler"] is False


def test_bad_configuration(cohort, tmp_path):
    for kwargs, field in [
        ({"lr": 0.0}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"batch_size": 0}, "batch_size"),
        ({"patches_per_epoch": 0}, "patches_per_epoch"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"confidence_beta": -1.0}, "confidence_beta"),
        ({"head_weight": -0.5}, "head_weight"),
        ({"crop_scale": (0.0, 1.0)}, "crop_scale"),
        ({"crop_scale": (0.8, 0.5)}, "crop_scale"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"reduction": "sum"}, "reduction"),
        ({"feature_input": "both"}, "feature_input"),
        ({"select_by": "loss"}, "select_by"),
        ({"head_clip_norm": 0.0}, "head_clip_norm"),
        ({"student_batchnorm": "frozen"}, "student_batchnorm"),
        ({"tier1_weight": 1.5}, "tier1_weight"),
        ({"patch_pool": "all"}, "patch_pool"),
    ]:
        with pytest.raises(ValueError, match=f"^{field}: expected"):
            Distillation(**kwargs)
    for kwargs, field in [
        ({"lr": -1e-5}, "lr"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"bags_per_step": 0}, "bags_per_step"),
        ({"max_instances": 0}, "max_instances"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"select_by": "accuracy"}, "select_by"),
    ]:
        with pytest.raises(ValueError, match=f"^{field}: expected"):
            BagGradient(**kwargs)

    slides, labels = cohort
    embedder, bag = _models()
    with pytest.raises(ValueError, match="^labels: expected a target for every training slide"):
        BagGradient().fit(embedder, bag, slides, trainer_kwargs={}, root=tmp_path, seed=0)
    with pytest.raises(ValueError, match=r"^labels: expected class indices in \[0, 2\)"):
        BagGradient().fit(
            embedder, bag, slides, labels={**labels, slides[0].slide_id: 2}, trainer_kwargs={}, root=tmp_path, seed=0
        )
    with pytest.raises(ValueError, match="^trainer.accumulate_grad_batches"):
        BagGradient().fit(
            embedder, bag, slides, labels=labels, trainer_kwargs={"accumulate_grad_batches": 2}, root=tmp_path, seed=0
        )
    with pytest.raises(ValueError, match="^train: expected at least one training slide"):
        Distillation().fit(embedder, bag, [], trainer_kwargs={}, root=tmp_path, seed=0)
    embedder, bag = _models(DSMIL(64, query_dim=16))
    with pytest.raises(ValueError, match=r"^confidence_beta: needs an aggregator with attention scores"):
        Distillation(confidence_beta=6.0).fit(embedder, bag, slides[:1], trainer_kwargs={}, root=tmp_path, seed=0)
    embedder, bag = _models()
    with pytest.raises(ValueError, match=r"^tier1_weight: mixes DTFD-MIL's tier-1 classifier"):
        Distillation(tier1_weight=0.3).fit(embedder, bag, slides[:1], trainer_kwargs={}, root=tmp_path, seed=0)


@pytest.mark.parametrize("strategy", ["bag_gradient", "distillation"])
def test_couplings_train_lora_adapters_and_return_merged_weights(cohort, tmp_path, strategy):
    """A ViT with LoRA: only adapters (and, for Distillation, the student head) learn; E_{i+1} has E_i's keys."""
    slides, labels = cohort
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
    embedder = PatchEmbedder("vit_small_patch16_224", model_kwargs=kwargs, finetune=LoRA(rank=2, alpha=4.0))
    bag = BagClassifier(ABMIL(32, hidden_dim=16, attention_dim=8))
    before = copy.deepcopy(embedder)
    probe = _Probe("aggregator" if strategy == "bag_gradient" else "teacher")
    if strategy == "bag_gradient":
        coupling = BagGradient(lr=1e-2, chunk_size=8, max_instances=12, read_threads=1, max_epochs=1)
    else:
        coupling = Distillation(lr=1e-2, batch_size=16, patches_per_epoch=32, num_workers=0, max_epochs=1)
    tuned = coupling.fit(
        embedder, bag, slides, labels=labels, root=tmp_path, seed=0, trainer_kwargs=_trainer_kwargs(tmp_path, probe)
    )
    module = probe.module
    student = module.embedder if strategy == "bag_gradient" else module.student
    assert probe.steps >= 1
    optimizer = module.optimizers().optimizer
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer & {id(p) for p in student.parameters()} == {
        id(p) for n, p in student.named_parameters() if "lora_" in n
    }
    assert tuned.state_dict().keys() == before.state_dict().keys() and _same(embedder, before)
    changed = [k for k, v in tuned.backbone.state_dict().items() if not torch.equal(v, before.backbone.state_dict()[k])]
    assert changed and all(k.endswith("weight") and k.split(".")[-2] in ("qkv", "proj", "fc1", "fc2") for k in changed)


@pytest.mark.parametrize("strategy", [BagGradient, Distillation])
def test_strategy_settings_are_frozen_and_validated_where_they_are_read(strategy):
    """Each strategy is a frozen dataclass of its settings: written once, checked on construction in one style
    (`select_by: expected ...`), and typed so the CLI validates and documents them (no `Unvalidated<...>`)."""
    from dataclasses import FrozenInstanceError

    from jsonargparse import ArgumentParser

    settings = strategy()
    with pytest.raises(FrozenInstanceError):
        settings.lr = 1.0
    with pytest.raises(ValueError, match=r"^select_by: expected '.+' or '.+', got 'nope'$"):
        strategy(select_by="nope")
    with pytest.raises(ValueError, match=r"^max_epochs: expected"):
        strategy(max_epochs=0)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(strategy, "coupling")
    assert "Unvalidated" not in parser.format_help() and "(type: Literal[" in parser.format_help()
    with pytest.raises(Exception, match="select_by"):
        parser.parse_args(["--coupling.select_by=nope"])
