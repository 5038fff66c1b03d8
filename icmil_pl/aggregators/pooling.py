"""Instance-level pooling baselines ("mi-Net" style): classify every instance, then pool the instance logits.

Pooling logits rather than embeddings keeps `instance_logits` the model's own instance classifier, so the ICMIL teacher
is exactly what the bag prediction is built from. For the mean the two standards coincide anyway: the classifier is
linear, so the mean of instance logits equals the classifier of the mean embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Aggregator, MILOutput, check_dropout, check_positive
from .layers import embedding


class _InstancePool(Aggregator):
    def __init__(self, in_dim: int, num_classes: int = 2, hidden_dim: int = 512, dropout: float = 0.0) -> None:
        super().__init__(in_dim, num_classes)
        check_positive(hidden_dim=hidden_dim)
        check_dropout(dropout)
        self.embed = embedding(in_dim, hidden_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def _instance_logits(self, h: Tensor) -> Tensor:
        return self.classifier(self.embed(h))


class MeanPool(_InstancePool):
    """Bag logits = mean of instance logits; attention is uniform."""

    def _forward(self, h: Tensor) -> MILOutput:
        logits = self._instance_logits(h)
        attention = torch.full((h.shape[0],), 1.0 / h.shape[0], dtype=logits.dtype, device=h.device)
        return MILOutput(logits.mean(0), attention)


class MaxPool(_InstancePool):
    """Bag logit of each class = its maximum over instances (as DSMIL's max-instance branch).

    Attention is one-hot on the instance that gives the predicted class its logit.
    """

    def _forward(self, h: Tensor) -> MILOutput:
        logits, argmax = self._instance_logits(h).max(0)
        attention = F.one_hot(argmax[logits.argmax()], h.shape[0]).to(logits.dtype)
        return MILOutput(logits, attention)
