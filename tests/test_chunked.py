"""Exactness of the chunked bag backward against plain back-propagation, plus its side effects and input checks."""

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from icmil_pl.chunked import bag_backward, embed_chunked

N = 13
CHUNK_SIZES = [1, 3, N - 1, N]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


class Block(nn.Module):
    def __init__(self, channels: int, drop_path: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(F.relu(self.bn(self.conv(x))))


def make_embedder(dropout: float = 0.0, drop_path: float = 0.0) -> nn.Module:
    """Convs, BatchNorm, a residual block with drop-path, dropout before the projection: (n,3,16,16) -> (n,12)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        Block(8, drop_path),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(16, 12),
    )


class GatedAttention(nn.Module):
    """ABMIL-like: gated attention pooling, then a linear head."""

    def __init__(self, dim: int = 12, hidden: int = 8, classes: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        # No bias on the attention score: softmax ignores it, so its gradient is zero up to rounding.
        self.v, self.u, self.w = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, 1, bias=False)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(self.w(self.drop(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h)))), dim=0)
        return self.head((a * h).sum(0))


class TinyTransMIL(nn.Module):
    """TransMIL-like: project, prepend a cls token, one transformer encoder layer, head on the cls token."""

    def __init__(self, dim: int = 12, width: int = 16, classes: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, width)
        self.cls = nn.Parameter(torch.randn(1, 1, width) * 0.1)
        self.layer = nn.TransformerEncoderLayer(width, 2, 32, dropout=dropout, batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls, self.proj(h)[None]], dim=1)
        return self.head(self.layer(x)[0, 0])


AGGREGATORS = {"abmil": GatedAttention, "transmil": TinyTransMIL}


def cross_entropy_loss(aggregator: nn.Module, target: int = 1) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda h: F.cross_entropy(aggregator(h)[None].float(), torch.tensor([target]))


class LazyBag:
    """Patches produced on demand from a stored tensor, counting reads."""

    def __init__(self, patches: torch.Tensor) -> None:
        self.patches, self.reads = patches, 0

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, index: slice) -> torch.Tensor:
        self.reads += 1
        return self.patches[index].clone()


def plain_chunked_forward(embedder: nn.Module, patches: torch.Tensor, chunk_size: int) -> torch.Tensor:
    return torch.cat([embedder(patches[a : a + chunk_size]) for a in range(0, len(patches), chunk_size)])


def take_grads(*modules: nn.Module) -> dict[str, torch.Tensor]:
    grads = {f"{i}.{name}": p.grad.clone() for i, m in enumerate(modules) for name, p in m.named_parameters()}
    for m in modules:
        m.zero_grad(set_to_none=True)
    return grads


def assert_grads_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: float) -> None:
    """Relative error of the whole gradient (all parameters as one vector): per-parameter ratios are noise where a
    gradient is small by cancellation (e.g. attention biases)."""
    assert got.keys() == ref.keys()
    assert all(r.norm() > 0 for r in ref.values())
    diff = torch.cat([(got[k] - r).flatten() for k, r in ref.items()])
    err = (diff.norm() / torch.cat([r.flatten() for r in ref.values()]).norm()).item()
    assert err < tol, f"relative error {err:.3g} >= {tol}"


def make_case(dtype: torch.dtype, aggregator: str, dropout: float = 0.0):
    torch.manual_seed(0)
    embedder = make_embedder(dropout=dropout, drop_path=dropout).to(dtype)
    agg = AGGREGATORS[aggregator](dropout=dropout).to(dtype)
    patches = torch.randn(N, 3, 16, 16, dtype=dtype)
    return embedder, agg, patches


def eval_batchnorm(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return module


@pytest.mark.parametrize("aggregator", AGGREGATORS)
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deterministic_embedder_matches_full_bag(dtype, chunk_size, aggregator):
    embedder, agg, patches = make_case(dtype, aggregator)
    embedder.eval()
    bag_loss = cross_entropy_loss(agg)

    ref_loss = bag_loss(embedder(patches))
    ref_loss.backward()
    ref = take_grads(embedder, agg)

    loss = bag_backward(embedder, bag_loss, patches, chunk_size)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=TOLERANCE[dtype], atol=0)
    assert_grads_close(take_grads(embedder, agg), ref, TOLERANCE[dtype])


@pytest.mark.parametrize("aggregator", AGGREGATORS)
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_and_drop_path_match_chunked_forward_on_same_stream(dtype, chunk_size, aggregator):
    embedder, agg, patches = make_case(dtype, aggregator, dropout=0.3)
    eval_batchnorm(embedder.train())
    bag_loss = cross_entropy_loss(agg)

    torch.manual_seed(7)
    ref_loss = bag_loss(plain_chunked_forward(embedder, patches, chunk_size))
    ref_loss.backward()
    ref = take_grads(embedder, agg)

    torch.manual_seed(7)
    loss = bag_backward(embedder, bag_loss, patches, chunk_size)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=TOLERANCE[dtype], atol=0)
    assert_grads_close(take_grads(embedder, agg), ref, TOLERANCE[dtype])

    # The masks matter: a different stream gives a different loss.
    torch.manual_seed(8)
    assert bag_backward(embedder, bag_loss, patches, chunk_size) != loss


@pytest.mark.parametrize("momentum", [0.1, None])
def test_train_mode_batchnorm_updated_once_per_chunk(momentum):
    torch.manual_seed(0)
    embedder = make_embedder().train()
    for bn in (embedder[1], embedder[3].bn):
        bn.momentum = momentum  # None: cumulative average, driven by num_batches_tracked
    agg = GatedAttention()
    patches = torch.randn(N, 3, 16, 16)
    reference = copy.deepcopy(embedder)

    ref_loss = cross_entropy_loss(agg)(plain_chunked_forward(reference, patches, 3))
    ref_loss.backward()
    ref = take_grads(reference, agg)

    loss = bag_backward(embedder, cross_entropy_loss(agg), patches, 3)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-6, atol=0)
    assert_grads_close(take_grads(embedder, agg), ref, 1e-5)
    ref_buffers = dict(reference.named_buffers())
    for name, buf in embedder.named_buffers():
        torch.testing.assert_close(buf, ref_buffers[name], rtol=0, atol=0, msg=name)
    assert embedder[1].num_batches_tracked.item() == 5  # ceil(13 / 3) chunks


def test_random_stream_continues_as_after_one_forward():
    embedder, agg, patches = make_case(torch.float32, "transmil", dropout=0.3)
    bag_loss = cross_entropy_loss(agg)

    torch.manual_seed(3)
    bag_loss(plain_chunked_forward(embedder, patches, 4))
    expected = torch.rand(5)

    torch.manual_seed(3)
    bag_backward(embedder, bag_loss, patches, 4)
    torch.testing.assert_close(torch.rand(5), expected, rtol=0, atol=0)


def test_lazy_bag_gives_same_grads_as_tensor():
    embedder, agg, patches = make_case(torch.float32, "abmil", dropout=0.3)
    bag_loss = cross_entropy_loss(agg)
    torch.manual_seed(1)
    loss = bag_backward(embedder, bag_loss, patches, 4)
    ref = take_grads(embedder, agg)

    lazy = LazyBag(patches)
    torch.manual_seed(1)
    assert bag_backward(embedder, bag_loss, lazy, 4) == loss
    got = take_grads(embedder, agg)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert lazy.reads == 2 * 4  # every chunk read once per pass


class NoisyBag(LazyBag):
    """Augments on read from torch's global generator, which bag_backward replays."""

    def __getitem__(self, index: slice) -> torch.Tensor:
        chunk = super().__getitem__(index)
        return chunk + 0.5 * torch.randn_like(chunk)


def test_lazy_bag_augmentation_is_replayed():
    embedder, agg, patches = make_case(torch.float64, "abmil", dropout=0.3)
    bag_loss, bag = cross_entropy_loss(agg), NoisyBag(patches)
    torch.manual_seed(4)
    ref_loss = bag_loss(torch.cat([embedder(bag[a : a + 4]) for a in range(0, N, 4)]))
    ref_loss.backward()
    ref = take_grads(embedder, agg)

    torch.manual_seed(4)
    loss = bag_backward(embedder, bag_loss, bag, 4)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-12, atol=0)
    assert_grads_close(take_grads(embedder, agg), ref, 1e-10)


def test_grads_accumulate():
    embedder, agg, patches = make_case(torch.float64, "abmil")
    embedder.eval()
    bag_backward(embedder, cross_entropy_loss(agg), patches, 5)
    once = take_grads(embedder, agg)
    bag_backward(embedder, cross_entropy_loss(agg), patches, 5)
    bag_backward(embedder, cross_entropy_loss(agg), patches, 5)
    assert_grads_close(take_grads(embedder, agg), {k: 2 * v for k, v in once.items()}, 1e-12)


def test_scale_loss_scales_every_gradient_exactly_once():
    embedder, agg, patches = make_case(torch.float32, "transmil", dropout=0.3)
    bag_loss = cross_entropy_loss(agg)
    torch.manual_seed(2)
    loss = bag_backward(embedder, bag_loss, patches, 4)
    ref = take_grads(embedder, agg)

    torch.manual_seed(2)
    assert bag_backward(embedder, bag_loss, patches, 4, scale_loss=lambda x: x * 1024) == loss
    got = take_grads(embedder, agg)
    for name, r in ref.items():
        assert torch.equal(got[name], r * 1024), name


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_bf16_autocast_respects_dtypes_and_is_close_to_fp32(aggregator):
    embedder, agg, patches = make_case(torch.float32, aggregator)
    embedder.eval()
    seen = []

    def bag_loss(h: torch.Tensor) -> torch.Tensor:
        seen.append(h.dtype)
        return cross_entropy_loss(agg)(h)

    bag_backward(embedder, bag_loss, patches, 4)
    ref = take_grads(embedder, agg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = bag_backward(embedder, bag_loss, patches, 4)
    got = take_grads(embedder, agg)

    assert seen == [torch.float32, torch.bfloat16]
    assert loss.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in got.values())
    assert_grads_close(got, ref, 0.05)


def test_embed_chunked_equals_full_forward_without_graph():
    embedder, _, patches = make_case(torch.float64, "abmil")
    embedder.eval()
    h = embed_chunked(embedder, LazyBag(patches), 5)
    assert not h.requires_grad
    torch.testing.assert_close(h, embedder(patches).detach(), rtol=1e-12, atol=0)


class ShapeShiftingBag(LazyBag):
    def __getitem__(self, index: slice) -> torch.Tensor:
        chunk = super().__getitem__(index)
        return chunk[..., :8] if index.start > 0 else chunk


@pytest.mark.parametrize(
    ("patches", "chunk_size", "message"),
    [
        (torch.zeros(0, 3, 16, 16), 4, "patches: expected a non-empty bag"),
        (torch.zeros(N, 3, 16, 16), 0, "chunk_size: expected an int >= 1, got 0"),
        (torch.zeros(N, 3, 16, 16), -1, "chunk_size: expected an int >= 1, got -1"),
        (torch.zeros(N, 3, 16, 16), 2.5, "chunk_size: expected an int >= 1, got 2.5"),
        (ShapeShiftingBag(torch.zeros(N, 3, 16, 16)), 4, r"patches\[4:8\]: expected shape \(4, 3, 16, 16\)"),
    ],
)
def test_bad_bag_or_chunk_size_raises(patches, chunk_size, message):
    embedder, agg = make_embedder().eval(), GatedAttention()
    with pytest.raises(ValueError, match=message):
        bag_backward(embedder, cross_entropy_loss(agg), patches, chunk_size)
    with pytest.raises(ValueError, match=message):
        embed_chunked(embedder, patches, chunk_size)


def test_bad_embedder_output_or_loss_raises():
    embedder, agg, patches = make_case(torch.float32, "abmil")
    message = r"embedder output for patches\[0:4\]: expected shape \(4, D\), got \(4, 8, 8, 8\)"
    with pytest.raises(ValueError, match=message):
        bag_backward(embedder[:3], cross_entropy_loss(agg), patches, 4)
    with pytest.raises(ValueError, match=r"bag_loss: expected a scalar tensor, got \(2,\)"):
        bag_backward(embedder, agg, patches, 4)
