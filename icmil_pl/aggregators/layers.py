"""Building blocks shared by several aggregators."""

from __future__ import annotations

from torch import Tensor, nn


def embedding(in_dim: int, out_dim: int, dropout: float = 0.0, bias: bool = True) -> nn.Sequential:
    """The per-instance fc -> ReLU -> dropout that every attention MIL model starts with."""
    return nn.Sequential(nn.Linear(in_dim, out_dim, bias=bias), nn.ReLU(), nn.Dropout(dropout))


class AttentionScore(nn.Module):
    """Unnormalised attention scores of Ilse et al. (2018): w^T(tanh(V z) * sigmoid(U z)), or w^T tanh(V z) ungated.

    Dropout inside both branches follows CLAM; at 0 it is the original. The last layer has no bias: the softmax over
    instances ignores it, so it would be a parameter without gradient.
    """

    def __init__(self, in_dim: int, hidden_dim: int, gated: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.tanh = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.Tanh(), nn.Dropout(dropout))
        self.gate = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.Sigmoid(), nn.Dropout(dropout)) if gated else None
        self.score = nn.Linear(hidden_dim, 1, bias=False)

    def forward(self, z: Tensor) -> Tensor:
        """(N, in_dim) -> (N,)"""
        a = self.tanh(z)
        if self.gate is not None:
            a = a * self.gate(z)
        return self.score(a).squeeze(-1)
