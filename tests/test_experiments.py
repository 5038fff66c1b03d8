"""Every config under experiments/ parses, resolves its interpolations and names only known classes and keys; every
aggregator and coupling fragment composes with the ICMIL experiments and keeps their feature size; every command the
README shows parses as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from icmil_pl.__main__ import COMMANDS
from icmil_pl.cli import main

ROOT = Path(__file__).parents[1] / "experiments"
EXPERIMENTS = sorted(ROOT.glob("*.yaml"))
FRAGMENTS = sorted([*ROOT.glob("aggregators/*.yaml"), *ROOT.glob("coupling/*.yaml")])
ICMIL_EXPERIMENTS = [ROOT / "demo.yaml", ROOT / "camelyon.yaml"]
ENCODERS = sorted(ROOT.glob("encoders/*.yaml"))
ENCODER_EXPERIMENTS = [*ICMIL_EXPERIMENTS, ROOT / "camelyon_uni2.yaml"]
README = Path(__file__).parents[1] / "README.md"


def _readme_commands() -> list[list[str]]:
    """The `python -m icmil_pl` commands of the README's code blocks whose configs are in the repository (those of
    a finished run, under runs/, are left out), continuation lines joined, comments dropped, `$VARIABLE`s 0;
    `my_cohort.yaml` is the copy of camelyon.yaml that the README tells the reader to make."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.DOTALL):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            words = shlex.split(re.sub(r"\$\w+", "0", line.partition("#")[0]))
            if "icmil_pl" not in words:
                continue
            args = words[words.index("icmil_pl") + 1 :]
            args = ["experiments/camelyon.yaml" if a == "my_cohort.yaml" else a for a in args]
            configs = [args[i + 1] for i, a in enumerate(args) if a == "-c"]
            if args[0] not in COMMANDS and all(not c.startswith("runs/") for c in configs):
                commands.append(args)
    return commands


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


@pytest.mark.parametrize("encoder", ENCODERS, ids=[p.stem for p in ENCODERS])
def test_encoder_fragment_sets_the_embedder_and_the_aggregator_width(encoder, capsys):
    """Each preset's fragment composes with every ICMIL experiment, also before an aggregator fragment, and cuts the
    tiles the preset's authors cut."""
    from icmil_pl.encoders import PRESETS

    assert encoder.stem in PRESETS
    for configs in [(experiment, encoder) for experiment in ENCODER_EXPERIMENTS] + [
        (ROOT / "demo.yaml", encoder, ROOT / "aggregators" / "transmil.yaml")
    ]:
        config = _print_config(capsys, "fit", *configs)
        model, tiling = config["model"]["init_args"], config["data"]["init_args"]["tiling"]
        embedder, aggregator = model["embedder"]["init_args"], model["bag"]["init_args"]["aggregator"]
        assert embedder["backbone"] == encoder.stem and embedder["truncate_after"] is None, configs
        assert aggregator["init_args"]["in_dim"] == embedder["feature_dim"] == PRESETS[encoder.stem].feature_dim
        preset, own = PRESETS[encoder.stem], yaml.safe_load(configs[0].read_text())["data"]["init_args"]["tiling"]
        assert (tiling["mpp"], tiling["patch_size"]) == (preset.tile_mpp, preset.tile_px), configs  # its authors'
        assert tiling["tissue_threshold"] == own["tissue_threshold"], configs  # the experiment's tissue settings


@pytest.mark.parametrize("command", _readme_commands(), ids=" ".join)
def test_a_readme_command_parses(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err


def test_help_names_the_other_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(f"python -m icmil_pl {command}" in " ".join(out.split()) for command in COMMANDS), out


def test_the_hard_cohorts_ssl_start_pretrains_on_the_hard_cohort(capsys):
    """experiments/ssl/hard_cohort.yaml composes with pretrain_ssl.yaml and names the cohort hard_cohort.yaml trains
    on, setting for setting (a copy that drifted would write, and pretrain on, another cohort)."""
    ssl = _print_config(capsys, "fit", ROOT / "pretrain_ssl.yaml", ROOT / "ssl" / "hard_cohort.yaml")
    hard = _print_config(capsys, "fit", ROOT / "hard_cohort.yaml")
    assert ssl["data"]["init_args"]["cohort"]["init_args"]["cohort"] == hard["data"]["init_args"]["cohort"]
    assert ssl["data"]["init_args"]["cohort"]["init_args"]["root"] == hard["data"]["init_args"]["root"]
