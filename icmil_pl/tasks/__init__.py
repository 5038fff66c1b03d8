"""What a slide model learns, one task a file: each owns its loss, its head size, its metrics, the metric that
selects checkpoints (`monitor`), what its outputs are called and the figures of a test run. A task is a component of
every slide model (`BagClassifier`, `EndToEndMIL`, ICMIL's couplings), chosen in YAML:

    task: {class_path: Survival, init_args: {bins: 4}}

Its data must say the same (`data.init_args.targets.task: survival`, `data_modules.cohort.targets`): the data reads the
CSV columns, the task learns from them. A task is an `nn.Module` so that what it fits on the training targets (the
survival time bins, the regression target scale) is saved in the checkpoint.

Each task registers itself under its `kind` in `TASKS` when its module here is imported; a new task is a new module.
"""

import importlib
import pkgutil

from .base import PER_LABEL, TASKS, Task, check_data, flatten_per_label
from .classification import Classification, slide_metrics
from .multilabel import MultiLabel, multilabel_metrics
from .regression import Regression, regression_metrics
from .survival import ConcordanceIndex, Survival, cox_loss, survival_metrics

__all__ = [
    "METRIC_NAMES",
    "PER_LABEL",
    "TASKS",
    "Classification",
    "ConcordanceIndex",
    "MultiLabel",
    "Regression",
    "Survival",
    "Task",
    "check_data",
    "cox_loss",
    "flatten_per_label",
    "multilabel_metrics",
    "regression_metrics",
    "slide_metrics",
    "survival_metrics",
]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
METRIC_NAMES = tuple(dict.fromkeys(name for task in TASKS.values() for name in task.metric_names))
