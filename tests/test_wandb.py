"""W&B from the CLI: offline by default without credentials, online when logged in, WANDB_MODE always wins; the
resolved config sits beside a sweep's flat keys; every model logs `final/{val,test}/<metric>` after fit.

wandb reads its environment once per process (until `wandb.teardown()`), and the test machine's credentials must
never matter: every test runs with HOME, netrc and WANDB_* isolated, and tears wandb down before and after.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import wandb
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from icmil_pl.cli import main
from icmil_pl.tasks import Classification
from icmil_pl.tools import wandb_run

CONF = Path(__file__).parent / "conf"
LR = 3.0e-3  # the sweep's proposal, as `wandb agent` passes it: flat key in the run config and a CLI override
SWEEP_KEY = "model.init_args.lr"
KEY = "0123456789abcdef0123456789abcdef01234567"  # the format of a W&B API key (40 characters)
_ISOLATE = (
    "WANDB_API_KEY",
    "WANDB_IDENTITY_TOKEN_FILE",
    "WANDB_MODE",
    "WANDB_BASE_URL",
    "WANDB_SWEEP_PARAM_PATH",
    "WANDB_SWEEP_ID",
    "WANDB_RUN_ID",
    "WANDB_PROJECT",
    "WANDB_ENTITY",
    "NETRC",
)

CLASSIFICATION = Classification.metric_names


@contextlib.contextmanager
def isolated_wandb(root: Path, mp: pytest.MonkeyPatch, **env: str):
    """No credentials and no mode unless given in `env`; HOME and W&B's folders under `root`."""
    for name in _ISOLATE:
        mp.delenv(name, raising=False)
    (root / "home").mkdir(parents=True, exist_ok=True)
    mp.setenv("HOME", str(root / "home"))
    mp.setenv("WANDB_CONFIG_DIR", str(root / "home" / "wandb-config"))
    mp.setenv("WANDB_DIR", str(root))
    for name, value in env.items():
        mp.setenv(name, value)
    wandb.teardown()  # settings are read once per process: start from this environment
    try:
        yield
    finally:
        wandb.finish()
        wandb.teardown()


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    with isolated_wandb(tmp_path, monkeypatch):
        yield tmp_path


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    """12 slides of 8-d features (CLAM-style .h5), positives shifted: a bag classifier learns them in a few epochs."""
    root = tmp_path_factory.mktemp("features")
    rng = np.random.default_rng(0)
    rows = ["slide_id,label"]
    for k in range(12):
        label = k % 2
        with h5py.File(root / f"s{k}.h5", "w") as fh:
            fh["features"] = (rng.normal(size=(6, 8)) + label).astype(np.float32)
        rows.append(f"s{k},{'tumor' if label else 'normal'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def _fit_args(features: Path, out: Path) -> list[str]:
    return [
        "fit",
        "-c",
        str(CONF / "abmil.yaml"),
        "--trainer.max_epochs=2",
        "--trainer.enable_model_summary=false",
        "--model.init_args.aggregator.init_args.in_dim=8",
        f"--{SWEEP_KEY}={LR}",
        f"--data.init_args.labels={features / 'labels.csv'}",
        f"--data.init_args.features={features}",
        f"--trainer.default_root_dir={out}",
        "--trainer.logger=WandbLogger",
        f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.logger.init_args.project=icmil-tests",
    ]


@pytest.fixture(scope="module")
def sweep_run(features, tmp_path_factory) -> dict:
    """A BagClassifier fit as `wandb agent` runs a trial (the sweep's flat keys in the run config from the start), with
    no credentials and no WANDB_MODE; what the run held before it finished."""
    root = tmp_path_factory.mktemp("sweep_run")
    params = root / "sweep-params.yaml"
    params.write_text(f"{SWEEP_KEY}:\n  value: {LR}\n")
    out, stdout = root / "out", io.StringIO()
    with pytest.MonkeyPatch.context() as mp, isolated_wandb(root, mp, WANDB_SWEEP_PARAM_PATH=str(params)):
        with contextlib.redirect_stdout(stdout):
            cli = main(_fit_args(features, out))
        run = wandb.run
        summary = {k: run.summary[k] for k in run.summary.keys()}  # noqa: SIM118 (a Summary has no __iter__)
        return {
            "out": out,
            "stdout": stdout.getvalue(),
            "offline": run.offline,
            "sync_dir": run.settings.sync_dir,
            "config": dict(run.config),
            "summary": summary,
            "results": json.loads((Path(cli.trainer.log_dir) / "results.json").read_text()),
        }


def test_offline_by_default_without_credentials(sweep_run):
    out, sync_dir = sweep_run["out"], Path(sweep_run["sync_dir"])
    assert sweep_run["offline"]
    assert sync_dir.parent == out / "wandb" and sync_dir.name.startswith("offline-run-")  # under the logger's save_dir
    assert list(sync_dir.glob("*.wandb"))
    lines = sweep_run["stdout"].splitlines()
    said = [line for line in lines if "offline" in line and f"wandb sync {sync_dir}" in line]
    assert len(said) == 2 and "no API key" in said[0]  # why, when it starts; where, when fit ends
    assert said[1].startswith("W&B run (offline): ") and lines.index(said[1]) > lines.index(said[0])


def test_resolved_config_and_sweep_keys_coexist(sweep_run):
    config = sweep_run["config"]
    assert config[SWEEP_KEY] == LR  # the sweep's flat key, untouched
    resolved = config[wandb_run.CONFIG_KEY]
    assert resolved["model"]["init_args"]["lr"] == LR and resolved["model"]["class_path"].endswith("BagClassifier")
    assert resolved["trainer"]["max_epochs"] == 2 and resolved["seed_everything"] == 0
    assert config["lr"] == LR  # Lightning's hyperparameters, by argument name
    assert not {"model", "trainer", "data"} & set(config)  # no top-level dict that W&B would show as model.init_args.lr


def test_final_metrics_are_logged_for_a_bag_classifier(sweep_run):
    final = sweep_run["results"]["iterations"][-1]
    for stage in ("val", "test"):
        for name in Classification.metric_names:
            assert sweep_run["summary"][f"final/{stage}/{name}"] == pytest.approx(final[stage][name])


def test_final_metrics_reach_every_logger(features, no_credentials):
    out = no_credentials / "out"
    main([*_fit_args(features, out)[:-3], "--trainer.logger=CSVLogger", f"--trainer.logger.init_args.save_dir={out}"])
    metrics = (out / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    assert {f"final/{s}/{m}" for s in ("val", "test") for m in Classification.metric_names} <= set(
        metrics[0].split(",")
    )
    assert wandb.run is None  # no W&B logger: no run


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_an_explicit_wandb_mode_is_respected(mode, features, tmp_path, monkeypatch, capsys):
    with isolated_wandb(tmp_path, monkeypatch, WANDB_MODE=mode):
        main(_fit_args(features, tmp_path / "out"))
        assert wandb.run.offline if mode == "offline" else wandb.run.disabled
        assert "no API key" not in capsys.readouterr().out  # the user chose: nothing to explain
    assert bool(list((tmp_path / "out").glob("wandb/offline-run-*/*.wandb"))) == (mode == "offline")


def _logger(**kwargs) -> WandbLogger:
    return WandbLogger(save_dir=os.getcwd(), **kwargs)


def test_online_when_logged_in_or_asked(no_credentials, monkeypatch):
    """Which runs `default_offline` leaves to wandb (online unless wandb's own settings say otherwise); no run is
    started, so no network either way."""
    assert not wandb_run.has_credentials()
    logger = _logger()
    assert wandb_run.default_offline([CSVLogger(str(no_credentials)), logger])
    assert logger._wandb_init["mode"] == "offline"
    assert not wandb_run.default_offline([CSVLogger(str(no_credentials))])
    chose = _logger(mode="online")  # the logger's own wandb.init arguments, as --trainer.logger.init_args.mode=online
    assert not wandb_run.default_offline([chose]) and chose._wandb_init["mode"] == "online"
    monkeypatch.setenv("WANDB_MODE", "online")
    logger = _logger()
    assert not wandb_run.default_offline([logger]) and logger._wandb_init.get("mode") is None
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    assert wandb_run.has_credentials() and not wandb_run.default_offline([_logger()])


@pytest.mark.parametrize("host", ["api.wandb.ai", "api.forge.coreweave.com"])
def test_a_netrc_entry_counts_as_logged_in(host, no_credentials):
    """What `wandb login` leaves behind: a netrc entry for the W&B host in the (isolated) home folder."""
    netrc = Path.home() / ".netrc"
    netrc.write_text(f"machine {host}\n  login user\n  password {KEY}\n")
    netrc.chmod(0o600)
    assert wandb_run.has_credentials()
    logger = _logger()
    assert not wandb_run.default_offline([logger]) and logger._wandb_init.get("mode") is None
    netrc.write_text(f"machine example.org\n  login user\n  password {KEY}\n")
    assert not wandb_run.has_credentials()


def test_the_tasks_of_a_slurm_job_array_share_a_group(no_credentials, monkeypatch):
    """Folds or seeds run as array tasks land in one W&B group; a group the user names is kept."""
    assert wandb_run.group_job_array([_logger()]) is None
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4242")
    plain, named = _logger(), _logger(group="mine")
    assert wandb_run.group_job_array([plain, named, CSVLogger(str(no_credentials))]) == "slurm-4242"
    assert plain._wandb_init["group"] == "slurm-4242" and named._wandb_init["group"] == "mine"


def test_offline_on_the_logger_is_passed_to_wandb_init(no_credentials):
    """Lightning's `offline=True` sets WANDB_MODE, which wandb ignores once it is set up in the process."""
    logger = _logger(offline=True)
    assert not wandb_run.default_offline([logger]) and logger._wandb_init["mode"] == "offline"


def test_the_wandb_internals_this_project_reads_still_exist(no_credentials):
    """`wandb_run` reads Lightning's and wandb's private state in two places (`_private`, `has_credentials`); an
    upgrade that renames any of it fails here, by name, rather than silently putting runs online or offline."""
    logger = WandbLogger(project="icmil-tests", offline=True, save_dir=str(no_credentials))
    run, offline, init = wandb_run._private(logger)
    assert run is None and offline is True and isinstance(init, dict) and init["project"] == "icmil-tests"
    init["mode"] = "offline"
    assert logger._wandb_init["mode"] == "offline"  # the same dict: what we set is what wandb.init gets

    from wandb.errors import AuthenticationError
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    settings = wandb_setup.singleton().settings
    for name in ("api_key", "identity_token_file", "base_url"):
        assert hasattr(settings, name), f"wandb settings no longer have {name!r}"
    assert callable(wbauth.session_credentials) and callable(wbauth.read_netrc_auth)
    assert issubclass(AuthenticationError, Exception)
    assert wandb_run.has_credentials() is False
