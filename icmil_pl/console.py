"""What a command prints: its own lines (each phase's start and end, progress, the final table, where the outputs are)
and the warnings that mean something for this run, each once.

Lightning's info lines (device availability per Trainer, product tips, callbacks overriding callbacks, checkpoint
restores, seeds) and warnings known to carry nothing for a user (`NOISE`) stay off the console; the run's log file
(`log_to`) keeps every one of them, and `--verbose` prints them as before. Model summary tables are the trainer's
`enable_model_summary`, off unless verbose (`trainer_defaults`).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

__all__ = ["LOG_FILE", "NOISE", "VERBOSE_FLAG", "configure", "log_to", "trainer_defaults"]

VERBOSE_FLAG = "--verbose"
LOG_FILE = "console.log"  # in a run's logs/ folder
NOISE = (
    r"isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's use of a torch API torch deprecated
    r"No (negative|positive) samples in targets",  # torchmetrics on a one-class batch (sanity checks, tiny splits)
    r"The '\w+_dataloader' does not have many workers",  # a hint for image loaders; ours read cached features
    r"module\(s\) in eval mode at the start of training",  # a frozen teacher or embedder, in eval on purpose
    r"overridden `transfer_batch_to_device` in `LightningModule`",  # slide models keep a bag's patches on the CPU
)
_LIGHTNING = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")
_WARNINGS = "py.warnings"
_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"


class _Console(logging.Filter):
    """Keeps known noise and repeated warnings off the console."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()
        self.noise = re.compile("|".join(NOISE))
        self.active = True

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.active:
            return True
        text = record.getMessage()
        if self.noise.search(text):
            return False
        if record.name == _WARNINGS:
            key = text.strip().splitlines()[0] if text.strip() else text
            if key in self.seen:
                return False
            self.seen.add(key)
        return True


_STATE: dict = {}


def configure(verbose: bool) -> None:
    """Routes Lightning's lines and Python's warnings through logging, the console seeing only what matters unless
    `verbose`. Idempotent: tests run many commands in one process."""
    _STATE["verbose"] = verbose
    if "filter" not in _STATE:
        _STATE["filter"] = _Console()
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(message)s"))
        console.addFilter(_STATE["filter"])
        warnings_logger = logging.getLogger(_WARNINGS)
        warnings_logger.addHandler(console)
        warnings_logger.propagate = False
        logging.captureWarnings(True)
    console_filter = _STATE["filter"]
    console_filter.active, console_filter.seen = not verbose, set()
    for name in _LIGHTNING:
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler:  # the console handler Lightning adds, not a file
                handler.setLevel(logging.NOTSET if verbose else logging.WARNING)
                if console_filter not in handler.filters:
                    handler.addFilter(console_filter)


def log_to(folder: str | os.PathLike) -> Path:
    """Every Lightning line and warning of this process also goes to `<folder>/console.log` (appended); returns it."""
    path = Path(folder) / LOG_FILE
    previous = _STATE.get("file")
    if previous is not None and previous.baseFilename == str(path.resolve()):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    for name in (*_LIGHTNING, _WARNINGS):
        logger = logging.getLogger(name)
        if previous is not None:
            logger.removeHandler(previous)
        logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
    if previous is not None:
        previous.close()
    _STATE["file"] = handler
    return path


def trainer_defaults() -> dict:
    """Trainer settings that depend on the console's mode: the model summary table only when verbose."""
    return {} if _STATE.get("verbose", True) else {"enable_model_summary": False}
