"""MIL aggregators: one bag of instance features (N, D) -> `MILOutput`, one family a file. Configs name them by class
(`class_path: ABMIL`)."""

from .abmil import ABMIL, CLAMSB
from .base import Aggregator, MILOutput
from .dsmil import DSMIL
from .dtfd import DTFDMIL
from .pooling import MaxPool, MeanPool
from .transmil import TransMIL

__all__ = ["ABMIL", "CLAMSB", "DSMIL", "DTFDMIL", "Aggregator", "MILOutput", "MaxPool", "MeanPool", "TransMIL"]
