"""The command line: one LightningCLI for fit/validate/test/predict, configured by YAML under `experiments/`.

    python -m icmil_pl fit -c experiments/abmil_features.yaml --model.init_args.lr=1e-4
    python -m icmil_pl test -c runs/<run>/config.yaml --ckpt_path runs/<run>/checkpoints/best-....ckpt

`omegaconf+` mode resolves `${...}` after command-line overrides are applied, so a relative interpolation such as
`${..lr}` follows `--model.init_args.lr=...`. Classes are named by their short names in YAML (`class_path: ABMIL`).

With `--trainer.logger=WandbLogger` the run is offline unless wandb has credentials (`wandb login`) or WANDB_MODE says
otherwise, and carries the resolved config under `cli` (see `icmil_pl.wandb_run`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import yaml
from pytorch_lightning import LightningDataModule, LightningModule
from pytorch_lightning.cli import ArgsType, LightningCLI
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

# Imported so that jsonargparse knows every class by its short name.
import data_modules.bags  # noqa: F401
import data_modules.digits  # noqa: F401
import data_modules.features  # noqa: F401
import data_modules.patches  # noqa: F401
import data_modules.synthetic_cohort  # noqa: F401
from icmil_pl import aggregators, bag_classifier, coupling, embedder, end_to_end, writers  # noqa: F401
from icmil_pl.loop import ICMIL, ICMILLoop

from . import wandb_run
from .results import stage_metrics, write_results

__all__ = ["ICMILCLI", "main"]


class ICMILCLI(LightningCLI):
    """LightningCLI that, after `fit`, validates and tests the best checkpoint and writes `results.json`.

    `fit` with an `ICMIL` model runs the whole ICMIL procedure (`ICMILLoop`) with fresh Trainers built from the
    config's trainer settings, instead of a single `trainer.fit`; `validate`, `test` and `predict` with it use the
    final embedder and bag classifier of the finished run in `run_dir`.

    After `fit` every logger gets the final validation and test metrics under the names ICMIL logs them by,
    `final/{val,test}/<metric>`, so a sweep optimises `final/val/auroc` whatever the model.
    """

    def after_instantiate_classes(self) -> None:
        self._wandb_offline_by_default = wandb_run.default_offline(self.trainer.loggers)

    def _run_subcommand(self, subcommand: str) -> None:
        if any(isinstance(logger, WandbLogger) for logger in self.trainer.loggers):
            config = yaml.safe_load(self._parser(subcommand).dump(self.config[subcommand], skip_none=False))
            wandb_run.start(self.trainer.loggers, config, announce_offline=self._wandb_offline_by_default)
        if isinstance(self.model, ICMIL):
            trainer = self.config[subcommand]["trainer"].as_dict()
            seed = self.config[subcommand].get("seed_everything")
            loop = ICMILLoop(self.model, self.datamodule, trainer, self.trainer.logger, seed=int(seed or 0))
            if subcommand == "fit":
                self._save_run_config(loop.run_dir)
                loop.run()
                self._print_wandb_locations()
            else:
                loop.evaluate(subcommand)
            return
        super()._run_subcommand(subcommand)

    @rank_zero_only
    def _save_run_config(self, run_dir: Path) -> None:
        """`<run_dir>/config.yaml`, the resolved config (as `SaveConfigCallback` writes it for a single `fit`), so
        `test -c <run_dir>/config.yaml` reproduces the run's setup. A started run is only continued with the settings
        it was started with: resuming with others would mix two experiments in one results.json."""
        parser, config = self._parser("fit"), self.config["fit"]
        saved = run_dir / "config.yaml"
        if saved.is_file() and (run_dir / "state.json").is_file():
            changed = changed_settings(yaml.safe_load(saved.read_text()), yaml.safe_load(parser.dump(config)))
            if changed:
                raise ValueError(f"model.init_args.run_dir: {run_dir} holds a run started with other settings "
                                 f"({', '.join(changed)}: not as in {saved}); give a new run_dir, or delete this one "
                                 "to start over")  # fmt: skip
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "config.yaml.tmp"
        parser.save(config, tmp, skip_none=False, overwrite=True)
        os.replace(tmp, saved)

    @rank_zero_only
    def _print_wandb_locations(self) -> None:
        for line in wandb_run.locations(self.trainer.loggers):
            print(line)

    def before_fit(self) -> None:
        self._fit_start = time.perf_counter()

    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.fast_dev_run or getattr(self.model, "skip_results", False):
            return
        fit_seconds = time.perf_counter() - self._fit_start
        callback = trainer.checkpoint_callback
        best = (callback.best_model_path or None) if callback is not None else None
        start = time.perf_counter()
        val = trainer.validate(self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False)
        test = trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False)
        run_dir = trainer.log_dir or trainer.default_root_dir  # a collective: every process asks
        if trainer.is_global_zero:
            entry = {
                "iteration": 0,
                "checkpoint": best,
                "val": stage_metrics(val, "val"),
                "test": stage_metrics(test, "test"),
                "seconds": {"fit": round(fit_seconds, 2), "test": round(time.perf_counter() - start, 2)},
            }
            path = write_results(run_dir, [entry], model=type(self.model).__name__)
            final = {f"final/{s}/{name}": value for s in ("val", "test") for name, value in entry[s].items()}
            for logger in trainer.loggers:
                logger.log_metrics(final, step=trainer.global_step)
                logger.save()
            print(f"results: {path}")
            self._print_wandb_locations()


# What may change when a run is continued: where things are and how fast they go, and the number of iterations.
RESUMABLE_SETTINGS = {
    "model.init_args.run_dir", "model.init_args.iterations", "model.init_args.coupling.init_args.num_workers",
    "model.init_args.coupling.init_args.read_threads", "data.init_args.slides", "data.init_args.grid_cache",
    "data.init_args.batch_size", "data.init_args.num_workers",
}  # fmt: skip


def changed_settings(before: dict, after: dict) -> list[str]:
    """Dotted keys of the model, data and seed settings that differ, apart from `RESUMABLE_SETTINGS`."""

    def flat(value, prefix: str) -> dict:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}.{key}").items()}
        return {prefix: value}

    a, b = ({k[1:]: v for k, v in flat(config, "").items()} for config in (before, after))
    keys = {k for k in a.keys() | b.keys() if k.split(".")[0] in ("model", "data", "seed_everything")}
    return sorted(k for k in keys - RESUMABLE_SETTINGS if a.get(k) != b.get(k))


def main(args: ArgsType = None, run: bool = True) -> ICMILCLI:
    """Entry point for `python -m icmil_pl`; tests call `main([...])` in-process."""
    return ICMILCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf+", "prog": "python -m icmil_pl"},
        trainer_defaults={
            "default_root_dir": "runs",
            "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
        },
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
