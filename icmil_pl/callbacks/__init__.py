"""Lightning callbacks, one job each: feature extraction into the cache, predictions.csv, figures, phase-labelled
progress bars and lines, epoch seeds, checkpoints written whole, a stop when weights diverge, an EMA of the weights; and
`output_dir`, where a Trainer's outputs go."""

from .checkpoints import AtomicCheckpoint, best_checkpoint, latest_checkpoint
from .divergence import DivergenceGuard
from .epoch_seed import EpochSeed
from .feature_writer import FeatureWriter, extract_features
from .figure_writer import FigureWriter, resolve_figures
from .outputs import output_dir
from .phase_progress import PhaseProgressBar, ProgressLog
from .prediction_writer import PredictionWriter
from .weight_ema import WeightEMA

__all__ = [
    "AtomicCheckpoint",
    "DivergenceGuard",
    "EpochSeed",
    "FeatureWriter",
    "FigureWriter",
    "PhaseProgressBar",
    "PredictionWriter",
    "ProgressLog",
    "WeightEMA",
    "best_checkpoint",
    "extract_features",
    "latest_checkpoint",
    "output_dir",
    "resolve_figures",
]
