"""The CLI's W&B runs: offline unless the user is logged in, the resolved config on the run, where the run went.

A `WandbLogger` needs no account. When nobody chose a mode (no `WANDB_MODE`, no `offline`/`mode` on the logger), the
run is online if wandb finds credentials without asking (WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, an `api_key`
setting, the netrc entry `wandb login` writes for the W&B host) and offline otherwise, with one line saying how to
upload it (`wandb sync <dir>`). The mode is passed to `wandb.init` (not through `WANDB_MODE`: wandb reads its
environment once per process, so a variable set after its first use is ignored).

Tasks of one Slurm job array (folds, seeds or sweep trials as array tasks) share a W&B group, `slurm-<array job id>`,
unless the logger names one; the processes of one DDP job, on one node or several, make one run (Lightning logs from
rank 0 only).

The resolved config goes on the run as one nested dict under `CONFIG_KEY`: under `wandb agent` the run's config
already holds the sweep parameters as flat dotted keys (`model.init_args.lr`), and Lightning logs the model's
hyperparameters by argument name (`lr`), so neither is overwritten (and W&B shows `cli.model.init_args.lr`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

__all__ = ["CONFIG_KEY", "default_offline", "group_job_array", "has_credentials", "locations", "start"]

CONFIG_KEY = "cli"  # not a CLI argument (`config` is: a sweep over `--config` files would lock that key)


def _private(logger: WandbLogger) -> tuple[Any, bool, dict]:
    """The private state of Lightning's `WandbLogger` this module relies on, read nowhere else: the run if started
    (`_experiment`; `experiment` would start one), whether `offline=True` was passed (`_offline`), and the kwargs it
    will pass to `wandb.init` (`_wandb_init`, mutable). tests/test_wandb.py fails if an upgrade renames them."""
    return logger._experiment, logger._offline, logger._wandb_init


def has_credentials() -> bool:
    """Whether wandb would find credentials for its host without prompting; local files and variables only. The one
    place that reads wandb's own credential lookup (its internals; tests/test_wandb.py checks they still exist)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import wandb
    from wandb.errors import AuthenticationError

    try:
        from wandb.sdk.lib import wbauth
    except ImportError:  # wandb < 0.22: the same lookup (environment, settings, netrc) behind `wandb.api`
        return bool(wandb.api.api_key)
    from wandb.sdk import wandb_setup

    settings = wandb_setup.singleton().settings  # environment + settings files; starts nothing
    if settings.api_key or settings.identity_token_file or wbauth.session_credentials(host=settings.base_url):
        return True
    try:
        return wbauth.read_netrc_auth(host=settings.base_url) is not None
    except AuthenticationError:  # a malformed key: wandb could not log in with it either
        return False


def _wandb_loggers(loggers: Iterable[Logger]) -> list[WandbLogger]:
    return [logger for logger in loggers if isinstance(logger, WandbLogger)]


def default_offline(loggers: Iterable[Logger]) -> bool:
    """Makes the W&B runs of `loggers` offline where nobody chose a mode and wandb has no credentials; True if so.

    Call before the runs start (`logger.experiment` creates one). `offline=True` on a logger is passed on as well, so
    it holds even where wandb was used earlier in this process (Lightning sets WANDB_MODE, which wandb then ignores).
    """
    pending = []  # the wandb.init kwargs of every logger whose run has not started
    for logger in _wandb_loggers(loggers):
        run, offline, init = _private(logger)
        if run is None:
            pending.append(init)
            if offline and init.get("mode") is None:
                init["mode"] = "offline"
    # LightningCLI passes every wandb.init argument of the logger's **kwargs, unset ones as None
    unset = [init for init in pending if init.get("mode") is None and init.get("settings") is None]
    if not unset or os.environ.get("WANDB_MODE") or has_credentials():
        return False
    for init in unset:
        init["mode"] = "offline"
    return True


def group_job_array(loggers: Iterable[Logger]) -> str | None:
    """Puts the W&B runs of `loggers` in the group of their Slurm job array (`SLURM_ARRAY_JOB_ID`) where no group is
    set; returns the group given, or None outside an array. Call before the runs start."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if not job:
        return None
    group = f"slurm-{job}"
    for logger in _wandb_loggers(loggers):
        run, _, init = _private(logger)
        if run is None and not init.get("group"):
            init["group"] = group
    return group


@rank_zero_only
def start(loggers: Iterable[Logger], config: dict, announce_offline: bool = False) -> None:
    """Starts the W&B runs of `loggers` with `config` under `CONFIG_KEY`; `announce_offline`: print the one line
    telling a user without credentials that the run is offline and how to upload it."""
    for logger in _wandb_loggers(loggers):
        run = logger.experiment
        run.config.update({CONFIG_KEY: config}, allow_val_change=True)
        if announce_offline and getattr(run, "offline", False):
            where = run.settings.sync_dir
            print(
                f"W&B: offline run in {where} (no API key found: `wandb login` for online runs, or set WANDB_MODE); "
                f"upload it with: wandb sync {where}"
            )


def locations(loggers: Iterable[Logger]) -> list[str]:
    """One line per started W&B run of `loggers`: its URL and folder, or for an offline run how to upload it."""
    lines = []
    for logger in _wandb_loggers(loggers):
        run = _private(logger)[0]  # a run not started is not created just to print it
        if run is None or getattr(run, "disabled", False) or not hasattr(run, "settings"):
            continue
        where = run.settings.sync_dir
        lines.append(
            f"W&B run (offline): {where}  (upload: wandb sync {where})"
            if run.offline
            else f"W&B run: {run.url}  (local files: {where})"
        )
    return lines
