"""Alias of `icmil_pl.encoders.finetune`: configs saved before the move name `icmil_pl.finetune.LoRA` and friends."""

from .encoders.finetune import Finetune, FullFinetune, LastBlocks, LoRA, NormsOnly

__all__ = ["Finetune", "FullFinetune", "LastBlocks", "LoRA", "NormsOnly"]
