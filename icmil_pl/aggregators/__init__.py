"""MIL aggregators: one bag of instance features (N, D) -> `MILOutput`. Constructible by name, timm style."""

from __future__ import annotations

from typing import Any

from .abmil import ABMIL, CLAMSB
from .base import Aggregator, MILOutput
from .dsmil import DSMIL
from .dtfd import DTFDMIL
from .pooling import MaxPool, MeanPool
from .transmil import TransMIL

AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.__name__: cls for cls in (MeanPool, MaxPool, ABMIL, CLAMSB, TransMIL, DTFDMIL, DSMIL)
}


def build_aggregator(name: str, **kwargs: Any) -> Aggregator:
    """The aggregator class `name` (case-insensitive), built with `kwargs` (at least `in_dim`)."""
    by_lower_name = {key.lower(): cls for key, cls in AGGREGATORS.items()}
    if name.lower() not in by_lower_name:
        raise ValueError(f"aggregator: unknown name {name!r}; expected one of {', '.join(AGGREGATORS)}")
    return by_lower_name[name.lower()](**kwargs)


__all__ = [
    "ABMIL",
    "AGGREGATORS",
    "CLAMSB",
    "DSMIL",
    "DTFDMIL",
    "Aggregator",
    "MILOutput",
    "MaxPool",
    "MeanPool",
    "TransMIL",
    "build_aggregator",
]
