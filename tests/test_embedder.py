"""PatchEmbedder: truncation, local weights, frozen BatchNorm and the fingerprint that keys feature caches."""

from __future__ import annotations

import huggingface_hub
import pytest
import torch

from icmil_pl.encoders import FrozenBatchNorm2d, PatchEmbedder


def test_truncation_gives_the_stage_width():
    embedder = PatchEmbedder("resnet18", truncate_after="layer2")
    out = embedder(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert embedder.feature_dim == 128 and out.shape == (2, 128)
    with pytest.raises(ValueError, match=r"truncate_after='layer9': resnet18 has stages"):
        PatchEmbedder("resnet18", truncate_after="layer9")
    with pytest.raises(ValueError, match=r"neither a preset \(uni, .*\), an `hf-hub:org/name` id nor a timm model"):
        PatchEmbedder("no_such_net")


def test_local_weights_load_and_change_the_fingerprint(tmp_path):
    torch.manual_seed(0)
    source = PatchEmbedder("resnet18", truncate_after="layer1")
    torch.manual_seed(1)
    other = PatchEmbedder("resnet18", truncate_after="layer1")
    assert source.fingerprint() != other.fingerprint()
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in source.backbone.state_dict().items()}}, path)
    loaded = PatchEmbedder("resnet18", truncate_after="layer1", weights=str(path))
    assert loaded.fingerprint() == source.fingerprint()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(loaded(images), source(images))
    with pytest.raises(ValueError, match="no such file"):
        PatchEmbedder("resnet18", truncate_after="layer1", weights=str(tmp_path / "missing.pth"))


def test_pretrained_weights_offline_say_how_to_go_on(tmp_path, monkeypatch):
    """The experiments ship `pretrained: true`; on a machine without internet the error names the two ways out."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever is here
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    pattern = r"resnet18: weights are neither in the hub cache nor downloadable .* `weights: <file>` .* `pretrained: f"
    for truncate_after in (None, "layer2"):
        with pytest.raises(ValueError, match=pattern):
            PatchEmbedder("resnet18", truncate_after=truncate_after, pretrained=True)


def test_frozen_batchnorm_survives_train_and_mode_restores():
    embedder = PatchEmbedder("resnet18", truncate_after="layer1")
    bn = embedder.backbone.bn1
    assert isinstance(bn, FrozenBatchNorm2d)
    embedder.train()
    bn.training = True  # what Lightning's mode restore does
    before = bn.running_mean.clone()
    embedder(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    assert not bn.training and torch.equal(bn.running_mean, before) and bn.weight.requires_grad
    assert not isinstance(
        PatchEmbedder("resnet18", truncate_after="layer1", batchnorm="train").backbone.bn1, FrozenBatchNorm2d
    )


def test_a_truncated_random_init_draws_the_random_stream_as_before():
    """The stage probe is a CPU model whose initialisation draws from the global generator: built on the meta device
    it would not, and every random-init E_0 (the demo's, and the figures trained from it) would change."""
    import timm

    torch.manual_seed(0)
    embedder = PatchEmbedder("resnet18", truncate_after="layer2")
    torch.manual_seed(0)
    timm.create_model("resnet18", pretrained=False, num_classes=0)
    reference = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(2,))
    ours = embedder.backbone.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in reference.state_dict().items())


def test_batchnorm_reestimation_moves_the_statistics_and_nothing_else():
    """One pass in training mode, averaged over the batches: the first BatchNorm's running mean is the mean of its
    input over every patch; weights, and the frozen policy, stay."""
    embedder = PatchEmbedder("resnet18", truncate_after="layer1")
    before = {k: v.clone() for k, v in embedder.state_dict().items()}
    patches = (torch.rand(2, 16, 3, 32, 32) * 255).to(torch.uint8)
    assert embedder.reestimate_batchnorm(iter(patches)) == 32
    after = embedder.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in moved)
    with torch.no_grad():
        conv = embedder.backbone.conv1(embedder.preprocess(patches.flatten(0, 1)))
    torch.testing.assert_close(embedder.backbone.bn1.running_mean, conv.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert isinstance(embedder.backbone.bn1, FrozenBatchNorm2d)
