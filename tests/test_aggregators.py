"""MIL aggregators: the output contract, the instance-logit definition, gradients, learning, input checks."""

from __future__ import annotations

from argparse import ArgumentError

import pytest
import torch
import torch.nn.functional as F

from icmil_pl.aggregators import ABMIL, CLAMSB, DSMIL, DTFDMIL, Aggregator, MaxPool, MeanPool, TransMIL
from icmil_pl.aggregators import transmil as transmil_module
from icmil_pl.aggregators.transmil import _NystromAttention

D = 32
AGGREGATORS = {cls.__name__: cls for cls in (MeanPool, MaxPool, ABMIL, CLAMSB, TransMIL, DTFDMIL, DSMIL)}

CASES = [
    ("MeanPool", {}),
    ("MaxPool", {}),
    ("ABMIL", {}),
    ("ABMIL", {"gated": False, "dropout": 0.1}),
    ("CLAMSB", {}),
    ("TransMIL", {}),
    ("TransMIL", {"attention": "nystrom"}),
    ("DTFDMIL", {}),
    ("DTFDMIL", {"distill": "maxs"}),
    ("DTFDMIL", {"distill": "maxmins", "num_distilled": 2}),
    ("DSMIL", {}),
    ("DSMIL", {"nonlinear": False, "passing_v": True, "dropout": 0.1}),
]


def case_id(case: tuple[str, dict]) -> str:
    name, kwargs = case
    return "-".join([name, *(f"{key}={value}" for key, value in kwargs.items())])


def build(case: tuple[str, dict], in_dim: int = D, num_classes: int = 2, seed: int = 0) -> Aggregator:
    torch.manual_seed(seed)
    name, kwargs = case
    return AGGREGATORS[name](in_dim=in_dim, num_classes=num_classes, **kwargs)


def check_attention(attention: torch.Tensor | None, n: int, atol: float = 1e-5) -> None:
    if attention is None:
        return
    assert attention.shape == (n,)
    assert (attention >= 0).all()
    assert attention.sum().item() == pytest.approx(1.0, abs=atol)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("n", [1, 7, 300])
def test_output_shapes(case, num_classes, n):
    model = build(case, num_classes=num_classes)
    h = torch.randn(n, D)
    for training in (True, False):
        model.train(training)
        out = model(h)
        assert out.logits.shape == (num_classes,)
        assert out.logits.dtype == torch.float32
        assert torch.isfinite(out.logits).all()
        check_attention(out.attention, n)
        if out.aux_logits is not None:
            assert out.aux_logits.ndim == 2 and out.aux_logits.shape[1] == num_classes
        assert model.instance_logits(h).shape == (n, num_classes)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("n", [7, 40])
def test_instance_logits_are_one_instance_bags(case, n):
    model = build(case, num_classes=3).eval()
    h = torch.randn(n, D)
    with torch.no_grad():
        expected = torch.stack([model(h[i : i + 1]).logits for i in range(n)])
        torch.testing.assert_close(model.instance_logits(h), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["full", "nystrom"])
def test_transmil_instance_logits_chunks_agree(monkeypatch, attention):
    model = build(("TransMIL", {"attention": attention})).eval()
    h = torch.randn(10, D)
    with torch.no_grad():
        whole = model.instance_logits(h)
        monkeypatch.setattr(transmil_module, "_INSTANCE_CHUNK", 3)
        torch.testing.assert_close(model.instance_logits(h), whole, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 9, 15])
def test_nystrom_short_sequences_equal_the_padded_reference(n):
    """The O(n^2) path for n < landmarks computes what the padded landmark algorithm computes."""
    torch.manual_seed(n)
    attention = _NystromAttention(dim=32, heads=4, dropout=0.0, landmarks=16, pinv_iterations=6)
    q, k, v = (2 * torch.randn(2, 4, n, 8) for _ in range(3))
    torch.testing.assert_close(attention._mix_short(q, k, v), attention._mix_landmarks(q, k, v), atol=2e-5, rtol=1e-4)


def test_nystrom_is_exact_attention_with_every_token_a_landmark():
    """With n = landmarks and a converged pseudo-inverse, A pinv(A) A V = A V: the landmark algebra is right."""
    torch.manual_seed(0)
    attention = _NystromAttention(dim=32, heads=4, dropout=0.0, landmarks=16, pinv_iterations=30)
    q = 3 * torch.randn(1, 4, 16, 8)
    v = torch.randn(1, 4, 16, 8)
    exact = F.scaled_dot_product_attention(q, q, v)
    torch.testing.assert_close(attention._mix_landmarks(q, q, v), exact, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("n", [12, 300])
def test_gradients_reach_every_parameter(case, n):
    model = build(case).train()
    h = torch.randn(n, D, requires_grad=True)
    out = model(h)
    loss = out.logits.sum() + (0 if out.aux_logits is None else out.aux_logits.sum())
    loss.backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert unused == []
    assert h.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["MeanPool", "MaxPool", "ABMIL", "CLAMSB", "DSMIL"])
def test_permutation_invariant_aggregators(name):
    model = build((name, {})).eval()
    h = torch.randn(20, D)
    perm = torch.randperm(20)
    out, permuted = model(h), model(h[perm])
    torch.testing.assert_close(permuted.logits, out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(permuted.attention, out.attention[perm], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "case",
    [("ABMIL", {}), ("CLAMSB", {}), *[("DTFDMIL", {"distill": distill}) for distill in ("afs", "maxs", "maxmins")]],
    ids=case_id,
)
def test_attention_is_each_instance_weight_in_the_bag_embedding(case):
    model = build(case).eval()
    h = torch.randn(23, D)
    out = model(h)
    if isinstance(model, DTFDMIL):
        recomputed = model.tier2_classifier(out.attention @ model.reduce(h))
    else:
        recomputed = model.classifier(out.attention @ model.embed(h))
    torch.testing.assert_close(recomputed, out.logits, atol=1e-5, rtol=1e-5)


def test_dtfd_pseudo_bags():
    model = DTFDMIL(D, num_pseudo_bags=4)
    assert model(torch.randn(3, D)).aux_logits.shape == (3, 2)  # never an empty pseudo-bag
    h = torch.randn(40, D)
    torch.manual_seed(1)
    first = model(h).aux_logits
    torch.manual_seed(2)
    assert not torch.allclose(model(h).aux_logits, first)  # training: a random split per call
    model.eval()
    out = model(h)
    assert out.aux_logits.shape == (4, 2)
    # eval: contiguous chunks in instance order, so shuffling inside a chunk changes nothing but across chunks does
    within = torch.cat([chunk[torch.randperm(10)] for chunk in torch.arange(40).split(10)])
    torch.testing.assert_close(model(h[within]).logits, out.logits, atol=1e-6, rtol=1e-6)
    across = torch.arange(40).view(4, 10).T.flatten()
    assert not torch.allclose(model(h[across]).aux_logits, out.aux_logits)


def test_dsmil_aux_is_the_max_instance_score():
    model = DSMIL(D, num_classes=3)
    h = torch.randn(15, D)
    out = model(h)
    torch.testing.assert_close(out.aux_logits, model.instance_classifier(h).max(0).values[None])


def test_maxpool_attention_is_one_hot_on_the_deciding_instance():
    model = MaxPool(D).eval()
    h = torch.randn(15, D)
    out = model(h)
    instance = out.attention.argmax()
    assert out.attention.sum() == 1 and out.attention.max() == 1
    predicted = out.logits.argmax()
    assert model.instance_logits(h)[instance, predicted] == out.logits[predicted]


def make_bags(n_bags: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Bags of 8-32 instances from N(0, I_16); a positive bag holds 1-3 instances from the key N(1.5, I_16)."""
    generator = torch.Generator().manual_seed(seed)
    bags = []
    labels = torch.arange(n_bags) % 2
    for label in labels:
        n = int(torch.randint(8, 33, (1,), generator=generator))
        h = torch.randn(n, 16, generator=generator)
        if label:
            keys = int(torch.randint(1, 4, (1,), generator=generator))
            h[torch.randperm(n, generator=generator)[:keys]] += 1.5
        bags.append(h)
    return bags, labels


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    positive, negative = scores[labels == 1], scores[labels == 0]
    wins = (positive[:, None] > negative[None]).float() + 0.5 * (positive[:, None] == negative[None]).float()
    return wins.mean().item()


SMALL_TRANSMIL = {"hidden_dim": 64, "num_heads": 4}  # the 512-wide default learns too, several times slower on a CPU


@pytest.mark.parametrize(
    "case",
    [
        ("MeanPool", {}),
        ("MaxPool", {}),
        ("ABMIL", {}),
        ("CLAMSB", {}),
        ("TransMIL", SMALL_TRANSMIL),
        ("TransMIL", {**SMALL_TRANSMIL, "attention": "nystrom"}),
        ("DTFDMIL", {}),
        ("DTFDMIL", {"distill": "maxmins"}),
        ("DSMIL", {}),
    ],
    ids=case_id,
)
def test_learns_synthetic_mil_task(case):
    train_bags, train_labels = make_bags(160, seed=0)
    test_bags, test_labels = make_bags(100, seed=1)
    model = build(case, in_dim=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for h, label in zip(train_bags, train_labels, strict=True):
        out = model(h)
        loss = F.cross_entropy(out.logits[None], label[None])
        if out.aux_logits is not None:
            loss = loss + F.cross_entropy(out.aux_logits, label.expand(out.aux_logits.shape[0]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        scores = torch.stack([model(h).logits.softmax(0)[1] for h in test_bags])
    assert auroc(scores, test_labels) > 0.9


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bf16_autocast(case):
    model = build(case)
    h = torch.randn(50, D)
    for training in (True, False):
        model.train(training)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(h)
            instance_logits = model.instance_logits(h)
        assert out.logits.shape == (2,) and torch.isfinite(out.logits).all()
        assert instance_logits.shape == (50, 2) and torch.isfinite(instance_logits).all()
        check_attention(out.attention, 50, atol=1e-2)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_bad_bags_are_rejected(name):
    model = AGGREGATORS[name](in_dim=D)
    bad = {
        "expected a bag of shape \\(N, 32\\)": [torch.randn(1, 5, D), torch.randn(D), torch.randn(5, D + 1)],
        "empty bag": [torch.randn(0, D)],
        "floating-point": [torch.ones(5, D, dtype=torch.long)],
    }
    for message, tensors in bad.items():
        for h in tensors:
            with pytest.raises(ValueError, match=message):
                model(h)
            with pytest.raises(ValueError, match=message):
                model.instance_logits(h)


@pytest.mark.parametrize(
    ("build_bad", "field"),
    [
        (lambda: ABMIL(0), "in_dim"),
        (lambda: ABMIL(D, num_classes=0), "num_classes"),
        (lambda: ABMIL(D, hidden_dim=0), "hidden_dim"),
        (lambda: ABMIL(D, dropout=1.0), "dropout"),
        (lambda: CLAMSB(D, size="huge"), "size"),
        (lambda: TransMIL(D, hidden_dim=100, num_heads=8), "hidden_dim"),
        (lambda: TransMIL(D, attention="linear"), "attention"),
        (lambda: DTFDMIL(D, distill="mean"), "distill"),
        (lambda: DTFDMIL(D, num_pseudo_bags=0), "num_pseudo_bags"),
        (lambda: DSMIL(D, dropout=0.2), "dropout"),
    ],
)
def test_bad_hyperparameters_name_the_field(build_bad, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        build_bad()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # instantiate_classes: renamed in 4.49, we support 4.40+
def test_config_builds_by_short_class_name():
    """LightningCLI resolves `class_path: ABMIL` and checks Literal options from the signature (jsonargparse)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--aggregator", type=Aggregator)
    config = parser.parse_args(
        ['--aggregator={"class_path": "DTFDMIL", "init_args": {"in_dim": 8, "distill": "maxs"}}']
    )
    model = parser.instantiate_classes(config).aggregator
    assert isinstance(model, DTFDMIL) and model.distill == "maxs" and model.in_dim == 8
    with pytest.raises(ArgumentError, match="distill"):
        parser.parse_args(['--aggregator={"class_path": "DTFDMIL", "init_args": {"in_dim": 8, "distill": "top"}}'])
