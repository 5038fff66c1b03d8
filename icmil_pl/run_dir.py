"""An ICMIL run directory: every path in it, which phases are done, the phase seeds, and which settings a rerun may
change. Nothing else builds a run path or reads `state.json`. Paths inside the run are recorded relative to it, so a
run directory copied or moved elsewhere is a whole run of its own.

    <run>/config.yaml             the resolved config the run was started with
    <run>/state.json              completed phases, their outputs, metrics and times
    <run>/splits.json             one split for every iteration
    <run>/features/<key>/         the feature cache of each iteration's embedder (keyed by its weights)
    <run>/iter<i>/bag/            bag-classifier checkpoints (best by validation AUROC, last)
    <run>/iter<i>/couple/         coupling checkpoints
    <run>/iter<i>/embedder.pt     E_i (i >= 1; E_0 where its BatchNorm statistics were re-estimated)
    <run>/results.json, figures/  per-iteration metrics and times; AUROC by iteration
    <run>/report.html             the run at a glance (icmil_pl.views.report), rewritten after fit, test and predict
    <run>/final/<stage>/          validate / test / predict outputs of the finished run
    <run>/final/predict-<name>/   predict outputs on another cohort (`cohort.txt`: its labels file)
    <run>/fast_dev_run/           a smoke test's own run directory, so it never marks phases of the real run done
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import os
import socket
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from filelock import FileLock, Timeout
from pytorch_lightning.utilities import rank_zero_only

from data_modules.cohort import SlideCohort
from data_modules.cohort.splits import SPLITS_FILE
from data_modules.io import atomic_path, atomic_write, safe_name
from data_modules.slides import file_signature

from .results import RESULTS_FILE

__all__ = [
    "COHORT_FILE",
    "PATH_SETTINGS",
    "PHASES",
    "RESUMABLE_SETTINGS",
    "Phase",
    "RunDir",
    "RunState",
    "absolute_path",
    "changed_settings",
    "checkpoint_dir",
    "last_checkpoint",
    "phase_key",
    "phase_seed",
    "resume_checkpoint",
    "slide_record",
    "written_by_rank_zero",
]

COHORT_FILE = "cohort.txt"  # in a predict folder of another cohort: the labels file it belongs to

Phase = Literal["embed", "bag", "couple", "calibrate"]
PHASES: tuple[Phase, ...] = ("embed", "bag", "couple", "calibrate")  # appended only: phase_seed is by index

# What may change when a run is continued: where things are and how fast they go, and the number of iterations.
RESUMABLE_SETTINGS = frozenset(
    {
        "model.init_args.run_dir",
        "model.init_args.iterations",
        "model.init_args.coupling.init_args.num_workers",
        "model.init_args.coupling.init_args.read_threads",
        "data.init_args.slides",
        "data.init_args.annotations",
        "data.init_args.grid_cache",
        "data.init_args.patch_store",
        "data.init_args.batch_size",
        "data.init_args.num_workers",
    }
)


# Settings that are paths: config.yaml holds them absolute, so that it works from any working directory.
PATH_SETTINGS = frozenset(
    {
        "model.init_args.run_dir",
        "model.init_args.embedder.init_args.weights",
        "data.init_args.labels",
        "data.init_args.slides",
        "data.init_args.annotations",
        "data.init_args.grid_cache",
        "data.init_args.patch_store",
        "data.init_args.features",
        "data.init_args.root",
    }
)


def phase_key(iteration: int, phase: Phase) -> str:
    """`iter<i>/<phase>`: the phase's name in state.json, in logged metric names and on its progress bar."""
    return f"iter{iteration}/{phase}"


def phase_seed(seed: int, iteration: int, phase: Phase) -> int:
    """The seed of one phase: a function of where the run is only, so a resumed run draws what an uninterrupted one
    would."""
    return seed + 1000 * iteration + PHASES.index(phase)


def checkpoint_dir(root: str | os.PathLike) -> Path:
    """Where a training phase rooted at `root` keeps its checkpoints (`best-epoch=<k>.ckpt`, `last.ckpt`)."""
    return Path(root) / "checkpoints"


def last_checkpoint(root: str | os.PathLike) -> Path:
    """The latest epoch of a training phase (full training state, saved every epoch)."""
    return checkpoint_dir(root) / "last.ckpt"


def resume_checkpoint(root: str | os.PathLike) -> str | None:
    """`last.ckpt` of a phase killed before it finished, else None: the bag phase and the couplings continue from
    their last epoch by this one rule. A damaged one (cut short by a full disk) is named, set aside with its folder
    (`checkpoints.damaged`), and the phase starts over."""
    last = last_checkpoint(root)
    if not last.is_file():
        return None
    try:
        with zipfile.ZipFile(last) as archive:  # torch's format: a truncated file has no central directory
            whole = bool(archive.namelist())
    except (zipfile.BadZipFile, OSError):
        whole = False
    if whole:
        return str(last)
    folder = last.parent
    aside = next(
        p for k in itertools.count() if not (p := folder.with_name(f"{folder.name}.damaged{k or ''}")).exists()
    )

    def set_aside() -> None:
        os.replace(folder, aside)
        print(f"{last}: damaged (not a whole checkpoint); moved to {aside}, and the phase starts over")

    written_by_rank_zero(set_aside)
    return None


def written_by_rank_zero(write: Callable[[], Any]) -> None:
    """Run-directory files are written by one process and the others wait for them: under DDP every process runs
    the loop (Lightning starts them at the first Trainer), and each phase reads what the one before wrote."""
    if rank_zero_only.rank == 0:
        write()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def absolute_path(value: str | list[str] | None) -> str | list[str] | None:
    """A path setting (`PATH_SETTINGS`) made absolute against the working directory (`~` expanded)."""
    if isinstance(value, list):
        return [absolute_path(item) for item in value]
    return value if value is None else os.path.abspath(os.path.expanduser(value))


def changed_settings(before: dict, after: dict) -> list[str]:
    """Dotted keys of the model, data and seed settings that differ, apart from `RESUMABLE_SETTINGS`; paths compare
    as absolute paths (a config.yaml saved before paths were written absolute holds them relative), class paths as
    the classes they import (a class that moved keeps its old path as an alias)."""

    def flat(value, prefix: str) -> dict:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}.{key}").items()}
        return {prefix: absolute_path(value) if prefix[1:] in PATH_SETTINGS else value}

    a, b = ({k[1:]: v for k, v in flat(config, "").items()} for config in (before, after))
    keys = {k for k in a.keys() | b.keys() if k.split(".")[0] in ("model", "data", "seed_everything")}

    def value(config: dict, key: str) -> Any:
        return _imported(config[key]) if key.endswith(".class_path") and key in config else config.get(key)

    return sorted(k for k in keys - RESUMABLE_SETTINGS if value(a, k) != value(b, k))


def _imported(class_path: Any) -> Any:
    """The object a dotted class path names; anything else (a short name, a path that no longer imports) as it is."""
    module, _, name = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return class_path


def slide_record(cohort: SlideCohort) -> dict[str, list]:
    """What decides a slide's results besides the config (`RunState.check_slides`): its CSV row and its file
    (`file_signature`: size, mtime and a content sample)."""
    record = {}
    for row in cohort.rows:
        signature = file_signature(cohort.paths[row.slide_id])  # size, mtime, content sample
        target = [] if row.target is None else [list(row.target)]  # classification runs recorded before targets
        record[row.slide_id] = [row.label, row.patient_id, row.split, row.mpp, *signature, *target]
    return record


class RunDir:
    """The paths of one ICMIL run (see the module docstring)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def smoke_test(self) -> RunDir:
        """The run directory of a `fast_dev_run` of this run."""
        return RunDir(self.root / "fast_dev_run")

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def splits_path(self) -> Path:
        return self.root / SPLITS_FILE

    @property
    def results_path(self) -> Path:
        return self.root / RESULTS_FILE

    @property
    def figures_dir(self) -> Path:
        return self.root / "figures"

    @property
    def features_root(self) -> Path:
        return self.root / "features"

    def bag_dir(self, iteration: int) -> Path:
        return self.root / f"iter{iteration}" / "bag"

    def couple_dir(self, iteration: int) -> Path:
        return self.root / f"iter{iteration}" / "couple"

    def embedder_path(self, iteration: int) -> Path:
        """E_i, the embedder of iteration i: for i >= 1 written by the couple phase of iteration i - 1; E_0 by the
        calibrate phase, where the run re-estimates its BatchNorm statistics."""
        return self.root / f"iter{iteration}" / "embedder.pt"

    def save_embedder(self, iteration: int, embedder: torch.nn.Module) -> str:
        """Write E_i's weights (whole or not at all, by rank 0) and return their path."""
        path = self.embedder_path(iteration)

        def save() -> None:
            with atomic_path(path) as tmp:
                torch.save(embedder.state_dict(), tmp)

        written_by_rank_zero(save)
        return str(path)

    def final_dir(self, stage: str) -> Path:
        """Outputs of `stage` with the final model on the run's own cohort."""
        return self.root / "final" / stage

    def predict_dir(self, labels: os.PathLike) -> Path:
        """Predict outputs on another cohort than the run's: `final/predict-<labels file stem>`, numbered on
        (`-2`, ...) where that name is another labels file's (`x/labels.csv`, `y/labels.csv`); the labels file a
        folder belongs to is written in it (`COHORT_FILE`), so predicting a cohort again finds its folder."""
        source, base = os.path.abspath(labels), f"predict-{safe_name(Path(labels).stem)}"

        def free(folder: Path) -> bool:
            owner = folder / COHORT_FILE
            return not folder.exists() or (owner.is_file() and owner.read_text().strip() == source)

        written_by_rank_zero(lambda: None)  # every process looks before one writes
        candidates = (self.root / "final" / (base if k == 1 else f"{base}-{k}") for k in itertools.count(1))
        folder = next(folder for folder in candidates if free(folder))
        written_by_rank_zero(lambda: atomic_write(folder / COHORT_FILE, f"{source}\n"))
        return folder

    @contextlib.contextmanager
    def lock(self):
        """Hold the run directory for this process: a second `fit` (or `test`, `predict`) on it, started meanwhile,
        is refused with the holder named, instead of both writing the same checkpoints and last-writer-wins
        state.json. An OS lock: released when its process dies, so a killed run leaves no stale lock. Under DDP
        rank 0 holds it for all ranks."""
        if rank_zero_only.rank != 0:
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        lock, holder = FileLock(self.root / ".lock"), self.root / ".lock.json"
        try:
            lock.acquire(timeout=0)
        except Timeout:
            who = json.loads(holder.read_text()) if holder.is_file() else {}
            raise ValueError(
                f"model.init_args.run_dir: {self.root} is in use by pid {who.get('pid', '?')} on "
                f"{who.get('host', '?')} (since {who.get('since', '?')}); wait for it to end, or give another run_dir"
            ) from None
        try:
            since = time.strftime("%Y-%m-%d %H:%M:%S")
            atomic_write(holder, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}))
            yield
        finally:
            holder.unlink(missing_ok=True)
            lock.release()

    def save_config(self, text: str) -> None:
        """`config.yaml`, the resolved config (as `SaveConfigCallback` writes it for a single `fit`), so `test -c
        <run>/config.yaml` reproduces the run's setup. A started run is only continued with the settings it was
        started with: resuming with others would mix two experiments in one results.json."""
        if self.config_path.is_file() and self.state_path.is_file():
            changed = changed_settings(yaml.safe_load(self.config_path.read_text()), yaml.safe_load(text))
            if changed:
                raise ValueError(
                    f"model.init_args.run_dir: {self.root} holds a run started with other settings "
                    f"({', '.join(changed)}: not as in {self.config_path}); give a new run_dir, or delete this one "
                    "to start over"
                )
        written_by_rank_zero(lambda: atomic_write(self.config_path, text))


class RunState:
    """The completed phases of a run (`state.json`): each phase's output, seconds and metrics, the logger step the
    run has reached, and the slides it runs on. Saved whole after every change, on rank 0, while the other processes
    wait."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.root = path.parent
        state = json.loads(path.read_text()) if path.is_file() else {"done": {}}
        self.done: dict[str, dict] = state["done"]
        self.log_step: int = state.get("log_step", 0)
        self.slides: dict[str, list] | None = state.get("slides")

    def output(self, key: str) -> Any:
        """A phase's output (a path in the run), for this place of the run directory: it is recorded relative to it,
        so a copied or moved run uses its own files."""
        return str(self.root / self.done[key]["output"])

    def check_slides(self, slides: dict[str, list], labels: os.PathLike) -> None:
        """A run continues only on the cohort it started with: `slides` (slide id -> what decides its results: label,
        patient, split, mpp, file size and mtime) must equal what state.json recorded, or the changed slides are
        named; the first call records them."""
        if self.slides is not None and self.slides != slides:
            changed = sorted(k for k in self.slides.keys() | slides.keys() if self.slides.get(k) != slides.get(k))
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            raise ValueError(
                f"{labels}: {', '.join(changed[:3])}{more} changed since the run in {self.path.parent} started "
                "(label, patient, split, mpp or slide file); give a new run_dir, or delete this one to start over"
            )
        if self.slides is None:
            self.slides = slides
            self._save()

    def record(self, key: str, output: str, seconds: float, metrics: dict | None, log_step: int) -> None:
        output = os.path.relpath(output, self.root)
        self.done[key] = {"output": output, "seconds": round(seconds, 2), **({"metrics": metrics} if metrics else {})}
        self.log_step = log_step
        self._save()

    def _save(self) -> None:
        text = json.dumps({"done": self.done, "log_step": self.log_step, "slides": self.slides}, indent=1)
        written_by_rank_zero(lambda: atomic_write(self.path, text))
