"""ICMIL's teacher-student coupling (`Distillation`): the strategy and its settings, the phase's module, the loss."""

from .loss import DistillationLoss, Outputs, Reduction, confidence_weights, distillation_loss
from .module import DistillationModule
from .strategy import Distillation, FeatureInput

__all__ = [
    "Distillation",
    "DistillationLoss",
    "DistillationModule",
    "FeatureInput",
    "Outputs",
    "Reduction",
    "confidence_weights",
    "distillation_loss",
]
