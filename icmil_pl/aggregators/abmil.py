"""Attention-based MIL (Ilse et al., ICML 2018) and CLAM single-branch (Lu et al., Nat. Biomed. Eng. 2021)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from data_modules.io import check_choice

from .base import Aggregator, MILOutput, check_dropout, check_positive
from .layers import AttentionScore, embedding


class ABMIL(Aggregator):
    """fc(in_dim -> hidden_dim, ReLU, dropout), (gated) attention pooling, linear classifier on sum_i a_i z_i.

    A one-instance bag has attention 1, so `instance_logits` is `classifier(fc(h))` in closed form.
    `dropout` acts after the fc and inside both attention branches (CLAM's placement).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int = 2,
        hidden_dim: int = 512,
        attention_dim: int = 128,
        dropout: float = 0.0,
        gated: bool = True,
    ) -> None:
        super().__init__(in_dim, num_classes)
        check_positive(hidden_dim=hidden_dim, attention_dim=attention_dim)
        check_dropout(dropout)
        self.embed = embedding(in_dim, hidden_dim, dropout)
        self.attention = AttentionScore(hidden_dim, attention_dim, gated, dropout)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def _forward(self, h: Tensor) -> MILOutput:
        z = self.embed(h)
        attention = torch.softmax(self.attention(z), dim=0)
        return MILOutput(self.classifier(attention @ z), attention)

    def _instance_logits(self, h: Tensor) -> Tensor:
        return self.classifier(self.embed(h))

    def _attention_scores(self, h: Tensor) -> Tensor:
        return self.attention(self.embed(h))


_CLAM_ATTENTION_DIM = {"small": 256, "big": 384}


class CLAMSB(ABMIL):
    """CLAM-SB: gated attention MIL with CLAM's sizes (fc to 512; attention 256 "small" or 384 "big") and dropout 0.25.

    CLAM's optional instance-clustering loss (per-class instance classifiers on top-k attended patches) is left out:
    per-instance predictions come from `instance_logits`, the bag classifier on each instance.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int = 2,
        size: Literal["small", "big"] = "small",
        dropout: float = 0.25,
    ) -> None:
        check_choice("size", size, tuple(_CLAM_ATTENTION_DIM))
        super().__init__(in_dim, num_classes, 512, _CLAM_ATTENTION_DIM[size], dropout, gated=True)
