"""`results.json` and the names final metrics are logged by: the one source for the CLI, the ICMIL loop and sweeps.

`results.json` (DESIGN.md section 3): `{"iterations": [{"iteration", "checkpoint", "val", "test", "seconds"}, ...],
"model": ..., "skipped": {slide id: error}}` (`checkpoint` relative to the folder of results.json; `skipped` only
where on_slide_error: skip left slides out); a single
model is iteration 0. Every fit logs its last iteration's metrics as `final/<stage>/<metric>`
to every logger; a sweep optimises one of those names and reads it back from results.json.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from data_modules.io import atomic_write

from .callbacks.outputs import output_dir, report_skipped
from .callbacks.prediction_writer import PREDICTIONS_FILE
from .outputs.plots import iteration_figure, save_png
from .tasks import METRIC_NAMES

__all__ = [
    "FINAL_METRICS",
    "RESULTS_FILE",
    "STAGES",
    "final_metrics",
    "final_name",
    "log_final",
    "log_run_results",
    "print_table",
    "read_results",
    "record_fit",
    "stage_metrics",
    "write_results",
    "write_run_report",
    "write_run_results",
]

RESULTS_FILE = "results.json"
STAGES = ("val", "test")


def final_name(stage: str, metric: str) -> str:
    return f"final/{stage}/{metric}"


FINAL_METRICS: dict[str, tuple[str, str]] = {final_name(s, m): (s, m) for s in STAGES for m in METRIC_NAMES}


def stage_metrics(logged: list[dict] | dict, stage: str) -> dict[str, float]:
    """The task's metrics (`{auroc, accuracy, f1, balanced_accuracy}` for classification; per-label ones too) from
    what `trainer.validate/test` returned for `stage`; the loss is not a result. None where the stage had no slides
    (`val_fraction: 0`: the last epoch is the model)."""
    values = (logged[0] if logged else {}) if isinstance(logged, list) else logged
    prefix = f"{stage}/"
    return {
        k.removeprefix(prefix): float(v) for k, v in values.items() if k.startswith(prefix) and k != f"{prefix}loss"
    }


def final_metrics(iteration: dict) -> dict[str, float]:
    """`final/<stage>/<metric>` of one `results.json` iteration entry."""
    return {final_name(s, m): v for s in STAGES for m, v in iteration[s].items()}


def log_final(loggers: Iterable[Logger], iteration: dict, step: int) -> None:
    """Log an iteration entry's metrics under their final names to every logger (the sweep metric)."""
    for logger in loggers:
        logger.log_metrics(final_metrics(iteration), step=step)
        logger.save()


def write_results(run_dir: str | os.PathLike, iterations: list[dict], **extra) -> Path:
    """`{"iterations": [{"iteration", "val", "test", "seconds"}, ...], ...}`; a single model is iteration 0."""
    return atomic_write(Path(run_dir) / RESULTS_FILE, json.dumps({"iterations": iterations, **extra}, indent=1))


def read_results(run_dir: str | os.PathLike) -> dict:
    return json.loads((Path(run_dir) / RESULTS_FILE).read_text())


def record_fit(
    trainer: pl.Trainer, model: pl.LightningModule, data: pl.LightningDataModule, fit_seconds: float
) -> Path:
    """After a single model's `fit`: validate and test its best checkpoint (by the task's validation metric; the last
    weights when nothing selected one), write them as iteration 0 of `results.json` in the trainer's output folder and
    log them to every logger under their final names. Returns that folder."""
    callback = trainer.checkpoint_callback
    best = (callback.best_model_path or None) if callback is not None else None
    start = time.perf_counter()
    val = trainer.validate(model, datamodule=data, ckpt_path=best, verbose=False)
    test = trainer.test(model, datamodule=data, ckpt_path=best, verbose=False)
    folder = output_dir(trainer)  # a collective: every process asks
    skipped = dict(getattr(data, "skipped", {}))
    if trainer.is_global_zero:
        entry = {
            "iteration": 0,
            "checkpoint": best and os.path.relpath(best, folder),  # relative: the folder moves whole
            "val": stage_metrics(val, "val"),
            "test": stage_metrics(test, "test"),
            "seconds": {"fit": round(fit_seconds, 2), "test": round(time.perf_counter() - start, 2)},
        }
        path = write_results(folder, [entry], model=type(model).__name__, **({"skipped": skipped} if skipped else {}))
        log_final(trainer.loggers, entry, step=trainer.global_step)
        report_skipped(skipped)
        print(f"results: {path}")
    return folder


@rank_zero_only
def print_table(results: dict, metrics: tuple[str, ...]) -> None:
    """The end of an ICMIL fit: validation and test of the task's first metric, the test values of the others, and
    each phase's seconds, by iteration."""
    head = [f"val {metrics[0]}", *(f"test {m}" for m in metrics)]
    widths = [max(9, len(h)) for h in head]
    cells = " ".join(f"{h:>{w}s}" for h, w in zip(head, widths, strict=True))
    print(f"\n iter {cells}  {'embed s':>7s} {'bag s':>6s} {'couple s':>8s}")
    for r in results["iterations"]:
        s = r["seconds"]
        values = [r["val"].get(metrics[0], float("nan")), *(r["test"].get(m, float("nan")) for m in metrics)]
        cells = " ".join(f"{v:>{w}.4f}" for v, w in zip(values, widths, strict=True))
        seconds = f"{s.get('embed', 0):7.1f} {s.get('bag', 0):6.1f} {s.get('couple', 0):8.1f}"
        print(f"{r['iteration']:5d} {cells}  {seconds}")


def write_run_results(
    root: str | os.PathLike, iterations: list[dict], coupling: str, skipped: dict[str, str], figure: Path, metric: str
) -> None:
    """An ICMIL run's results.json, its `figure` of `metric` by iteration, and the slides it left out, said once."""
    write_results(root, iterations, model="ICMIL", coupling=coupling, **({"skipped": skipped} if skipped else {}))
    save_png(iteration_figure(iterations, metric), figure)
    report_skipped(skipped)


def log_run_results(logger: Logger | None, iterations: list[dict], figure: Path, step: int) -> None:
    """The by-iteration figure to W&B, and the final iteration's metrics under their stable names (the sweep
    metric) to the run's logger."""
    if isinstance(logger, WandbLogger):
        logger.log_image(key=f"final/{figure.stem}", images=[str(figure)])
    if logger is not None:
        log_final([logger], iterations[-1], step=step)


@rank_zero_only
def write_run_report(folder: str | os.PathLike) -> Path | None:
    """`folder`'s report.html where it holds predictions or results (said in one line), else nothing: the CLI and
    the ICMIL loop write reports through here, so the training core never imports the HTML view itself."""
    folder = Path(folder)
    if not ((folder / PREDICTIONS_FILE).is_file() or (folder / RESULTS_FILE).is_file()):
        return None
    from .views.report import write_report  # the view, loaded when a report is written: it imports this module

    path = write_report(folder)
    print(f"report: {path}")
    return path
