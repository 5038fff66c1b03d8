"""DTFD-MIL: double-tier feature distillation over pseudo-bags (Zhang et al., CVPR 2022)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from data_modules.io import check_choice

from .base import Aggregator, MILOutput, check_dropout, check_positive
from .layers import AttentionScore

Distill = Literal["afs", "maxs", "maxmins"]


class DTFDMIL(Aggregator):
    """Split the bag into `num_pseudo_bags` pseudo-bags (a random split in training, contiguous chunks in instance order
    in eval; fewer when N is smaller). Tier 1: dimension reduction (fc without bias, ReLU), gated attention and a
    classifier per pseudo-bag; its logits are `aux_logits` (P, num_classes), each trained with the bag label. Each
    pseudo-bag is distilled into tier-2 features: its attention-pooled feature ("afs"), or its `num_distilled`
    instances ranked highest ("maxs") or highest and lowest ("maxmins") by their tier-1 CAM probability of the last
    class (the positive class in binary tasks, as the reference code). Tier 2 is gated attention MIL on those features.

    `detach_tier2=True` follows the paper's optimisation: the tier-2 loss updates tier 2 only (the reference code steps
    two optimisers), so bag-level gradients reach tier 1 and the features through `aux_logits` alone.
    `attention` is each instance's total weight in the tier-2 pooled feature (sums to 1).
    `instance_logits` is exact in closed form: a one-instance bag distils to its own reduced feature with weight 1 in
    both tiers, so it is the tier-2 classifier on the reduced features; `tier1_instance_logits` is the tier-1
    classifier on them. `attention_scores` gives both tiers' raw scores of each reduced feature, (N, 2).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int = 2,
        hidden_dim: int = 512,
        attention_dim: int = 128,
        num_pseudo_bags: int = 4,
        distill: Distill = "afs",
        num_distilled: int = 1,
        dropout: float = 0.0,
        detach_tier2: bool = True,
    ) -> None:
        super().__init__(in_dim, num_classes)
        check_positive(
            hidden_dim=hidden_dim,
            attention_dim=attention_dim,
            num_pseudo_bags=num_pseudo_bags,
            num_distilled=num_distilled,
        )
        check_choice("distill", distill, ("afs", "maxs", "maxmins"))
        check_dropout(dropout)
        self.num_pseudo_bags = num_pseudo_bags
        self.distill = distill
        self.num_distilled = num_distilled
        self.detach_tier2 = detach_tier2
        self.reduce = nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False), nn.ReLU())
        self.tier1_attention = AttentionScore(hidden_dim, attention_dim)
        self.tier1_classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_dim, num_classes))
        self.tier2_attention = AttentionScore(hidden_dim, attention_dim)
        self.tier2_classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_dim, num_classes))

    def _forward(self, h: Tensor) -> MILOutput:
        z = self.reduce(h)  # (N, L)
        scores = self.tier1_attention(z)  # (N,)
        n = h.shape[0]
        order = torch.randperm(n, device=h.device) if self.training else torch.arange(n, device=h.device)
        tier1_logits, features = [], []
        members, rows, weights = [], [], []  # instance -> tier-2 feature row, with the instance's weight in that row
        for index in order.tensor_split(min(self.num_pseudo_bags, n)):
            a = torch.softmax(scores[index], dim=0)
            weighted = a.unsqueeze(1) * z[index]  # (n_p, L)
            pooled = weighted.sum(0)
            tier1_logits.append(self.tier1_classifier(pooled))
            first_row = sum(f.shape[0] for f in features)
            if self.distill == "afs":
                features.append(pooled.unsqueeze(0))
                members.append(index)
                rows.append(torch.full_like(index, first_row))
                weights.append(a.detach())
            else:
                selected = index[self._select(weighted.detach())]
                features.append(z[selected])
                members.append(selected)
                rows.append(torch.arange(first_row, first_row + selected.shape[0], device=h.device))
                weights.append(torch.ones(selected.shape[0], dtype=a.dtype, device=h.device))
        features = torch.cat(features)  # (R, L)
        if self.detach_tier2:
            features = features.detach()
        b = torch.softmax(self.tier2_attention(features), dim=0)  # (R,)
        logits = self.tier2_classifier(b @ features)
        attention = torch.zeros(n, dtype=b.dtype, device=h.device).index_add_(
            0, torch.cat(members), b.detach()[torch.cat(rows)] * torch.cat(weights).to(b.dtype)
        )
        return MILOutput(logits, attention, torch.stack(tier1_logits))

    def _select(self, weighted: Tensor) -> Tensor:
        """Positions within a pseudo-bag of its top (and bottom, for "maxmins") instances by tier-1 CAM probability."""
        cam = weighted @ self.tier1_classifier[-1].weight.T  # (n_p, C), per-instance class activation, no bias
        probability = torch.softmax(cam, dim=1)[:, -1]
        k = min(self.num_distilled, probability.shape[0])
        top = probability.topk(k).indices
        if self.distill == "maxs":
            return top
        return torch.cat([top, probability.topk(k, largest=False).indices])

    def _instance_logits(self, h: Tensor) -> Tensor:
        return self.tier2_classifier(self.reduce(h))

    def tier1_instance_logits(self, h: Tensor) -> Tensor:
        """(N, num_classes): the tier-1 classifier on each instance's reduced feature (a one-instance pseudo-bag)."""
        return self.tier1_classifier(self.reduce(self._check_bag(h)))

    def _attention_scores(self, h: Tensor) -> Tensor:
        z = self.reduce(h)
        return torch.stack([self.tier1_attention(z), self.tier2_attention(z)], dim=1)
