"""ICMIL (Wang et al., MICCAI 2023 / IEEE TMI 2024): embed -> train the bag classifier -> couple, repeated.

`ICMIL` is what a config names as its model; `ICMILLoop` runs it with fresh `Trainer`s per phase (Lightning 2 has no
public custom-loop API). A run directory keeps everything needed to continue after a crash:

    <run>/state.json              completed phases, checkpoints, feature caches, per-iteration metrics and times
    <run>/splits.json             one split for every iteration
    <run>/features/<key>/         the feature cache of each iteration's embedder (keyed by its weights)
    <run>/iter<i>/bag/            bag-classifier checkpoints (best by validation AUROC, last)
    <run>/iter<i>/couple/         coupling checkpoints
    <run>/iter<i>/embedder.pt     E_i (i >= 1)
    <run>/results.json            per-iteration validation/test metrics and phase times

Re-running the same command skips completed phases (and resumes an unfinished bag phase from its last checkpoint);
every phase seeds from (seed, iteration, phase), so a resumed run gives the results of an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from data_modules.features import FeatureBagDataModule
from data_modules.patches import SlidePatchDataModule
from data_modules.splits import make_splits, require_labels, save_splits

from .bag_classifier import BagClassifier
from .coupling import CouplingStrategy, Distillation
from .embedder import PatchEmbedder
from .results import stage_metrics, write_results
from .progress import PhaseProgressBar
from .seeding import EpochSeed
from .viz import iteration_figure, save_png
from .writers import extract_features

__all__ = ["ICMIL", "ICMILLoop", "SplitConfig"]

PHASES = ("embed", "bag", "couple")
PHASE_TEXT = {"embed": "extracting features", "bag": "training the bag classifier",
              "couple": "fine-tuning the embedder from the bag classifier"}  # fmt: skip
_say = rank_zero_only(print)  # one line per event, not one per process


def _written_by_rank_zero(write: Callable[[], Any]) -> None:
    """Run-directory files are written by one process and the others wait for them: under DDP every process runs
    the loop (Lightning starts them at the first Trainer), and each phase reads what the one before wrote."""
    if rank_zero_only.rank == 0:
        write()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


@dataclass(frozen=True)
class SplitConfig:
    """One patient-grouped, stratified split for all iterations (see `data_modules.splits.make_splits`)."""

    folds: int = 5
    fold: int = 0
    val_fraction: float = 0.1
    seed: int = 0


class ICMIL(pl.LightningModule):
    """The ICMIL procedure as configuration: embedder E_0, bag classifier, coupling strategy and phase settings.

    `bag_trainer`, `couple_trainer` and `embed_trainer` override the config's `trainer` settings per phase (e.g.
    `{max_epochs: 200}` for the bag phase, `{precision: bf16-mixed}` for extraction).
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
    ) -> None:
        super().__init__()
        if iterations < 0:
            raise ValueError(f"iterations: expected an int >= 0 (0 = the two-stage baseline only), got {iterations}")
        if embedder.feature_dim != bag.aggregator.in_dim:
            raise ValueError(f"bag aggregator in_dim={bag.aggregator.in_dim}, but the embedder gives "
                             f"{embedder.feature_dim}-d features")
        self.embedder, self.bag = embedder, bag
        self.coupling = coupling or Distillation()
        self.iterations, self.run_dir, self.splits = iterations, Path(run_dir), splits
        self.feature_dtype = feature_dtype
        self.phase_trainer = {"bag": bag_trainer or {}, "couple": couple_trainer or {}, "embed": embed_trainer or {}}


class _PhaseLogger(Logger):
    """One logger run for the whole procedure: metric names get `iter<i>/<phase>/`, steps continue across phases."""

    def __init__(self, logger: Logger, prefix: str, step_offset: int, root: Path) -> None:
        super().__init__()
        self.inner, self.prefix, self.offset, self.last_step, self.root = logger, prefix, step_offset, step_offset, root

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def version(self):
        return self.inner.version

    @property
    def save_dir(self) -> str:
        """The phase's own folder: per-phase outputs (predictions.csv) never overwrite each other."""
        return str(self.root)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.last_step = self.offset + (step or 0)
        self.inner.log_metrics({f"{self.prefix}/{k}": v for k, v in metrics.items()}, self.last_step)

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # the resolved config is logged once by the CLI (icmil_pl.wandb_run, under "cli")

    @rank_zero_only
    def save(self) -> None:
        self.inner.save()


class ICMILLoop:
    """Runs an `ICMIL` configuration on a `SlidePatchDataModule` cohort; see the module docstring."""

    def __init__(self, icmil: ICMIL, data: SlidePatchDataModule, trainer: dict[str, Any], logger: Logger | None,
                 seed: int = 0) -> None:
        self.icmil, self.data, self.seed = icmil, data, seed
        self.trainer_kwargs = {k: v for k, v in trainer.items() if k not in ("logger", "callbacks", "default_root_dir")}
        self.logger = logger
        self.run_dir = icmil.run_dir
        if trainer.get("fast_dev_run"):  # a smoke test never marks phases of the real run done
            self.run_dir = icmil.run_dir / "fast_dev_run"
            if rank_zero_only.rank == 0:  # DDP: the other processes start later, when rank 0 has written here
                shutil.rmtree(self.run_dir, ignore_errors=True)
        self.state_path = self.run_dir / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {"done": {}}
        self._step = self.state.get("log_step", 0)

    # -- the procedure -----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data.prepare_data()
        rows = self.data.cohort.rows
        require_labels(rows, self.data.cohort.labels_path, "ICMIL training")
        self.data.setup()
        split_cfg = self.icmil.splits
        splits = make_splits(rows, folds=split_cfg.folds, fold=split_cfg.fold, val_fraction=split_cfg.val_fraction,
                             seed=split_cfg.seed)
        _written_by_rank_zero(lambda: save_splits(splits, self.run_dir))
        embedder = self.icmil.embedder
        for i in range(self.icmil.iterations + 1):
            cache = self._phase(i, "embed", lambda: self._embed(i, embedder))
            best = self._phase(i, "bag", lambda: self._bag(i, cache))
            if i == self.icmil.iterations:
                break
            embedder_path = self._phase(i, "couple", lambda: self._couple(i, embedder, best, splits))
            embedder = self._load_embedder(embedder_path)
        results = self._write_results()
        self._print_table(results)
        _say(f"\noutputs in {self.run_dir}: results.json, figures/auroc_by_iteration.png, iter<i>/ (checkpoints, "
             f"embedders), features/ (caches); test or predict with the final model: python -m icmil_pl "
             f"<test|predict> -c <this config, or {self.run_dir / 'config.yaml'}>")
        return results

    def _phase(self, i: int, phase: str, work) -> Any:
        key = f"iter{i}/{phase}"
        if key in self.state["done"]:
            _say(f"{key}: done in an earlier run ({self.state_path}), skipped")
            return self.state["done"][key]["output"]
        _say(f"{key}: {PHASE_TEXT[phase]} (iteration {i} of {self.icmil.iterations})")
        pl.seed_everything(self.seed + 1000 * i + PHASES.index(phase), verbose=False)
        start = time.perf_counter()
        output, metrics = work()
        self.state["done"][key] = {"output": output, "seconds": round(time.perf_counter() - start, 2),
                                   **({"metrics": metrics} if metrics else {})}
        self.state["log_step"] = self._step
        self._save_state()
        return output

    def _embed(self, i: int, embedder: PatchEmbedder) -> tuple[str, None]:
        kwargs = self._trainer("embed", i, self.run_dir)
        kwargs.pop("logger", None)
        cache = extract_features(embedder, self.data, str(self.run_dir / "features"), dtype=self.icmil.feature_dtype,
                                 trainer_kwargs=kwargs)
        return str(cache.path), None

    def _bag(self, i: int, cache: str) -> tuple[str, dict]:
        bag = copy.deepcopy(self.icmil.bag)
        data = self._bag_data(cache)
        root = self.run_dir / f"iter{i}" / "bag"
        bag.checkpoint_dir = str(root / "checkpoints")
        trainer = pl.Trainer(**{**self._trainer("bag", i, root), "default_root_dir": str(root)})
        last = root / "checkpoints" / "last.ckpt"
        trainer.fit(bag, datamodule=data, ckpt_path=str(last) if last.is_file() else None)
        best = trainer.checkpoint_callback.best_model_path
        if not best:  # no validation-selected checkpoint (fast_dev_run, no validation): the weights as trained
            best = str(last)
            if not last.is_file():
                trainer.save_checkpoint(last)
        val = trainer.validate(bag, datamodule=data, ckpt_path=best, verbose=False)
        test = trainer.test(bag, datamodule=data, ckpt_path=best, verbose=False)
        self._advance(trainer)
        return best, {"val": stage_metrics(val, "val"), "test": stage_metrics(test, "test")}

    def _couple(self, i: int, embedder: PatchEmbedder, best_bag: str, splits: dict) -> tuple[str, None]:
        bag = copy.deepcopy(self.icmil.bag)
        bag.load_state_dict(torch.load(best_bag, map_location="cpu", weights_only=False)["state_dict"])
        train_ids = set(splits["train"])
        train = [s for s in self.data.slide_patches if s.slide_id in train_ids]
        rows = self.data.cohort.rows
        class_index = {name: k for k, name in enumerate(sorted({row.label for row in rows}))}  # as FeatureBagDataModule
        labels = {row.slide_id: class_index[row.label] for row in rows}
        root = self.run_dir / f"iter{i}" / "couple"
        kwargs = self._trainer("couple", i, root)
        coupled = self.icmil.coupling.fit(embedder, bag, train, trainer_kwargs=kwargs, root=root,
                                          seed=self.seed + 1000 * i + 2, labels=labels)
        path = self.run_dir / f"iter{i + 1}" / "embedder.pt"

        def save() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".pt.tmp")
            torch.save(coupled.state_dict(), tmp)
            os.replace(tmp, path)

        _written_by_rank_zero(save)
        self._step += 1
        return str(path), None

    # -- a finished run ----------------------------------------------------------------------------------------------
    def evaluate(self, stage: Literal["validate", "test", "predict"]) -> list:
        """`stage` with the final embedder and bag classifier of a finished run, on this config's cohort.

        validate/test use the run's splits; predict scores every slide of the labels CSV, which may be new slides
        without labels (`--data.init_args.labels=new.csv --data.init_args.slides=new/`): slides missing from the final
        embedder's feature cache are embedded first. Outputs (predictions.csv) go to
        `<run>/final/<stage>/`.
        """
        n, done = self.icmil.iterations, self.state["done"]
        if f"iter{n}/bag" not in done:
            raise ValueError(f"model.init_args.run_dir: {self.run_dir} holds no finished ICMIL run of {n} iterations "
                             "(state.json); run fit with this config first")  # fmt: skip
        self.data.prepare_data()
        self.data.setup()
        embedder = self._load_embedder(done[f"iter{n - 1}/couple"]["output"]) if n else self.icmil.embedder
        root = self.run_dir / "final" / stage
        kwargs = {**self._trainer("embed", n, root), "logger": False}
        cache = extract_features(embedder, self.data, str(self.run_dir / "features"), dtype=self.icmil.feature_dtype,
                                 trainer_kwargs=kwargs)  # fmt: skip
        data = self._bag_data(str(cache.path))
        trainer = pl.Trainer(**{**self._trainer("bag", n, root), "logger": False, "default_root_dir": str(root)})
        bag, best = copy.deepcopy(self.icmil.bag), done[f"iter{n}/bag"]["output"]
        out = getattr(trainer, stage)(bag, datamodule=data, ckpt_path=best)
        _say(f"{stage} with the final embedder and bag classifier of {self.run_dir}: outputs in {root}")
        return out

    # -- helpers -----------------------------------------------------------------------------------------------------
    def _bag_data(self, cache: str) -> FeatureBagDataModule:
        split = self.icmil.splits
        return FeatureBagDataModule(str(self.data.cohort.labels_path), cache, folds=split.folds, fold=split.fold,
                                    val_fraction=split.val_fraction, seed=split.seed,
                                    slides=str(self.data.cohort.slides_dir))  # fmt: skip

    def _load_embedder(self, path: str) -> PatchEmbedder:
        embedder = copy.deepcopy(self.icmil.embedder)
        embedder.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return embedder

    def _trainer(self, phase: str, i: int, root: Path) -> dict[str, Any]:
        kwargs = {**self.trainer_kwargs, **self.icmil.phase_trainer[phase]}
        if phase == "embed":  # every slide's features, also under fast_dev_run: the bag phase needs whole bags
            kwargs = {k: v for k, v in kwargs.items() if k not in ("fast_dev_run", "limit_predict_batches")}
        kwargs.setdefault("enable_model_summary", False)
        kwargs["callbacks"] = [EpochSeed(self.seed + 1000 * i + PHASES.index(phase))]
        if kwargs.get("enable_progress_bar", True):
            kwargs["callbacks"].append(PhaseProgressBar(f"iter{i}/{phase}"))
        if self.logger is not None and phase != "embed":
            kwargs["logger"] = _PhaseLogger(self.logger, f"iter{i}/{phase}", self._step, root)
        else:
            kwargs["logger"] = False
        return kwargs

    def _advance(self, trainer: pl.Trainer) -> None:
        logger = trainer.logger
        if isinstance(logger, _PhaseLogger):
            self._step = logger.last_step + 1

    def _save_state(self) -> None:
        def save() -> None:
            tmp = self.state_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.state, indent=1))
            os.replace(tmp, self.state_path)

        _written_by_rank_zero(save)

    def _write_results(self) -> dict:
        done = self.state["done"]
        iterations = []
        for i in range(self.icmil.iterations + 1):
            bag = done[f"iter{i}/bag"]
            seconds = {p: done[f"iter{i}/{p}"]["seconds"] for p in PHASES if f"iter{i}/{p}" in done}
            iterations.append({"iteration": i, "checkpoint": bag["output"], **bag["metrics"], "seconds": seconds})
        figure = self.run_dir / "figures" / "auroc_by_iteration.png"

        def save() -> None:
            write_results(self.run_dir, iterations, model="ICMIL", coupling=type(self.icmil.coupling).__name__)
            save_png(iteration_figure(iterations), figure)

        _written_by_rank_zero(save)
        if isinstance(self.logger, WandbLogger):
            self.logger.log_image(key="final/auroc_by_iteration", images=[str(figure)])
        if self.logger is not None:  # stable names for sweeps: the final iteration's metrics
            final = iterations[-1]
            self.logger.log_metrics({f"final/{s}/{m}": v for s in ("val", "test") for m, v in final[s].items()},
                                    step=self._step)
            self.logger.save()
        return {"iterations": iterations}

    @staticmethod
    @rank_zero_only
    def _print_table(results: dict) -> None:
        print(f"\n{'iter':>4s} {'val AUROC':>9s} {'test AUROC':>10s} {'test acc':>8s} {'test F1':>7s}  "
              f"{'embed s':>7s} {'bag s':>6s} {'couple s':>8s}")
        for r in results["iterations"]:
            s = r["seconds"]
            print(f"{r['iteration']:4d} {r['val']['auroc']:9.4f} {r['test']['auroc']:10.4f} {r['test']['accuracy']:8.4f} "
                  f"{r['test']['f1']:7.4f}  {s.get('embed', 0):7.1f} {s.get('bag', 0):6.1f} {s.get('couple', 0):8.1f}")
