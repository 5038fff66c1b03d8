"""ICMIL (Wang et al., MICCAI 2023 / IEEE TMI 2024): embed -> train the bag classifier -> couple, repeated.

`ICMIL` is what a config names as its model; `ICMILLoop` runs it with fresh `Trainer`s per phase (Lightning 2 has no
public custom-loop API), one method per phase. Everything needed to continue after a crash is in the run directory
(`run_dir.py`): re-running the same command skips completed phases and resumes an unfinished bag or couple phase
from its last checkpoint; every phase seeds from (seed, iteration, phase), so a resumed run gives the results of an
uninterrupted one.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only

from data_modules.cohort import require_labels
from data_modules.cohort.splits import SplitConfig, make_splits, save_splits
from data_modules.datasets.feature_bags import FeatureBagDataModule
from data_modules.datasets.feature_cache import FeatureCache
from data_modules.datasets.patches import SlidePatchDataModule
from data_modules.datasets.patient_bags import BagLevel
from data_modules.io import check

from .bag_classifier import BagClassifier
from .callbacks import DivergenceGuard, EpochSeed, PhaseProgressBar, ProgressLog, extract_features
from .coupling import CouplingStrategy, Distillation
from .encoders import PatchEmbedder, reestimated
from .phase_logger import PhaseLogger
from .results import log_run_results, print_table, stage_metrics, write_run_report, write_run_results
from .run_dir import (
    PHASES,
    Phase,
    RunDir,
    RunState,
    checkpoint_dir,
    last_checkpoint,
    phase_key,
    phase_seed,
    resume_checkpoint,
    slide_record,
    written_by_rank_zero,
)
from .run_record import read_record, restore
from .slide_task import take_trainer_clipping

__all__ = ["ICMIL", "ICMILLoop"]

PHASE_TEXT = {
    "embed": "extracting features",
    "bag": "training the bag classifier",
    "couple": "fine-tuning the embedder from the bag classifier",
    "calibrate": "re-estimating the embedder's BatchNorm statistics on the training patches",
}
_say = rank_zero_only(print)  # one line per event, not one per process


class ICMIL(pl.LightningModule):
    """The ICMIL procedure as configuration: embedder E_0, bag classifier, coupling strategy and phase settings.

    `bag_trainer`, `couple_trainer` and `embed_trainer` override the config's `trainer` settings per phase (e.g.
    `{max_epochs: 200}` for the bag phase, `{precision: bf16-mixed}` for extraction). `bag_level: patient` makes a
    bag of all slides of a patient in the bag phase and in `BagGradient` coupling
    (`data_modules.datasets.patient_bags`).
    `reestimate_batchnorm: k` re-estimates E_0's BatchNorm statistics on up to k patches of the training slides before
    the first extraction (`PatchEmbedder.reestimate_batchnorm`; no weight moves): the free gain of any random or
    ImageNet CNN on H&E, which iteration 0 of a fair comparison has, so that no coupling is credited with it.
    """

    def __init__(
        self,
        embedder: PatchEmbedder,
        bag: BagClassifier,
        coupling: CouplingStrategy | None = None,
        iterations: int = 2,
        run_dir: str = "runs/icmil",
        splits: SplitConfig = SplitConfig(),
        feature_dtype: str = "float16",
        bag_trainer: dict[str, Any] | None = None,
        couple_trainer: dict[str, Any] | None = None,
        embed_trainer: dict[str, Any] | None = None,
        bag_level: BagLevel = "slide",
        reestimate_batchnorm: int | None = None,
    ) -> None:
        super().__init__()
        check("bag_level", bag_level in ("slide", "patient"), "'slide' or 'patient'", bag_level)
        check("iterations", iterations >= 0, "an int >= 0 (0 = the two-stage baseline only)", iterations)
        patches = reestimate_batchnorm
        check("reestimate_batchnorm", patches is None or patches >= 1, "null or a number of patches >= 1", patches)
        width = f"the embedder's feature width, {embedder.feature_dim}"
        check("bag.aggregator.in_dim", bag.aggregator.in_dim == embedder.feature_dim, width, bag.aggregator.in_dim)
        self.embedder = embedder
        self.bag = bag
        self.coupling = coupling or Distillation()
        self.iterations = iterations
        self.run_dir = RunDir(run_dir)
        self.splits = splits
        self.feature_dtype = feature_dtype
        self.bag_level = bag_level
        self.reestimate_batchnorm = reestimate_batchnorm
        self.phase_trainer = {"bag": bag_trainer or {}, "couple": couple_trainer or {}, "embed": embed_trainer or {}}


class ICMILLoop:
    """Runs an `ICMIL` configuration on a `SlidePatchDataModule` cohort; see the module docstring."""

    def __init__(
        self, icmil: ICMIL, data: SlidePatchDataModule, trainer: dict[str, Any], logger: Logger | None, seed: int = 0
    ) -> None:
        self.icmil = icmil
        self.data = data
        self.seed = seed
        self.logger = logger
        self.trainer_kwargs = {k: v for k, v in trainer.items() if k not in ("logger", "callbacks", "default_root_dir")}
        self.run_dir = icmil.run_dir
        if trainer.get("fast_dev_run"):  # a smoke test never marks phases of the real run done
            self.run_dir = icmil.run_dir.smoke_test()
            if rank_zero_only.rank == 0:  # DDP: the other processes start later, when rank 0 has written here
                shutil.rmtree(self.run_dir.root, ignore_errors=True)
        self.state = RunState(self.run_dir.state_path)
        self._step = self.state.log_step

    # -- the procedure -----------------------------------------------------------------------------------------------
    def run(self, config: str | None = None) -> dict:
        """The whole procedure; `config` (the resolved config as YAML) is saved as the run's config.yaml first."""
        with self.run_dir.lock():
            return self._run(config)

    def _run(self, config: str | None) -> dict:
        if config is not None:
            self.run_dir.save_config(config)
        self.run_dir.root.mkdir(parents=True, exist_ok=True)
        self.data.prepare_data()
        cohort = self.data.cohort
        require_labels(cohort.rows, cohort.labels_path, "ICMIL training")
        self.state.check_slides(slide_record(cohort), cohort.labels_path)
        self.data.setup()
        embedder = self.icmil.embedder
        if self.icmil.reestimate_batchnorm:
            embedder = self._load_embedder(self._phase(0, "calibrate", self._calibrate, embedder))
        splits = None
        for i in range(self.icmil.iterations + 1):
            cache = self._phase(i, "embed", self._embed, embedder)
            if splits is None:  # after the first extraction: slides it could not read (skip policy) are in no split
                splits = self._splits()
                written_by_rank_zero(functools.partial(save_splits, splits, self.run_dir.root))
            best = self._phase(i, "bag", self._bag, cache, splits)
            if i == self.icmil.iterations:
                break
            embedder_path = self._phase(i, "couple", self._couple, embedder, best, splits, cache)
            embedder = self._load_embedder(embedder_path)
        results = self._write_results()
        written_by_rank_zero(lambda: write_run_report(self.run_dir.root))
        task = self.icmil.bag.task
        metric = task.monitor
        print_table(results, (metric, *(m for m in task.metric_names if m != metric)))
        _say(
            f"\noutputs in {self.run_dir.root}: report.html, results.json, figures/{metric}_by_iteration.png, iter<i>/ "
            "(checkpoints, embedders), features/ (caches); test or predict with the final model: python -m icmil_pl "
            f"<test|predict> -c <this config, or {self.run_dir.config_path}>"
        )
        return results

    def _phase(self, i: int, phase: Phase, work: Callable[..., tuple[Any, dict | None]], *args: Any) -> Any:
        """`work(i, *args)` -> (output, metrics), unless state.json says an earlier run did it: then its output."""
        key = phase_key(i, phase)
        if key in self.state.done:
            _say(f"{key}: done in an earlier run ({self.state.path}), skipped")
            return self.state.output(key)
        _say(f"{key}: {PHASE_TEXT[phase]} (iteration {i} of {self.icmil.iterations})")
        pl.seed_everything(phase_seed(self.seed, i, phase), verbose=False)
        start = time.perf_counter()
        output, metrics = work(i, *args)
        seconds = time.perf_counter() - start
        self.state.record(key, output, seconds, metrics, self._step)
        metric, found = self.icmil.bag.task.monitor, metrics or {}
        scores = [f"{k} {metric} {found[k][metric]:.3f}" for k in ("val", "test") if metric in (found.get(k) or {})]
        _say(f"{key}: done in {seconds:.1f} s" + (f" ({', '.join(scores)})" if scores else ""))
        return output

    def _calibrate(self, i: int, embedder: PatchEmbedder) -> tuple[str, None]:
        """E_0 with its BatchNorm statistics re-estimated on a seeded sample of the training split's patches (the
        split of the slides tiling could read; one the extraction then finds unreadable is left out of the run's
        splits, not of this sample)."""
        train = set(self._splits()["train"])
        slides = [s for s in self.data.slide_patches if s.slide_id in train]
        cpu = {**self.trainer_kwargs, **self.icmil.phase_trainer["embed"]}.get("accelerator") == "cpu"
        calibrated = reestimated(
            embedder,
            slides,
            self.icmil.reestimate_batchnorm,
            batch_size=self.data.batch_size,
            seed=phase_seed(self.seed, i, "calibrate"),
            device=torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu"),
        )
        return self.run_dir.save_embedder(0, calibrated), None

    def _embed(self, i: int, embedder: PatchEmbedder) -> tuple[str, None]:
        kwargs = self._trainer("embed", i, self.run_dir.root)
        kwargs.pop("logger", None)
        return str(self._extract(embedder, kwargs).path), None

    def _bag(self, i: int, cache: str, splits: dict[str, list[str]]) -> tuple[str, dict]:
        bag = copy.deepcopy(self.icmil.bag)
        data = self._bag_data(cache, splits)
        root = self.run_dir.bag_dir(i)
        bag.checkpoint_dir = str(checkpoint_dir(root))
        kwargs = self._trainer("bag", i, root)
        take_trainer_clipping(bag, kwargs)
        trainer = pl.Trainer(**{**kwargs, "default_root_dir": str(root)})
        trainer.fit(bag, datamodule=data, ckpt_path=resume_checkpoint(root))
        best = trainer.checkpoint_callback.best_model_path
        if not best:  # no validation-selected checkpoint (fast_dev_run, no validation): the weights as trained
            last = last_checkpoint(root)
            best = str(last)
            if not last.is_file():
                trainer.save_checkpoint(last)
        val = trainer.validate(bag, datamodule=data, ckpt_path=best, verbose=False)
        test = trainer.test(bag, datamodule=data, ckpt_path=best, verbose=False)
        self._advance(trainer)
        return best, {"val": stage_metrics(val, "val"), "test": stage_metrics(test, "test")}

    def _couple(
        self, i: int, embedder: PatchEmbedder, best_bag: str, splits: dict[str, list[str]], cache: str
    ) -> tuple[str, None]:
        bag = copy.deepcopy(self.icmil.bag)
        bag.load_state_dict(torch.load(best_bag, map_location="cpu", weights_only=False)["state_dict"])
        skipped = set(FeatureCache(cache).skipped())  # unreadable slides stay out

        def slides(split: str) -> list:
            ids = set(splits[split]) - skipped
            return [s for s in self.data.slide_patches if s.slide_id in ids]

        cohort = self.data.cohort
        labels = cohort.encoded_targets()
        patients = {row.slide_id: row.patient_id for row in cohort.rows}
        root = self.run_dir.couple_dir(i)
        coupled = self.icmil.coupling.fit(
            embedder,
            bag,
            slides("train"),
            trainer_kwargs=self._trainer("couple", i, root),
            root=root,
            seed=phase_seed(self.seed, i, "couple"),
            labels=labels,
            val=slides("val"),
            patients=patients,
            patient_bags=self.icmil.bag_level == "patient",
        )
        self._step += 1
        return self.run_dir.save_embedder(i + 1, coupled), None

    # -- a finished run ----------------------------------------------------------------------------------------------
    def evaluate(self, stage: Literal["validate", "test", "predict"]) -> list:
        """`stage` with the final embedder and bag classifier of a finished run, on this config's cohort.

        validate/test use the run's splits, on the run's cohort only; predict scores every slide of the labels CSV,
        which may be new slides without labels (`--data.init_args.labels=new.csv --data.init_args.slides=new/`):
        slides missing from the final embedder's feature cache are embedded first. Outputs (predictions.csv) go to
        `<run>/final/<stage>/`, those of another cohort than the run's to `<run>/final/predict-<labels file stem>/`,
        so they never overwrite the run's own."""
        with self.run_dir.lock():
            return self._evaluate(stage)

    def _evaluate(self, stage: Literal["validate", "test", "predict"]) -> list:
        n, done = self.icmil.iterations, self.state.done
        if phase_key(n, "bag") not in done:
            raise ValueError(
                f"model.init_args.run_dir: {self.run_dir.root} holds no finished ICMIL run of {n} iterations "
                "(state.json); run fit with this config first"
            )
        self.data.prepare_data()
        self.data.setup()
        cohort, slides = self.data.cohort, slide_record(self.data.cohort)
        if stage == "predict":  # any slides, labelled or not; another cohort's outputs go beside the run's own
            other = self.state.slides is not None and slides != self.state.slides
            root = self.run_dir.predict_dir(cohort.labels_path) if other else self.run_dir.final_dir(stage)
        else:  # the run's splits: only on the cohort it was trained on
            self.state.check_slides(slides, cohort.labels_path)
            root = self.run_dir.final_dir(stage)
        embedder = self._final_embedder()
        cache = self._extract(embedder, {**self._trainer("embed", n, root, f"final/{stage}/embed"), "logger": False})
        best = self.state.output(phase_key(n, "bag"))
        data = self._bag_data(str(cache.path), None)
        record = read_record(best)
        if record is None:  # a run from before records: its splits.json, today's class order
            data.restore(data.classes, json.loads(self.run_dir.splits_path.read_text()))
        else:
            restore(record, data, best)
        bag_kwargs = self._trainer("bag", n, root, f"final/{stage}")
        trainer = pl.Trainer(**{**bag_kwargs, "logger": False, "default_root_dir": str(root)})
        bag = copy.deepcopy(self.icmil.bag)
        out = getattr(trainer, stage)(bag, datamodule=data, ckpt_path=best)
        _say(f"{stage} with the final embedder and bag classifier of {self.run_dir.root}: outputs in {root}")
        written_by_rank_zero(lambda: write_run_report(self.run_dir.root))
        return out

    # -- helpers -----------------------------------------------------------------------------------------------------
    def _final_embedder(self) -> PatchEmbedder:
        """E_n: the last coupling's, else the calibrated E_0, else E_0 as configured."""
        for key in (phase_key(self.icmil.iterations - 1, "couple"), phase_key(0, "calibrate")):
            if key in self.state.done:
                return self._load_embedder(self.state.output(key))
        return self.icmil.embedder

    def _skipped(self) -> dict[str, str]:
        """Slides left out as unreadable (on_slide_error: skip) by tiling or by any iteration's extraction, with
        why."""
        skipped: dict[str, str] = dict(self.data.skipped)
        for i in range(self.icmil.iterations + 1):
            key = phase_key(i, "embed")
            if key in self.state.done:
                skipped.update(FeatureCache(self.state.output(key)).skipped())
        return skipped

    def _splits(self) -> dict[str, list[str]]:
        """The run's one split, of the slides extraction could read."""
        skipped = self._skipped()
        rows = [row for row in self.data.cohort.rows if row.slide_id not in skipped]
        cohort = self.data.cohort
        return make_splits(rows, self.icmil.splits, cohort.labels_path, cohort.targets)

    def _extract(self, embedder: PatchEmbedder, trainer_kwargs: dict[str, Any]):
        return extract_features(
            embedder,
            self.data,
            str(self.run_dir.features_root),
            dtype=self.icmil.feature_dtype,
            trainer_kwargs=trainer_kwargs,
        )

    def _bag_data(self, cache: str, splits: dict[str, list[str]] | None) -> FeatureBagDataModule:
        """The bag phase's data: the cohort's features, with the slide files and annotations it found passed on,
        never looked up again."""
        cohort = self.data.cohort
        data = FeatureBagDataModule(
            str(cohort.labels_path),
            cache,
            splits=self.icmil.splits,
            split_ids=splits,
            targets=cohort.targets,
            bag_level=self.icmil.bag_level,
        )
        data.slide_paths, data.slide_annotations = dict(cohort.paths), dict(self.data.slide_annotations)
        return data

    def _load_embedder(self, path: str) -> PatchEmbedder:
        embedder = copy.deepcopy(self.icmil.embedder)
        embedder.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        weights = os.path.relpath(path, self.run_dir.root)  # the run's own file: its caches' manifests move with it
        embedder.source = {**embedder.source, "weights": weights}  # E_0's preset and hub revision, fine-tuned weights
        return embedder

    def _trainer(self, phase: Phase, i: int, root: os.PathLike, label: str | None = None) -> dict[str, Any]:
        """Trainer settings for `phase` of iteration i; `label` names it in progress (default `iter<i>/<phase>`)."""
        kwargs = {**self.trainer_kwargs, **self.icmil.phase_trainer[phase]}
        if phase == "embed":  # every slide's features, also under fast_dev_run: the bag phase needs whole bags
            kwargs = {k: v for k, v in kwargs.items() if k not in ("fast_dev_run", "limit_predict_batches")}
        kwargs.setdefault("enable_model_summary", False)
        label = label or phase_key(i, phase)
        kwargs["callbacks"] = [EpochSeed(phase_seed(self.seed, i, phase)), DivergenceGuard(label)]
        bar = kwargs.get("enable_progress_bar", True)
        kwargs["callbacks"].append(PhaseProgressBar(label) if bar else ProgressLog(label))
        if self.logger is not None and phase != "embed":
            kwargs["logger"] = PhaseLogger(self.logger, phase_key(i, phase), self._step, root)
        else:
            kwargs["logger"] = False
        return kwargs

    def _advance(self, trainer: pl.Trainer) -> None:
        logger = trainer.logger
        if isinstance(logger, PhaseLogger):
            self._step = logger.last_step + 1

    def _write_results(self) -> dict:
        done = self.state.done
        iterations = []
        for i in range(self.icmil.iterations + 1):
            bag = done[phase_key(i, "bag")]
            seconds = {p: done[phase_key(i, p)]["seconds"] for p in PHASES if phase_key(i, p) in done}
            iterations.append({"iteration": i, "checkpoint": bag["output"], **bag["metrics"], "seconds": seconds})
        coupling, metric, skipped = type(self.icmil.coupling).__name__, self.icmil.bag.task.monitor, self._skipped()
        figure = self.run_dir.figures_dir / f"{metric}_by_iteration.png"
        written_by_rank_zero(
            lambda: write_run_results(self.run_dir.root, iterations, coupling, skipped, figure, metric)
        )
        log_run_results(self.logger, iterations, figure, self._step)
        return {"iterations": iterations}
