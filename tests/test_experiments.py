"""Every config under experiments/ parses, resolves its interpolations and names only known classes and keys; every
aggregator and coupling fragment composes with the ICMIL experiments and keeps their feature size."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from icmil_pl.cli import main

ROOT = Path(__file__).parents[1] / "experiments"
EXPERIMENTS = sorted(ROOT.glob("*.yaml"))
FRAGMENTS = sorted([*ROOT.glob("aggregators/*.yaml"), *ROOT.glob("coupling/*.yaml")])
ICMIL_EXPERIMENTS = [ROOT / "demo.yaml", ROOT / "camelyon.yaml"]


def _print_config(capsys, subcommand: str, *configs: Path) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, *(arg for c in configs for arg in ("-c", str(c))), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path" in printed and "${" not in printed  # interpolations resolved
    return yaml.safe_load(printed)


@pytest.mark.parametrize("config", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_config_parses(config, capsys):
    _print_config(capsys, "predict" if config.stem == "extract" else "fit", config)


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=[f"{p.parent.name}/{p.stem}" for p in FRAGMENTS])
@pytest.mark.parametrize("experiment", ICMIL_EXPERIMENTS, ids=[p.stem for p in ICMIL_EXPERIMENTS])
def test_fragment_composes(experiment, fragment, capsys):
    base = _print_config(capsys, "fit", experiment)["model"]["init_args"]
    merged = _print_config(capsys, "fit", experiment, fragment)["model"]["init_args"]
    wanted = yaml.safe_load(fragment.read_text())["model"]["init_args"]
    if "bag" in wanted:
        aggregator = merged["bag"]["init_args"]["aggregator"]
        assert aggregator["class_path"].endswith("." + wanted["bag"]["init_args"]["aggregator"]["class_path"])
        assert aggregator["init_args"]["in_dim"] == base["bag"]["init_args"]["aggregator"]["init_args"]["in_dim"]
    else:
        assert merged["coupling"]["class_path"].endswith("." + wanted["coupling"]["class_path"])
