"""What trains when slide labels reach a ViT: LoRA, the last k blocks or the norms, with the chunked backward exact
through adapters, adapter dropout, drop-path, attention dropout and activation checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from icmil_pl.aggregators import ABMIL
from icmil_pl.chunked import bag_backward
from icmil_pl.encoders import LastBlocks, LoRA, NormsOnly, PatchEmbedder, trainable_parameter_count
from icmil_pl.end_to_end import EndToEndMIL

TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 32, "num_heads": 2}
DROPOUTS = {"attn_drop_rate": 0.1, "proj_drop_rate": 0.1}


def tiny_vit(finetune=None, dropouts: bool = False, grad_checkpointing: bool = False, seed: int = 0) -> PatchEmbedder:
    torch.manual_seed(seed)
    return PatchEmbedder(
        "vit_small_patch16_224",
        model_kwargs={**TINY_VIT, **(DROPOUTS if dropouts else {}), "reg_tokens": 2, "init_values": 1e-1},
        output="cls+mean",
        drop_path_rate=0.2 if dropouts else 0.0,
        finetune=finetune,
        grad_checkpointing=grad_checkpointing,
    )


def test_lora_trains_only_its_adapters_and_merges_back_to_the_original_keys():
    embedder = tiny_vit(LoRA(rank=4, alpha=8.0))
    keys = set(embedder.state_dict())
    embedder.start_finetune().start_finetune()  # idempotent: one set of adapters
    trainable = [name for name, p in embedder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert len(trainable) == 3 * 4 * 2  # blocks x (qkv, proj, fc1, fc2) x (A, B)
    assert trainable_parameter_count(embedder) == 3 * 4 * (32 + 96 + 32 + 32 + 32 + 128 + 128 + 32)
    for name, p in embedder.named_parameters():  # B starts at 0: move it, so the merge has something to fold
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    embedder.eval()
    with torch.no_grad():
        adapted = embedder(images)
        merged = embedder.merge_finetune()(images)
    assert set(embedder.state_dict()) == keys
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged, tiny_vit()(images))  # the adapters changed the function


def test_last_blocks_and_norms_only():
    embedder = tiny_vit(LastBlocks(k=1)).start_finetune()
    trainable = {name for name, p in embedder.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("backbone.blocks.2.", "backbone.norm.")) for name in trainable)
    embedder = tiny_vit(NormsOnly()).start_finetune()
    trainable = {name for name, p in embedder.named_parameters() if p.requires_grad}
    assert trainable == {f"backbone.{n}" for n, _ in embedder.backbone.named_parameters() if "norm" in n}
    with pytest.raises(ValueError, match="LastBlocks k=4: the backbone has 3 blocks"):
        tiny_vit(LastBlocks(k=4)).start_finetune()
    with pytest.raises(ValueError, match="LastBlocks: ResNet has no `blocks` sequence"):
        PatchEmbedder("resnet18", finetune=LastBlocks(1)).start_finetune()
    with pytest.raises(ValueError, match="LoRA target_modules='nothing' match no module"):
        tiny_vit(LoRA(target_modules="nothing")).start_finetune()


def test_end_to_end_optimizer_holds_state_only_for_what_trains():
    model = EndToEndMIL(tiny_vit(LoRA(rank=2)), ABMIL(64, hidden_dim=16, attention_dim=8), chunk_size=4)
    optimizer = model.configure_optimizers()
    optimizer = optimizer[0][0] if isinstance(optimizer, tuple) else optimizer
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_optimizer == trainable
    lora = {id(p) for n, p in model.embedder.named_parameters() if "lora_" in n}
    assert lora and lora <= in_optimizer and not {id(p) for p in model.embedder.parameters()} - lora & in_optimizer


def _grads(embedder: PatchEmbedder, head: ABMIL, patches: torch.Tensor, chunk_size: int, chunked: bool, seed: int):
    """Gradients of one bag's loss, by `bag_backward`, or by plain back-propagation through a forward taken in
    chunks of `chunk_size` with a graph (the forward whose random masks `bag_backward` replays; with every dropout
    off, any chunk size of it is the full bag)."""
    embedder, head = copy.deepcopy(embedder), copy.deepcopy(head)
    target = torch.tensor([1])

    def bag_loss(h: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).logits[None].float(), target)

    torch.manual_seed(seed)
    if chunked:
        bag_backward(embedder, bag_loss, patches, chunk_size)
    else:
        bag_loss(
            torch.cat([embedder(patches[a : a + chunk_size]) for a in range(0, len(patches), chunk_size)])
        ).backward()
    params = [*embedder.named_parameters(), *(("head." + n, p) for n, p in head.named_parameters())]
    return {name: p.grad.float() for name, p in params if p.requires_grad and p.grad is not None}


def _lora_vit(dropouts: bool, grad_checkpointing: bool = False) -> PatchEmbedder:
    embedder = tiny_vit(LoRA(rank=4, dropout=0.2 if dropouts else 0.0), dropouts, grad_checkpointing)
    embedder.start_finetune().train()
    for name, p in embedder.named_parameters():  # B starts at 0, which would hide A's gradient
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    return embedder


HEAD = {"in_dim": 64, "hidden_dim": 16, "attention_dim": 8}


@pytest.mark.parametrize("chunk_size, grad_checkpointing", [(1, False), (4, False), (9, False), (4, True)])
def test_chunked_backward_through_vit_with_lora_is_exact(chunk_size, grad_checkpointing):
    """Adapter dropout, drop-path, attention and projection dropout draw the same masks in both passes; without
    them the chunked gradient is the full bag's."""
    head = ABMIL(**HEAD)
    patches = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    embedder = _lora_vit(dropouts=True, grad_checkpointing=grad_checkpointing)
    reference = _grads(embedder, head, patches, chunk_size, chunked=False, seed=3)
    chunked = _grads(embedder, head, patches, chunk_size, chunked=True, seed=3)
    assert reference.keys() == chunked.keys() and any("lora_A" in k for k in reference)
    for name in reference:
        torch.testing.assert_close(chunked[name], reference[name], rtol=1e-5, atol=1e-5, msg=name)
    other_masks = _grads(embedder, head, patches, chunk_size, chunked=True, seed=4)
    assert any(not torch.allclose(other_masks[k], reference[k], atol=1e-4) for k in reference)  # dropouts are live

    deterministic = _lora_vit(dropouts=False, grad_checkpointing=grad_checkpointing)
    full = _grads(deterministic, head, patches, len(patches), chunked=False, seed=3)
    chunked = _grads(deterministic, head, patches, chunk_size, chunked=True, seed=3)
    for name in full:
        torch.testing.assert_close(chunked[name], full[name], rtol=1e-5, atol=1e-5, msg=name)


BF16_TOLERANCE = 2e-2  # relative to the largest gradient of each tensor: bf16 keeps 8 bits of mantissa


def test_chunked_backward_under_bf16_autocast_matches_within_bf16_precision():
    head = ABMIL(**HEAD)
    patches = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    embedder = _lora_vit(dropouts=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = _grads(embedder, head, patches, 3, chunked=False, seed=3)
        chunked = _grads(embedder, head, patches, 3, chunked=True, seed=3)
    fp32 = _grads(embedder, head, patches, 3, chunked=False, seed=3)
    for name in reference:
        scale = fp32[name].abs().max().clamp_min(1e-8)
        assert (chunked[name] - reference[name]).abs().max() / scale < BF16_TOLERANCE, name
        assert (reference[name] - fp32[name]).abs().max() / scale < 10 * BF16_TOLERANCE, name  # bf16, not noise
