"""DSMIL: dual-stream MIL with a critical instance and non-local attention (Li, Li & Eliceiri, CVPR 2021)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Aggregator, MILOutput, check_dropout, check_positive


class DSMIL(Aggregator):
    """Stream 1: an instance classifier; its top instance per class is the critical instance and its max score is the
    max-instance logit (`aux_logits`, (1, num_classes), trained with the bag label as in the paper's 0.5/0.5 loss).
    Stream 2: attention of every instance to the critical one, softmax(<q_i, q_crit> / sqrt(query_dim)) over instances,
    pools the values per class, and a Conv1d over the (classes x features) bag embedding gives `logits`.

    `attention` is the stream-2 attention column of the predicted class. `passing_v` adds the value network
    (dropout -> fc -> ReLU; `dropout` only acts there), otherwise values are the raw features.
    `instance_logits` is exact in closed form: a one-instance bag has attention 1, so every class row of the bag
    embedding is v(h_i) and the Conv1d reduces to a linear layer with the weights summed over input channels.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int = 2,
        query_dim: int = 128,
        nonlinear: bool = True,
        passing_v: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_dim, num_classes)
        check_positive(query_dim=query_dim)
        check_dropout(dropout)
        if dropout and not passing_v:
            raise ValueError("dropout: acts on the value network only, so it needs passing_v=True")
        self.instance_classifier = nn.Linear(in_dim, num_classes)
        if nonlinear:
            self.query = nn.Sequential(
                nn.Linear(in_dim, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim), nn.Tanh()
            )
        else:
            self.query = nn.Linear(in_dim, query_dim)
        self.value = (
            nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, in_dim), nn.ReLU()) if passing_v else nn.Identity()
        )
        self.bag_classifier = nn.Conv1d(num_classes, num_classes, kernel_size=in_dim)
        self._scale = 1.0 / math.sqrt(query_dim)

    def _forward(self, h: Tensor) -> MILOutput:
        instance_logits = self.instance_classifier(h)  # (N, C)
        max_logits, critical = instance_logits.max(0)  # (C,), critical instance per class
        q = self.query(h)  # (N, Q)
        attention = torch.softmax((q @ q[critical].T) * self._scale, dim=0)  # (N, C)
        bag_embedding = attention.T @ self.value(h)  # (C, D)
        logits = self.bag_classifier(bag_embedding.unsqueeze(0)).flatten()  # (C,)
        return MILOutput(logits, attention[:, logits.argmax()], max_logits.unsqueeze(0))

    def _instance_logits(self, h: Tensor) -> Tensor:
        return F.linear(self.value(h), self.bag_classifier.weight.sum(1), self.bag_classifier.bias)
