"""EndToEndMIL: a chunked optimizer step equals the full-bag step, and DDP equals one process on the same bags."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from icmil_pl.aggregators import ABMIL
from icmil_pl.bag_classifier import BagClassifier
from icmil_pl.callbacks import WeightEMA
from icmil_pl.encoders import PatchEmbedder
from icmil_pl.end_to_end import EndToEndMIL


class _Bags(Dataset):
    """Fixed random uint8 bags of different sizes, one per item."""

    def __init__(self, sizes=(7, 11), image=16, seed=0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.bags = [torch.randint(0, 256, (n, 3, image, image), generator=g, dtype=torch.uint8) for n in sizes]

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, i: int) -> dict:
        return {"patches": self.bags[i], "label": torch.tensor(i % 2), "slide_id": f"bag{i}"}


class _Data(pl.LightningDataModule):
    num_classes = 2

    def __init__(self, sizes=(7, 11)) -> None:
        super().__init__()
        self.sizes = sizes

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Bags(self.sizes), batch_size=None, shuffle=False)


def _model(**kwargs) -> EndToEndMIL:
    torch.manual_seed(0)
    embedder = PatchEmbedder("resnet18", truncate_after="layer1", batchnorm="frozen")
    return EndToEndMIL(embedder, ABMIL(64, hidden_dim=32, attention_dim=16), lr=1e-3, **kwargs)


def _one_step(model: EndToEndMIL, data: pl.LightningDataModule, root, **trainer) -> EndToEndMIL:
    pl.seed_everything(0)
    kwargs = dict(
        max_steps=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        default_root_dir=str(root),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    pl.Trainer(**{**kwargs, **trainer}).fit(model, datamodule=data)
    return model


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("chunk_size", [1, 3, 10])
def test_chunked_step_equals_full_bag_step(chunk_size, tmp_path):
    start = _model(chunk_size=None, bags_per_step=2)
    full = _one_step(copy.deepcopy(start), _Data(), tmp_path)
    chunked = copy.deepcopy(start)
    chunked.cfg.chunk_size = chunk_size
    chunked = _one_step(chunked, _Data(), tmp_path)
    assert _max_diff(start, full) > 1e-4  # the step did move the parameters
    assert _max_diff(full, chunked) < 1e-5


class _RecordingClip(EndToEndMIL):
    """Records the gradient norm the optimizer steps with, after clipping."""

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        self.stepped_norm = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in self.parameters() if p.grad is not None])
        ).item()


def test_gradient_clipping_bounds_the_step(tmp_path):
    torch.manual_seed(0)
    model = _RecordingClip(
        PatchEmbedder("resnet18", truncate_after="layer1"),
        ABMIL(64, hidden_dim=32),
        chunk_size=4,
        bags_per_step=2,
        gradient_clip_val=1e-3,
    )
    _one_step(model, _Data(), tmp_path)
    assert model.stepped_norm == pytest.approx(1e-3, rel=1e-3)


def test_within_bag_sampling_takes_k_sorted_patches():
    model = _model(chunk_size=2, max_instances=4)
    bag = torch.arange(10).view(10, 1, 1, 1)
    torch.manual_seed(1)
    picked = model._sample(bag).flatten()
    assert len(picked) == 4 and torch.equal(picked, picked.sort().values) and len(set(picked.tolist())) == 4
    assert model._sample(bag[:3]).shape[0] == 3  # small bags are kept whole


def test_bad_configuration():
    with pytest.raises(ValueError, match="chunk_size"):
        _model(chunk_size=0)
    with pytest.raises(ValueError, match="bags_per_step"):
        _model(bags_per_step=0)
    with pytest.raises(ValueError, match="in_dim=32, but the embedder gives 64-d"):
        EndToEndMIL(PatchEmbedder("resnet18", truncate_after="layer1"), ABMIL(32))


def _ddp_update(tmp_path) -> dict:
    """Two processes (gloo), one bag each, one optimizer step; returns rank 0's parameters after the step."""
    model = _model(chunk_size=4, bags_per_step=1)
    _one_step(model, _Data(), tmp_path, strategy="ddp_spawn", devices=2)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_ddp_update_equals_single_process_update(tmp_path):
    single = _one_step(_model(chunk_size=4, bags_per_step=2), _Data(), tmp_path)
    ddp = _ddp_update(tmp_path)
    diffs = [(single.state_dict()[k].float() - v.float()).abs().max().item() for k, v in ddp.items()]
    assert max(diffs) < 1e-5
    assert _max_diff(single, _model()) > 1e-4


def test_sharded_bags_step_equals_single_process_step(tmp_path):
    """`shard_bags`: both processes step through both bags, each embedding half of every bag's chunks; the one
    optimizer step equals one process's on the same two bags."""
    single = _one_step(_model(chunk_size=3, bags_per_step=2), _Data(), tmp_path)
    sharded = _model(chunk_size=3, bags_per_step=2, shard_bags=True)
    ddp = dict(strategy="ddp_spawn", devices=2, use_distributed_sampler=False)
    _one_step(sharded, _Data(), tmp_path, **ddp)
    diffs = [(single.state_dict()[k].float() - v.float()).abs().max().item() for k, v in sharded.state_dict().items()]
    assert max(diffs) < 1e-5 and _max_diff(single, _model()) > 1e-4
    with pytest.raises(Exception, match="shard_bags: every process must be given every bag"):
        _one_step(_model(chunk_size=3, shard_bags=True), _Data(), tmp_path, strategy="ddp_spawn", devices=2)


def test_end_to_end_warm_starts_from_a_bag_classifiers_checkpoint(tmp_path):
    """`head`: the aggregator's weights and the bag classifier's feature standardisation, so that end to end starts
    where the two-stage model ended; anything else is refused in one line."""
    bag = BagClassifier(ABMIL(12, hidden_dim=8, attention_dim=4))
    bag.feature_mean.normal_()
    bag.feature_std.uniform_(0.5, 2.0)
    path = tmp_path / "bag.ckpt"
    torch.save({"state_dict": bag.state_dict()}, path)
    model = EndToEndMIL(nn.Linear(1, 12), ABMIL(12, hidden_dim=8, attention_dim=4), head=str(path))
    assert all(torch.equal(v, bag.aggregator.state_dict()[k]) for k, v in model.aggregator.state_dict().items())
    h = torch.randn(5, 12)
    torch.testing.assert_close(model.aggregator(model.normalize(h)).logits, bag.aggregator(bag.normalize(h)).logits)
    with pytest.raises(ValueError, match=r"^head: .*bag\.ckpt: not a bag classifier checkpoint of this aggregator"):
        EndToEndMIL(nn.Linear(1, 12), ABMIL(12, hidden_dim=16), head=str(path))


@pytest.mark.parametrize(("trains", "moves"), [("aggregator", "aggregator"), ("embedder", "embedder")])
def test_trains_moves_only_what_it_names(tmp_path, trains, moves):
    """`trains: aggregator` is a two-stage model on the frozen embedder's features; `trains: embedder` is ICMIL's
    exact coupling through the frozen aggregator (its step equals end to end's on the embedder)."""
    start = _model(chunk_size=3, trains=trains)
    stepped = _one_step(copy.deepcopy(start), _Data(), tmp_path)
    frozen = "embedder" if moves == "aggregator" else "aggregator"
    assert _max_diff(getattr(start, frozen), getattr(stepped, frozen)) == 0
    assert _max_diff(getattr(start, moves), getattr(stepped, moves)) > 1e-4
    if trains == "embedder":
        both = _one_step(copy.deepcopy(_model(chunk_size=3)), _Data(), tmp_path)
        assert _max_diff(both.embedder, stepped.embedder) < 1e-5  # Adam per parameter: the same embedder step


class _DataWithVal(_Data):
    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Bags(self.sizes, seed=1), batch_size=None, shuffle=False)


def test_weight_ema_follows_manual_steps_and_checkpoints_score_the_average(tmp_path):
    """`WeightEMA` updates after every manual optimizer step, and a checkpoint loaded after `fit` (as results.json's
    scores of the best one are) holds the averaged weights it validated, not the raw training weights that Lightning's
    own callback would restore."""
    ema = WeightEMA(decay=0.5)
    model = _model(chunk_size=4)
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        callbacks=[ema],
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=_DataWithVal())
    assert int(ema._average_model.n_averaged) == 3
    path = trainer.checkpoint_callback.best_model_path  # the model's own: results.json scores it
    saved = torch.load(path, weights_only=False)
    averaged, raw = saved["state_dict"], saved["current_model_state"]
    assert max((averaged[k].float() - raw[k].float()).abs().max().item() for k in averaged) > 1e-4
    trainer.validate(model, datamodule=_DataWithVal(), ckpt_path=path, verbose=False)
    assert all(torch.equal(v, averaged[k]) for k, v in model.state_dict().items())
