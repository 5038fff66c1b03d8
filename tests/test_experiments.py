"""Every config under experiments/ parses, resolves its interpolations and names only known classes and keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from icmil_pl.cli import main

EXPERIMENTS = sorted((Path(__file__).parents[1] / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("config", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_config_parses(config, capsys):
    subcommand = "predict" if config.stem == "extract" else "fit"
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "-c", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path" in printed and "${" not in printed  # interpolations resolved
