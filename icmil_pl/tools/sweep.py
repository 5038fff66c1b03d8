"""Offline W&B sweeps: `python -m icmil_pl sweep experiments/sweeps/<x>.yaml --count N [--out DIR] [--seed S]
[--key=value ...]`.

`wandb sweep` needs a server and hospital clusters are often air-gapped, so this runs the same sweep file locally.
W&B's own open-source engine (`sweeps`) proposes each trial from the trials so far (random, grid, bayes); the
`command` is expanded as `wandb agent` expands it and run as a fresh in-process `fit`, with every output of trial k
under `<out>/trial-<k>/`. The metric is read back from the trial's results.json: `final/<stage>/<name>` is the last
iteration's `<stage>` `<name>` (`icmil_pl.results.FINAL_METRICS`), the value every fit also logs under that name.

    <out>/state.json   the sweep, seed, overrides and every trial (parameters, status, metric, error), rewritten
    <out>/trials.csv   trial, status, metric, every parameter and error, best first

Trailing `--key=value` overrides go to every trial after its parameters (e.g. `--trainer.max_epochs=2` for a quick
try); they are part of the sweep's identity, like the sweep file and the seed. Re-running the same command
continues: finished and failed trials are kept, an unfinished (killed) one is run again with its parameters, and the
sweep stops at `--count` trials in all, or when a grid is exhausted.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import re
import sys
import warnings
from collections.abc import Sequence
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import yaml

from ..cli import main as cli_main
from ..loop import ICMIL
from ..results import FINAL_METRICS, read_results
from ..tasks import METRIC_NAMES
from .sweep_table import Goal, Trial, format_value, print_table, ranked, save_trials, short_names

with warnings.catch_warnings():  # sweeps 0.2 declares its models the pydantic-1 way, which pydantic 2 warns about
    warnings.simplefilter("ignore")
    import sweeps

__all__ = [
    "Trial",
    "check_overrides",
    "check_parameters",
    "expand_command",
    "load_sweep",
    "main",
    "resolve_config",
    "run_sweep",
    "run_trial",
    "trial_argv",
]

Method = Literal["random", "grid", "bayes"]

_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")  # what follows `--` in a jsonargparse override
_ENVVAR = re.compile(r"\$\{envvar:([A-Z0-9_]*)\}")  # the agent's SWEEP_COMMAND_ENV_VAR_REGEX
_MODULE = ["-m", "icmil_pl", "fit"]


def load_sweep(path: str | os.PathLike) -> dict:
    """The sweep file, checked up front: a typo should fail once with its field named, not in every trial."""

    def bad(field: str, message: str) -> ValueError:
        return ValueError(f"{path}: {field}: {message}")

    if not Path(path).is_file():
        raise ValueError(f"{path}: no such sweep file")
    sweep = yaml.safe_load(Path(path).read_text())
    if not isinstance(sweep, dict):
        raise ValueError(f"{path}: expected a W&B sweep mapping (method, metric, parameters, command)")
    if sweep.get("method") not in get_args(Method):
        raise bad("method", f"expected one of {', '.join(get_args(Method))}, got {sweep.get('method')!r}")
    metric = sweep.get("metric")
    if not isinstance(metric, dict):
        raise bad("metric", f"expected {{name: final/val/auroc, goal: maximize}}, got {metric!r}")
    if metric.get("name") not in FINAL_METRICS:
        raise bad(
            "metric.name",
            f"expected final/<val|test>/<{'|'.join(METRIC_NAMES)}> (read from results.json), "
            f"got {metric.get('name')!r}",
        )
    if metric.get("goal") not in get_args(Goal):
        raise bad("metric.goal", f"expected one of {', '.join(get_args(Goal))}, got {metric.get('goal')!r}")
    parameters = sweep.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise bad("parameters", "expected a mapping of CLI keys (a.b.c for --a.b.c) to W&B parameter specs")
    for key, spec in parameters.items():
        if not _KEY.fullmatch(str(key)) or not isinstance(spec, dict) or "parameters" in spec:
            raise bad(
                f"parameters.{key}",
                "expected a flat dotted CLI key (a.b.c for --a.b.c) mapped to a W&B "
                "parameter spec (value, values, min/max, distribution)",
            )
    if violations := sweeps.schema_violations_from_proposed_config(sweep):
        raise ValueError(f"{path}: {'; '.join(violations)}")
    command = sweep.get("command")
    if not isinstance(command, list) or "${args}" not in command or _module_at(command) is None:
        raise bad(
            "command",
            f"expected a list like [${{env}}, python, -m, icmil_pl, fit, -c, <config>, ${{args}}], got {command!r}",
        )
    return sweep


def expand_command(command: list, params: dict[str, Any], program: str | None = None) -> list[str]:
    """`command` as `wandb agent` expands it (wandb_agent.py, sdk/launch/sweeps/utils.py): `${envvar:NAME}` within a
    token, whole-token macros to their lists (values as `str(value)`), an unknown macro to nothing."""
    flags = [f"{key}={value}" for key, value in params.items()]
    macros = {
        "env": ["/usr/bin/env"],
        "interpreter": ["python"],
        "program": [str(program)],
        "args": [f"--{flag}" for flag in flags],
        "args_no_hyphens": flags,
        "args_no_equals": [arg for key, value in params.items() for arg in (f"--{key}", str(value))],
        "args_no_boolean_flags": [
            f"--{key}" if value is True else f"--{key}={value}" for key, value in params.items() if value is not False
        ],
        "args_json": [json.dumps(params)],
        "args_append_hydra": [f"+{flag}" for flag in flags],
        "args_override_hydra": [f"++{flag}" for flag in flags],
    }
    argv = []
    for token in map(str, command):
        token = _ENVVAR.sub(lambda match: os.environ.get(match[1], match[1]), token)
        argv += macros.get(token[2:-1], []) if token.startswith("${") and token.endswith("}") else [token]
    return argv


def trial_argv(sweep: dict, params: dict[str, Any], overrides: Sequence[str] = ()) -> list[str]:
    """The `python -m icmil_pl` arguments of one trial (from `fit` on), as the agent would run them, then
    `overrides`."""
    command = expand_command(sweep["command"], params, sweep.get("program"))
    return [*command[_module_at(command) + 2 :], *overrides]


def check_overrides(overrides: Sequence[str], sweep: dict) -> list[str]:
    """`overrides` as given, if each is `--key=value` and leaves the swept parameters to the sweep."""
    for override in overrides:
        key, equals, _ = override.removeprefix("--").partition("=")
        if not override.startswith("--") or not equals or not _KEY.fullmatch(key):
            raise ValueError(f"{override!r}: an override for every trial is written --key=value")
        if key in sweep["parameters"]:
            raise ValueError(f"{override}: {key} is a parameter of the sweep, which sets it per trial")
    return list(overrides)


def check_parameters(sweep: dict, overrides: Sequence[str], path: str | os.PathLike) -> None:
    """Every swept key with each of its values (a range: its ends) resolved as a trial's command line would be, once,
    before the first trial: a misspelt key or a value of the wrong type used to fail every trial, then exit 0."""
    candidates = {key: _candidates(spec) for key, spec in sweep["parameters"].items()}
    for i in range(max(map(len, candidates.values()), default=0)):
        params = {key: values[min(i, len(values) - 1)] for key, values in candidates.items() if values}
        try:
            resolve_config(trial_argv(sweep, params, overrides))
        except ValueError as error:
            tried = ", ".join(f"{key}={format_value(value)}" for key, value in params.items())
            raise ValueError(f"{path}: parameters ({tried}): {error}") from None


def _candidates(spec: dict) -> list:
    """The values of a W&B parameter spec worth trying before a sweep: all listed values, or a range's two ends."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    if "min" in spec and "max" in spec:
        log = spec.get("distribution") in ("log_uniform", "q_log_uniform")  # ends as natural logs
        return [math.exp(spec["min"]), math.exp(spec["max"])] if log else [spec["min"], spec["max"]]
    return [spec["mu"]] if "mu" in spec else []


def resolve_config(argv: list[str]) -> dict:
    """The config LightningCLI builds from `argv` (every -c file and override applied), parsed but not run; a bad
    key or value raises ValueError with jsonargparse's message on one line instead of exiting."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            cli_main([*argv, "--print_config"])
    except SystemExit as exit_:
        if exit_.code:
            said = err.getvalue().partition("error:")[2].strip().splitlines()  # the CLI's one line, not its hint
            raise ValueError(said[0].strip() if said else f"exit {exit_.code}") from None
    return yaml.safe_load(out.getvalue())


def run_trial(argv: list[str], root: Path) -> dict:
    """Fit one trial in-process with its outputs under `root`; returns its results.json.

    Where a run writes depends on its model and logger, wherever the config set them, so the resolved config decides
    what to point at `root`: ICMIL's run_dir (a shared one would resume another trial's state.json), the logger's
    save_dir and the trainer's default_root_dir.
    """
    config = resolve_config(argv)
    outputs = [f"--trainer.default_root_dir={root}"]
    logger = config["trainer"].get("logger")
    if isinstance(logger, dict) and "save_dir" in (logger.get("init_args") or {}):
        outputs.append(f"--trainer.logger.init_args.save_dir={root}")
    icmil = config["model"]["class_path"] == f"{ICMIL.__module__}.{ICMIL.__name__}"
    if icmil:
        outputs.append(f"--model.init_args.run_dir={root}")
    results = cli_main([*argv, *outputs]).results_dir
    if results is None:
        raise ValueError("the trial's fit wrote no results.json (a fast_dev_run writes none)")
    return read_results(results)


def run_sweep(
    path: str | os.PathLike,
    count: int,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    overrides: Sequence[str] = (),
) -> list[Trial]:
    """Run (or continue) the sweep in `path` up to `count` trials, each with `overrides` (`--key=value`) after its
    parameters; returns the trials, best first."""
    sweep = load_sweep(path)
    overrides = check_overrides(overrides, sweep)
    check_parameters(sweep, overrides, path)
    folder = Path(out or Path("runs/sweeps") / Path(path).stem)
    state_path = folder / "state.json"
    identity = {"sweep": json.loads(json.dumps(sweep)), "seed": seed, "overrides": overrides}
    state = json.loads(state_path.read_text()) if state_path.is_file() else {**identity, "trials": []}
    state.setdefault("overrides", [])  # a sweep started before overrides existed had none
    if {key: state[key] for key in identity} != identity:
        raise ValueError(f"{folder}: holds another sweep, seed or overrides (state.json); pass another --out")
    trials: list[Trial] = state["trials"]
    names = short_names(list(sweep["parameters"]))
    while sum(t["status"] != "running" for t in trials) < count:
        trial = next((t for t in trials if t["status"] == "running"), None)  # killed last time: run it again
        if trial is None:
            params = _propose(sweep, trials, seed)
            if params is None:
                print(f"the grid is exhausted after {len(trials)} trials")
                break
            trial = Trial(trial=len(trials) + 1, status="running", params=params, metric=None, error="")
            trials.append(trial)
            save_trials(folder, state, sweep)
        print(
            f"trial {trial['trial']}/{count}: "
            + " ".join(f"{name}={format_value(trial['params'].get(key))}" for key, name in names.items())
        )
        try:
            results = run_trial(trial_argv(sweep, trial["params"], overrides), folder / f"trial-{trial['trial']}")
            stage, metric = FINAL_METRICS[sweep["metric"]["name"]]
            trial.update(status="finished", metric=float(results["iterations"][-1][stage][metric]))
        except (Exception, SystemExit) as error:  # a failed trial is a result: record it, the sweep goes on
            trial.update(status="failed", error=f"{type(error).__name__}: {' '.join(str(error).split())}")
        finally:  # each trial its own W&B run, as under `wandb agent` (a WandbLogger would reuse an open one)
            if (wandb := sys.modules.get("wandb")) is not None and wandb.run is not None:
                wandb.finish(exit_code=0 if trial["status"] == "finished" else 1)
        save_trials(folder, state, sweep)
    best_first = ranked(trials, sweep["metric"]["goal"])
    print_table(best_first, sweep)
    print(f"trials: {folder / 'trials.csv'}")
    return best_first


def _module_at(command: list) -> int | None:
    """Index of `-m icmil_pl fit` in `command`: what comes before it is the interpreter, not the CLI's."""
    tokens = [str(token) for token in command]
    return next((i for i in range(len(tokens) - 2) if tokens[i : i + 3] == _MODULE), None)


def _propose(sweep: dict, trials: list[Trial], seed: int) -> dict[str, Any] | None:
    """The engine's next parameters given the trials so far (bayes fits them, grid skips their points); None when a
    grid is exhausted. The engine samples from the global `random` and `numpy` generators, which every fit reseeds
    (seed_everything): seeded by (seed, trial) here, trials differ and a resumed sweep proposes what an uninterrupted
    one would."""
    runs = [
        sweeps.SweepRun(
            name=f"trial-{t['trial']}",
            state=t["status"],
            config={key: {"value": value} for key, value in t["params"].items()},
            summary_metrics={} if t["metric"] is None else {sweep["metric"]["name"]: t["metric"]},
        )
        for t in trials
    ]
    state = np.random.SeedSequence([seed, len(trials)]).generate_state(1)[0]
    random.seed(int(state))
    np.random.seed(state)
    proposal = sweeps.next_run(sweep, runs)
    if proposal is None:
        return None
    return {
        key: value["value"].item() if isinstance(value["value"], np.generic) else value["value"]
        for key, value in proposal.config.items()
    }


def main(argv: list[str] | None = None) -> None:
    """`python -m icmil_pl sweep ...` (see the module docstring); a bad sweep file exits with one line."""
    parser = argparse.ArgumentParser(
        prog="python -m icmil_pl sweep",
        description="Run a W&B sweep file without a W&B server.",
        epilog="Further --key=value arguments go to every trial, e.g. --trainer.max_epochs=2.",
    )
    parser.add_argument("sweep", help="W&B sweep file, e.g. experiments/sweeps/demo.yaml")
    parser.add_argument("--count", type=int, required=True, help="trials in all, those of earlier runs included")
    parser.add_argument("--out", help="output folder (default: runs/sweeps/<sweep file name>)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the proposals (default: 0)")
    args, overrides = parser.parse_known_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")  # no server: a WandbLogger in the command logs to disk
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # the trials' argv, not sys.argv
    try:
        ranked = run_sweep(args.sweep, args.count, args.out, args.seed, overrides)
    except ValueError as error:  # a bad sweep file or --out: one line, no traceback
        raise SystemExit(f"error: {error}") from None
    if ranked and all(t["status"] == "failed" for t in ranked):  # nothing learnt: a script must not read success
        raise SystemExit(f"error: all {len(ranked)} trials failed; their errors are in trials.csv")
