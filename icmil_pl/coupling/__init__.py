"""ICMIL's coupling phase: fine-tune the patch embedder E_i into E_{i+1} from the frozen bag classifier.

Two swappable strategies, each run by `loop.py` as `strategy.fit(embedder, bag, train_slides, ...)` on a fresh
Trainer of its own:
- `Distillation` (the paper, `distillation/`): the bag head applied per instance is a teacher of patch
  pseudo-labels; a student copy of embedder + head learns them on augmented patches.
- `BagGradient` (`bag_gradient.py`): the exact slide-level gradient through the bag head, over whole slides.

`base.py` holds what both share: `CouplingStrategy`, the frozen `StandardizedHead`, fitting the best epoch. Every
module and folder here is imported with the package, so a new strategy's file is all a config needs.
"""

import importlib
import pkgutil

from .bag_gradient import BagGradient
from .base import CouplingStrategy, StandardizedHead, reduced_features
from .distillation import Distillation, DistillationLoss, confidence_weights, distillation_loss

__all__ = [
    "BagGradient",
    "CouplingStrategy",
    "Distillation",
    "DistillationLoss",
    "StandardizedHead",
    "confidence_weights",
    "distillation_loss",
    "reduced_features",
]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
