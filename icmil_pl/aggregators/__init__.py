"""MIL aggregators: one bag of instance features (N, D) -> `MILOutput`, one family a file. Configs name them by class
(`class_path: ABMIL`); every module here is imported with the package, so a new family's file is all a config needs
(export it below to import it from the package by name)."""

import importlib
import pkgutil

from .abmil import ABMIL, CLAMSB
from .base import Aggregator, MILOutput
from .dsmil import DSMIL
from .dtfd import DTFDMIL
from .pooling import MaxPool, MeanPool
from .transmil import TransMIL

__all__ = ["ABMIL", "CLAMSB", "DSMIL", "DTFDMIL", "Aggregator", "MILOutput", "MaxPool", "MeanPool", "TransMIL"]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
