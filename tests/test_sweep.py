"""Sweeps: every value a sweep file can propose reaches the CLI as a valid key, a trial runs, and the offline runner
ranks trials, records failures and continues after a kill without running finished trials again."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import wandb
import yaml

from helpers import ICMIL_COHORT
from icmil_pl.cli import main as cli_main
from icmil_pl.tasks import Classification
from icmil_pl.tools import sweep as sweep_module
from icmil_pl.tools.sweep import expand_command, load_sweep, resolve_config, run_sweep, trial_argv

ROOT = Path(__file__).parents[1]
SWEEPS = sorted((ROOT / "experiments" / "sweeps").glob("*.yaml"))
SMALL_DIGITS = [
    "--trainer.max_epochs=1",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.log_every_n_steps=1",
    "--data.init_args.num_train_bags=8",
    "--data.init_args.num_val_bags=8",
    "--data.init_args.num_test_bags=8",
    "--data.init_args.mean_bag_size=4",
]

CLASSIFICATION = Classification.metric_names


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # sweep commands name configs relative to the repository root, as `wandb agent` runs them
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)


def _proposals(sweep: dict, n: int = 3) -> list[dict]:
    """A few seeded random proposals of the sweep's engine, then every value of each categorical parameter."""
    proposals = [sweep_module._propose({**sweep, "method": "random"}, [], seed=k) for k in range(n)]
    for key, spec in sweep["parameters"].items():
        proposals += [{**proposals[0], key: value} for value in spec.get("values", [])]
    return proposals


def _at(config: dict, key: str):
    for part in key.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_proposal_is_a_valid_cli_override(path, monkeypatch):
    sweep = load_sweep(path)
    base, proposals = resolve_config(trial_argv(sweep, {})), _proposals(sweep)
    for params in proposals:
        config = resolve_config(trial_argv(sweep, params))
        for key, value in params.items():
            if key.endswith("class_path"):  # a short class name; the base config's init_args carry over
                in_dim = key.replace("class_path", "init_args.in_dim")
                assert _at(config, key).endswith(f".{value}") and _at(config, in_dim) == _at(base, in_dim)
            else:
                assert _at(config, key) == pytest.approx(value)
    # under `wandb agent` every run gets its own ICMIL run_dir (a shared one would resume the previous run's state)
    monkeypatch.setenv("WANDB_RUN_ID", "abc123")
    assert resolve_config(trial_argv(sweep, proposals[0]))["model"]["init_args"]["run_dir"].endswith("/abc123")


def _spec() -> list[tuple[str, object]]:
    return list(dataclasses.asdict(ICMIL_COHORT).items())


def _tiny(config: dict, cohort: Path, out: Path) -> list[str]:
    """Overrides that run a trial of an ICMIL sweep on the tiny cohort with a small embedder, outputs under `out`."""
    data = {
        "SyntheticCohortDataModule": [
            f"--data.init_args.root={cohort}",  # written by the fixture with this spec: reused as it is
            *(f"--data.init_args.cohort.{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in _spec()),
        ],
        "SlidePatchDataModule": [
            f"--data.init_args.labels={cohort / 'labels.csv'}",
            f"--data.init_args.slides={cohort / 'slides'}",
        ],
    }
    coupling = {
        "BagGradient": ["--model.init_args.coupling.init_args.read_threads=1"],
        "Distillation": [
            "--model.init_args.coupling.init_args.num_workers=0",
            "--model.init_args.coupling.init_args.batch_size=16",
            "--model.init_args.coupling.init_args.patches_per_epoch=64",
        ],
    }
    return [
        *data[config["data"]["class_path"].rsplit(".", 1)[1]],
        *coupling[config["model"]["init_args"]["coupling"]["class_path"].rsplit(".", 1)[1]],
        "--trainer.fast_dev_run=true",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--model.init_args.run_dir={out / 'run'}",
        "--model.init_args.splits.folds=3",
        "--model.init_args.splits.val_fraction=0.34",
        "--model.init_args.embedder.init_args.backbone=resnet18",
        "--model.init_args.embedder.init_args.pretrained=false",
        "--model.init_args.embedder.init_args.truncate_after=layer1",
        "--model.init_args.bag.init_args.aggregator.init_args.in_dim=64",
        "--data.init_args.tiling.mpp=1.0",
        "--data.init_args.tiling.patch_size=32",
        "--data.init_args.tiling.tissue_threshold=0.5",
        f"--data.init_args.grid_cache={out / 'grids'}",
        "--data.init_args.batch_size=32",
        "--data.init_args.num_workers=0",
    ]


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_a_trial_runs_with_fast_dev_run(path, icmil_cohort, tmp_path):
    """A trial of each sweep runs every ICMIL phase (fast_dev_run) with the proposed parameters in its config."""
    sweep = load_sweep(path)
    params = {**_proposals(sweep, n=1)[0], "model.init_args.iterations": 1}
    argv = trial_argv(sweep, params)
    try:
        cli = cli_main([*argv, *_tiny(resolve_config(argv), icmil_cohort, tmp_path)])
    finally:
        wandb.finish()
    run = tmp_path / "run" / "fast_dev_run"
    assert cli.results_dir == run
    results = json.loads((run / "results.json").read_text())
    assert [r["iteration"] for r in results["iterations"]] == [0, 1]
    for entry in results["iterations"]:
        for stage in ("val", "test"):
            assert set(entry[stage]) == set(Classification.metric_names) and all(
                0.0 <= v <= 1.0 for v in entry[stage].values()
            )
    config = yaml.safe_load((run / "config.yaml").read_text())
    for key, value in params.items():
        if key.endswith("class_path"):
            assert _at(config, key).endswith(f".{value}")
        else:
            assert _at(config, key) == pytest.approx(value)


def test_commands_expand_as_the_agent_expands_them():
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    params = {"a.b": 1.0e-5, "c": True, "d": False, "e": "TransMIL", "f": 3}
    agent = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    for macro, expected in agent.items():
        if macro != "args_dict":
            assert expand_command([f"${{{macro}}}"], params) == expected, macro
    assert expand_command(
        ["${env}", "${interpreter}", "${program}", "${unknown}", "x${envvar:NO_SUCH_VAR}"], {}, "train.py"
    ) == ["/usr/bin/env", "python", "train.py", "xNO_SUCH_VAR"]


def _digits_sweep(tmp_path: Path, method: str, parameters: dict) -> Path:
    path = tmp_path / f"{method}.yaml"
    command = [
        "${env}",
        "${interpreter}",
        "-m",
        "icmil_pl",
        "fit",
        "-c",
        "experiments/digits_e2e.yaml",
        *SMALL_DIGITS,
        "${args}",
    ]
    path.write_text(
        yaml.safe_dump(
            {
                "program": "icmil_pl/__main__.py",
                "method": method,
                "parameters": parameters,
                "metric": {"name": "final/val/auroc", "goal": "maximize"},
                "command": command,
            }
        )
    )
    return path


def _table(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "trials.csv").open()))


def _count_trials(monkeypatch, fail=lambda root: None) -> list[str]:
    """Records the trial folder of every run_trial call; `fail(root)` may raise instead of running it."""
    calls, run_trial = [], sweep_module.run_trial

    def counted(argv, root):
        calls.append(root.name)
        fail(root)
        return run_trial(argv, root)

    monkeypatch.setattr(sweep_module, "run_trial", counted)
    return calls


LR = "model.init_args.lr"


@pytest.mark.parametrize("method", ["random", "grid"])
def test_offline_sweep_ranks_its_trials(method, tmp_path, monkeypatch):
    lr = (
        {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}
        if method == "random"
        else {"values": [1e-2, 1e-3, 1e-4]}
    )
    path, out = _digits_sweep(tmp_path, method, {LR: lr}), tmp_path / "out"
    calls = _count_trials(monkeypatch)
    ranked = run_sweep(path, 3, out)
    rows = _table(out)
    assert [r["trial"] for r in rows] == [str(t["trial"]) for t in ranked] and len(rows) == 3
    assert all(r["status"] == "finished" and 0.0 <= float(r["metric"]) <= 1.0 for r in rows)
    assert [float(r["metric"]) for r in rows] == sorted((float(r["metric"]) for r in rows), reverse=True)
    assert len({r[LR] for r in rows}) == 3
    if method == "grid":  # exhausted: asking for more runs nothing
        assert len(run_sweep(path, 5, out)) == 3 and len(calls) == 3
        assert {float(r[LR]) for r in rows} == {1e-2, 1e-3, 1e-4}
        with pytest.raises(ValueError, match="holds another sweep, seed or overrides"):
            run_sweep(path, 3, out, seed=1)
    assert sorted(calls) == ["trial-1", "trial-2", "trial-3"]


def test_overrides_reach_every_trial_and_belong_to_the_sweep(tmp_path, monkeypatch):
    path, out = _digits_sweep(tmp_path, "grid", {LR: {"values": [1e-2, 1e-3]}}), tmp_path / "out"
    seen = []

    def run_trial(argv, root):
        seen.append(argv)
        return {"iterations": [{"val": {"auroc": 0.5}, "test": {"auroc": 0.5}}]}

    monkeypatch.setattr(sweep_module, "run_trial", run_trial)
    sweep_module.main([str(path), "--count", "2", "--out", str(out), "--trainer.max_epochs=1"])
    assert len(seen) == 2 and all(argv[-1] == "--trainer.max_epochs=1" for argv in seen)
    assert {argv[-2] for argv in seen} == {f"--{LR}=0.01", f"--{LR}=0.001"}  # the trial's own parameter before
    with pytest.raises(ValueError, match="holds another sweep, seed or overrides"):
        run_sweep(path, 2, out)  # the same sweep without the override is another experiment
    for bad, why in [
        ("trainer.max_epochs=1", "is written --key=value"),
        ("--trainer.max_epochs", "is written --key=value"),
        (f"--{LR}=0.1", f"{LR} is a parameter of the sweep"),
    ]:
        with pytest.raises(SystemExit, match=why):
            sweep_module.main([str(path), "--count", "2", "--out", str(tmp_path / "other"), bad])
    assert not (tmp_path / "other").exists()


class _Killed(BaseException):
    """What a kill looks like to the sweep: not an Exception, so not a failed trial."""


def test_killed_sweep_continues_and_failed_trials_are_recorded(tmp_path, monkeypatch):
    path = _digits_sweep(tmp_path, "random", {LR: {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}})
    out, killed = tmp_path / "out", []

    def fail(root: Path) -> None:
        if root.name == "trial-2" and not killed:
            killed.append(root)
            raise _Killed
        if root.name == "trial-3":
            raise RuntimeError("boom\nsecond line")

    calls = _count_trials(monkeypatch, fail)
    with pytest.raises(_Killed):
        run_sweep(path, 3, out)
    before = {r["trial"]: r for r in _table(out)}
    assert {k: r["status"] for k, r in before.items()} == {"1": "finished", "2": "running"}

    calls.clear()
    ranked = run_sweep(path, 3, out)
    assert calls == ["trial-2", "trial-3"]  # trial 1 is kept, trial 2 runs again, trial 3 is new
    rows = _table(out)
    assert [r["trial"] for r in rows] == [str(t["trial"]) for t in ranked]
    assert [r["status"] for r in rows] == ["finished", "finished", "failed"]
    assert rows[-1]["trial"] == "3" and rows[-1]["error"] == "RuntimeError: boom second line"
    assert {r["trial"]: r[LR] for r in rows if r["trial"] != "3"} == {k: r[LR] for k, r in before.items()}


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"model.init_args.no_such_key": {"values": [1, 2]}}, r"no_such_key=1\): .*no_such_key"),
        ({LR: {"values": [1e-3, "fast"]}}, rf"{LR}=fast\): --{LR}: Expected a <class 'float'>\. Got value: fast$"),
    ],
)
def test_a_bad_key_or_value_fails_the_sweep_before_its_first_trial(tmp_path, monkeypatch, parameters, message):
    """Each trial ran and failed on the typo, then the sweep exited 0: every swept key and value is resolved first."""
    path = _digits_sweep(tmp_path, "grid", parameters)
    calls = _count_trials(monkeypatch)
    with pytest.raises(ValueError, match=rf"^{path}: parameters \(.*{message}") as raised:
        run_sweep(path, 2, tmp_path / "out")
    assert calls == [] and "\n" not in str(raised.value) and not (tmp_path / "out").exists()


GOOD = {
    "program": "icmil_pl/__main__.py",
    "method": "random",
    "parameters": {LR: {"values": [1e-3]}},
    "metric": {"name": "final/val/auroc", "goal": "maximize"},
    "command": ["${env}", "python", "-m", "icmil_pl", "fit", "-c", "experiments/digits_e2e.yaml", "${args}"],
}


@pytest.mark.parametrize(
    "field, change",
    [
        ("method", {"method": "sobol"}),
        ("metric", {"metric": None}),
        ("metric.name", {"metric": {"name": "val_auroc", "goal": "maximize"}}),
        ("metric.goal", {"metric": {"name": "final/val/auroc", "goal": "up"}}),
        ("parameters", {"parameters": {}}),
        ("parameters.--model.init_args.lr", {"parameters": {f"--{LR}": {"values": [1e-3]}}}),
        ("parameters.model", {"parameters": {"model": {"parameters": {"lr": {"values": [1e-3]}}}}}),
        ("command", {"command": ["python", "-m", "icmil_pl", "fit", "-c", "experiments/digits_e2e.yaml"]}),
        ("command", {"command": ["python", "train.py", "${args}"]}),
    ],
)
def test_a_bad_sweep_file_fails_up_front(field, change, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**GOOD, **change}))
    with pytest.raises(ValueError) as error:
        load_sweep(path)
    assert str(error.value).startswith(f"{path}: {field}: ") and "\n" not in str(error.value)
    with pytest.raises(SystemExit, match=f"^error: {path}: {field}: "):
        sweep_module.main([str(path), "--count", "1", "--out", str(tmp_path / "out")])
