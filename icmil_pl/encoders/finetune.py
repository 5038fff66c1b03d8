"""Which parameters of an embedder learn from slide labels: all, LoRA adapters, the last k blocks, or the norms.

One `finetune` object on `PatchEmbedder` serves every place that trains it (`Distillation`, `BagGradient`,
`EndToEndMIL`): `apply` marks what trains (and injects adapters), `merge` folds adapters back into plain weights so
the next ICMIL iteration extracts features with an ordinary backbone and `embedder.pt` loads as any checkpoint.
Frozen parameters carry `requires_grad=False`, so optimizers built from the trainable ones hold no state for them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from torch import nn

__all__ = ["Finetune", "FullFinetune", "LastBlocks", "LoRA", "NormsOnly", "trainable_parameter_count"]

# the attention and MLP projections of every transformer block (timm ViTs; GluMlp / SwiGLUPacked use fc1/fc2 too)
VIT_LORA_TARGETS = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


class Finetune(ABC):
    """A policy for the trainable part of a backbone. Configuration only: it holds no module."""

    @abstractmethod
    def apply(self, backbone: nn.Module) -> nn.Module:
        """Marks the trainable parameters of `backbone` (adapters injected in place) and returns it."""

    def merge(self, backbone: nn.Module) -> nn.Module:
        """`backbone` as a plain module with the same state-dict keys as before `apply` (adapters folded in)."""
        return backbone

    def describe(self) -> dict:
        """The policy as plain data: part of the embedder's fingerprint and of the feature caches' provenance."""
        return {"kind": type(self).__name__, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


class FullFinetune(Finetune):
    """Every parameter trains (the default; how ICMIL's authors fine-tune a ResNet)."""

    def apply(self, backbone: nn.Module) -> nn.Module:
        return backbone.requires_grad_(True)


class LoRA(Finetune):
    """Low-rank adapters (Hu et al., 2022) on the given modules, through the `peft` package; the base stays frozen.

    `target_modules` is a regular expression matched against whole module names, or a list of name suffixes (peft's
    rule); the default adapts the attention qkv / proj and MLP fc1 / fc2 of every transformer block. `dropout` is
    applied to the adapter input and draws from torch's global generator, so the chunked backward replays it.
    """

    def __init__(
        self, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, target_modules: str | Sequence[str] = ""
    ) -> None:
        if rank < 1:
            raise ValueError(f"LoRA rank: expected an int >= 1, got {rank}")
        if not 0 <= dropout < 1:
            raise ValueError(f"LoRA dropout: expected a float in [0, 1), got {dropout}")
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)

    def apply(self, backbone: nn.Module) -> nn.Module:
        from peft import LoraConfig, inject_adapter_in_model

        targets = self.target_modules or VIT_LORA_TARGETS
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets)
        try:
            backbone = inject_adapter_in_model(config, backbone.requires_grad_(False))
        except ValueError as error:  # peft: "Target modules ... not found in the base model"
            raise ValueError(f"LoRA target_modules={targets!r} match no module of the backbone: {error}") from error
        for name, param in backbone.named_parameters():
            param.requires_grad_("lora_" in name)
        return backbone

    def merge(self, backbone: nn.Module) -> nn.Module:
        from peft.tuners.lora import LoraLayer

        adapted = [(name, module) for name, module in backbone.named_modules() if isinstance(module, LoraLayer)]
        for name, module in adapted:
            module.merge(safe_merge=True)  # raises on non-finite merged weights instead of writing them
            parent_name, _, child = name.rpartition(".")
            setattr(backbone.get_submodule(parent_name), child, module.get_base_layer())
        return backbone


class LastBlocks(Finetune):
    """The last `k` transformer blocks and the final norm train; everything before them stays frozen."""

    def __init__(self, k: int = 2) -> None:
        if k < 1:
            raise ValueError(f"LastBlocks k: expected an int >= 1, got {k}")
        self.k = k

    def apply(self, backbone: nn.Module) -> nn.Module:
        blocks = getattr(backbone, "blocks", None)
        if not isinstance(blocks, nn.Sequential | nn.ModuleList):
            raise ValueError(f"LastBlocks: {type(backbone).__name__} has no `blocks` sequence (a ViT has)")
        if self.k > len(blocks):
            raise ValueError(f"LastBlocks k={self.k}: the backbone has {len(blocks)} blocks")
        backbone.requires_grad_(False)
        for block in list(blocks)[-self.k :]:
            block.requires_grad_(True)
        for name in ("norm", "fc_norm"):
            module = getattr(backbone, name, None)
            if isinstance(module, nn.Module):
                module.requires_grad_(True)
        return backbone


class NormsOnly(Finetune):
    """Only the affine weights of normalisation layers train (LayerNorm, BatchNorm, GroupNorm, RmsNorm)."""

    def apply(self, backbone: nn.Module) -> nn.Module:
        backbone.requires_grad_(False)
        for module in backbone.modules():
            if isinstance(module, _NORMS) or type(module).__name__ in ("RmsNorm", "SimpleNorm"):
                module.requires_grad_(True)
        return backbone


def trainable_parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
