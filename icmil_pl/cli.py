"""The command line: one LightningCLI for fit/validate/test/predict, configured by YAML under `experiments/`.

    python -m icmil_pl fit -c experiments/abmil_features.yaml --model.init_args.lr=1e-4
    python -m icmil_pl test -c runs/<run>/config.yaml --ckpt_path runs/<run>/checkpoints/best-....ckpt

`omegaconf+` mode resolves `${...}` after command-line overrides are applied, so a relative interpolation such as
`${..lr}` follows `--model.init_args.lr=...`. Classes are named by their short names in YAML (`class_path: ABMIL`).

With `--trainer.logger=WandbLogger` the run is offline unless wandb has credentials (`wandb login`) or WANDB_MODE says
otherwise, and carries the resolved config under `cli` (see `icmil_pl.tools.wandb_run`).
"""

from __future__ import annotations

import functools
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from pytorch_lightning import LightningDataModule, LightningModule, Trainer
from pytorch_lightning.cli import ArgsType, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

# Imported so that jsonargparse knows every class by its short name (each package imports all of its modules).
import data_modules.datasets  # noqa: F401
import data_modules.synthetic.datamodule  # noqa: F401
from data_modules.datasets.bag_base import BagDataModule
from icmil_pl import aggregators, bag_classifier, callbacks, coupling, encoders, end_to_end, ssl_pretrain, tasks  # noqa: F401
from icmil_pl.encoders import PatchEmbedder
from icmil_pl.loop import ICMIL, ICMILLoop

from . import console
from .callbacks import output_dir
from .config_files import ConfigParser, config_files
from .results import record_fit, write_run_report
from .run_dir import PATH_SETTINGS, RunDir, absolute_path
from .run_record import RECORD_KEY, check_architecture, load_checkpoint, restore
from .slide_task import SlideTask, take_trainer_clipping
from .tools import wandb_run

__all__ = ["ICMILCLI", "LOG_ROOT", "main"]

LOG_ROOT = "runs"  # where outputs and CSV logs go unless the config says otherwise (an ICMIL run: its run_dir)
_EPILOG = (
    "Sweeps: python -m icmil_pl sweep <sweep file> --count N [--key=value ...] runs a W&B sweep file without a "
    "server (python -m icmil_pl sweep --help). A run's report.html: python -m icmil_pl report <run dir>. Its slides "
    "in a browser: python -m icmil_pl view <run dir> [--port 8000]."
)
_NOTHING_LOGGED = {"config.yaml", "hparams.yaml", console.LOG_FILE}  # a version folder before the first metric


class ICMILCLI(LightningCLI):
    """LightningCLI that, after `fit`, validates and tests the best checkpoint and writes `results.json`
    (`results.record_fit`).

    `fit` with an `ICMIL` model runs the whole ICMIL procedure (`ICMILLoop`) with fresh Trainers built from the
    config's trainer settings, instead of a single `trainer.fit`; `validate`, `test` and `predict` with it use the
    final embedder and bag classifier of the finished run in `run_dir`.

    After `fit` every logger gets the final validation and test metrics under the names ICMIL logs them by,
    `final/{val,test}/<metric>`, so a sweep optimises `final/val/auroc` whatever the model; `results_dir` is then the
    folder holding the fit's results.json.
    """

    results_dir: Path | None = None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Without a logger a command has no folder of its own (feature extraction): it saves no config.yaml, which
        would land in the shared `runs/` and be overwritten by the next such command. A slide model optimizes
        manually: the trainer's gradient clipping is handed to it."""
        trainer = self._get(self.config_init, "trainer", default={})
        if trainer.get("logger") is False:
            self.save_config_callback = None
        if isinstance(self.model, SlideTask):
            handed = {"gradient_clip_val": None, "gradient_clip_algorithm": None, "accumulate_grad_batches": 1}
            take_trainer_clipping(self.model, {k: trainer.get(k) or unset for k, unset in handed.items()})
            kwargs = {**kwargs, **handed}
        return super().instantiate_trainer(**kwargs)

    def before_instantiate_classes(self) -> None:
        """A run's own config.yaml (beside its state.json) is that run, wherever the run directory was copied or moved
        and whatever the working directory: its run_dir becomes the file's folder, unless another setting after it
        names another. A copied run used to test and resume the original's checkpoints."""
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        run_dir = config.get("model.init_args.run_dir")
        for path in config.get("config") or []:
            file = Path(getattr(path, "absolute", path))
            if run_dir is None or file.name != RunDir(file.parent).config_path.name:
                continue
            if RunDir(file.parent).state_path.is_file():
                saved = yaml.safe_load(file.read_text())
                if saved.get("model", {}).get("init_args", {}).get("run_dir") == run_dir:
                    config["model.init_args.run_dir"] = str(file.parent)

    def after_instantiate_classes(self) -> None:
        self._wandb_offline_by_default = wandb_run.default_offline(self.trainer.loggers)
        wandb_run.group_job_array(self.trainer.loggers)

    def _run_subcommand(self, subcommand: str) -> None:
        self._log_console()
        self._mention_precision()
        if any(isinstance(logger, WandbLogger) for logger in self.trainer.loggers):
            wandb_run.start(
                self.trainer.loggers, self._config(subcommand), announce_offline=self._wandb_offline_by_default
            )
        if isinstance(self.model, ICMIL):
            trainer = self.config[subcommand]["trainer"].as_dict()
            seed = self.config[subcommand].get("seed_everything")
            loop = ICMILLoop(self.model, self.datamodule, trainer, self.trainer.logger, seed=int(seed or 0))
            if isinstance(loop.logger, CSVLogger) and Path(loop.logger.save_dir) == Path(LOG_ROOT):
                loop.logger = CSVLogger(loop.run_dir.root, name="logs")  # nobody chose: the run keeps its own logs
            if subcommand == "fit":
                parser = self._parser(subcommand)
                loop.run(config=parser.dump(_absolute_paths(self.config[subcommand]), skip_none=False))
                self.results_dir = loop.run_dir.root
                self._print_wandb_locations()
            else:
                loop.evaluate(subcommand)
            return
        if subcommand != "fit":
            self._restore_record(subcommand)
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            self._discard_empty_log_dir()
            raise
        if subcommand in ("test", "predict") and isinstance(self.model, SlideTask):
            folder = output_dir(self.trainer)  # a collective under DDP: every process asks, rank 0 prints
            rank_zero_only(print)(f"{subcommand}: outputs in {folder} (predictions.csv, figures/)")
            write_run_report(folder)

    def _log_console(self) -> None:
        """Lightning's lines and the warnings of this command go to its run's `logs/console.log` as well."""
        if isinstance(self.model, ICMIL):
            console.log_to(self.model.run_dir.root / "logs")
        elif self.trainer.log_dir is not None and self.trainer.logger is not None:
            console.log_to(self.trainer.log_dir)

    def _restore_record(self, subcommand: str) -> None:
        """A checkpoint evaluated on bags encodes and splits them as it was trained, and refuses other features
        (`run_record`); slides it never saw are said to be left out of validate and test."""
        ckpt = self.config[subcommand].get("ckpt_path")
        if not (ckpt and Path(ckpt).is_file()):
            return
        saved = load_checkpoint(ckpt)  # read once, for both checks
        check_architecture(saved, self.model, ckpt)
        if not isinstance(self.datamodule, BagDataModule):
            return
        record = saved.get(RECORD_KEY)
        if record is None:  # a checkpoint from before records
            return
        restore(record, self.datamodule, ckpt)
        unseen = self.datamodule.unseen
        if unseen and subcommand != "predict":
            rank_zero_only(print)(
                f"{subcommand}: {len(unseen)} slide(s) of {self.datamodule.labels_path} are in none of the splits "
                f"{ckpt} was fitted with (e.g. {unseen[0]!r}); predict scores them"
            )

    @rank_zero_only
    def _discard_empty_log_dir(self) -> None:
        """A fit that failed before it logged anything leaves no `lightning_logs/version_<k>` holding only its
        config."""
        folder = self.trainer.log_dir
        if folder and Path(folder).is_dir() and {p.name for p in Path(folder).iterdir()} <= _NOTHING_LOGGED:
            shutil.rmtree(folder, ignore_errors=True)

    def _config(self, subcommand: str) -> dict:
        return yaml.safe_load(self._parser(subcommand).dump(self.config[subcommand], skip_none=False))

    @rank_zero_only
    def _mention_precision(self) -> None:
        """A foundation-model preset run at another precision than its authors': said once, never changed."""
        model = self.model if isinstance(self.model, PatchEmbedder) else getattr(self.model, "embedder", None)
        usual = getattr(model, "recommended_precision", None)
        precision = str(self.trainer.precision)
        if usual is not None and usual != precision:
            print(f"note: {model.preset} is usually run at precision {usual}; this trainer runs {precision}")

    @rank_zero_only
    def _print_wandb_locations(self) -> None:
        for line in wandb_run.locations(self.trainer.loggers):
            print(line)

    def before_fit(self) -> None:
        self._fit_start = time.perf_counter()

    def after_fit(self) -> None:
        """A slide model's best checkpoint is validated and tested into results.json; other models (SSLPretrain)
        write their own outputs."""
        if isinstance(self.model, SlideTask) and not self.trainer.fast_dev_run:
            fit_seconds = time.perf_counter() - self._fit_start
            self.results_dir = record_fit(self.trainer, self.model, self.datamodule, fit_seconds)
            write_run_report(self.results_dir)
            self._print_wandb_locations()


def _absolute_paths(config: Namespace) -> Namespace:
    """`config` with its path settings absolute, so that a saved config works from any working directory."""
    config = config.clone()
    for key in PATH_SETTINGS:
        if config.get(key) is not None:
            config[key] = absolute_path(config.get(key))
    return config


class _SaveConfig(SaveConfigCallback):
    """Lightning's config.yaml of a single model's fit, with its path settings absolute (`_absolute_paths`)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.config = _absolute_paths(self.config)
        super().setup(trainer, pl_module, stage)


def main(args: ArgsType = None, run: bool = True) -> ICMILCLI:
    """Entry point for `python -m icmil_pl`; tests call `main([...])` in-process. `--verbose` anywhere prints
    Lightning's own lines and every warning (`icmil_pl.console`)."""
    argv = sys.argv[1:] if args is None else [str(a) for a in args] if isinstance(args, list) else []
    verbose = console.VERBOSE_FLAG in argv
    argv = [a for a in argv if a != console.VERBOSE_FLAG]
    if args is None:
        sys.argv[1:] = argv
    elif isinstance(args, list):
        args = argv
    console.configure(verbose)
    files = config_files(argv)
    return ICMILCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_class=functools.partial(ConfigParser, argv=argv, files=files),
        parser_kwargs={"parser_mode": "omegaconf+", "prog": "python -m icmil_pl", "epilog": _EPILOG},
        trainer_defaults={
            **console.trainer_defaults(),
            "default_root_dir": LOG_ROOT,
            "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": LOG_ROOT}},
        },
        save_config_callback=_SaveConfig,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
