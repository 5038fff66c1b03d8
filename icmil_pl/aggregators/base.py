"""The aggregator contract: one bag of instance features in, bag logits and instance attention out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

from torch import Tensor, nn

from data_modules.io import check


class MILOutput(NamedTuple):
    """What an aggregator returns for one bag.

    `attention` is each instance's share in the bag prediction as the model defines it (pooling weights, or the
    TransMIL cls-token attention); it sums to 1 wherever it is given and feeds the heatmaps. `aux_logits` are extra
    predictions of the same bag label that the model trains on beside `logits` (DTFD-MIL tier-1 pseudo-bags, the
    DSMIL max-instance score): the bag loss adds a cross entropy of every row against the bag label.
    """

    logits: Tensor  # (num_classes,)
    attention: Tensor | None = None  # (N,)
    aux_logits: Tensor | None = None  # (P, num_classes)


class Aggregator(nn.Module, ABC):
    """A MIL pooling head over one unbatched bag `h` of shape (N, in_dim): a MIL batch is one bag.

    Subclasses implement `_forward` and `_instance_logits` on an already validated bag.
    """

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        check_positive(in_dim=in_dim, num_classes=num_classes)
        self.in_dim = in_dim
        self.num_classes = num_classes

    def forward(self, h: Tensor) -> MILOutput:
        return self._forward(self._check_bag(h))

    def instance_logits(self, h: Tensor) -> Tensor:
        """(N, num_classes): the bag head applied to each instance, i.e. row i equals `self(h[i:i+1]).logits`.

        This is ICMIL's instance-level teacher. Call it under `torch.no_grad()` for bounded memory on large bags.
        """
        return self._instance_logits(self._check_bag(h))

    def attention_scores(self, h: Tensor) -> Tensor | None:
        """(N,): each instance's raw attention score, before the bag's softmax (ABMIL with `isNorm=False` in the ICMIL
        authors' code); (N, T) for a head with T attention tiers (DTFD-MIL: tier 1 and tier 2 on each instance's
        reduced feature); None for heads without one. ICMIL's TMI confidence weights are computed from these: the
        softmax over a bag is not a rescaling, and min-max of softmaxed scores weighs nearly every patch 1."""
        return self._attention_scores(self._check_bag(h))

    def _attention_scores(self, h: Tensor) -> Tensor | None:
        return None

    @abstractmethod
    def _forward(self, h: Tensor) -> MILOutput: ...

    @abstractmethod
    def _instance_logits(self, h: Tensor) -> Tensor: ...

    def _check_bag(self, h: Tensor) -> Tensor:
        if h.ndim != 2 or h.shape[1] != self.in_dim:
            raise ValueError(f"h: expected a bag of shape (N, {self.in_dim}), got {tuple(h.shape)}")
        if h.shape[0] == 0:
            raise ValueError(f"h: empty bag of shape {tuple(h.shape)}; a bag needs at least one instance")
        if not h.is_floating_point():
            raise ValueError(f"h: expected a floating-point tensor, got {h.dtype}")
        return h


def check_positive(**values: int) -> None:
    for name, value in values.items():
        check(name, value >= 1, "an integer >= 1", value)


def check_dropout(value: float, name: str = "dropout") -> None:
    check(name, 0.0 <= value < 1.0, "a probability in [0, 1)", value)
