"""Config typos get one line naming the file and line (or the command-line flag) and the reason: no usage dump, no
silently kept duplicate key, no "<unicode string>"."""

from __future__ import annotations

import pytest

from helpers import CONF
from icmil_pl.cli import main
from icmil_pl.config_files import innermost


def _error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(CONF / "abmil.yaml"), *args, "--print_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" not in err and err.count("error:") == 1, err
    return err.splitlines()[0]


def test_an_unknown_key_names_its_file_and_line(tmp_path, capsys):
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  init_args:\n    lrr: 0.1\n")
    assert _error(capsys, "-c", str(extra)) == f"error: {extra}:3: lrr: Option 'lrr' is not accepted"


def test_a_wrong_type_on_the_command_line_names_the_flag(capsys):
    assert (
        _error(capsys, "--trainer.max_epochs=ten") == "error: --trainer.max_epochs: Expected a <class 'int'> (got ten)"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "trainer:\n  max_epochs: 2\n  max_epochs: 100\n",
            r"bad\.yaml:3:3: key 'max_epochs' given twice \(first on line 2\)",
        ),
        ("trainer:\n\tmax_epochs: 2\n", r"bad\.yaml:2:1: found character '\\t'.*\(a tab: YAML indents with spaces\)"),
    ],
)
def test_a_duplicate_key_or_a_tab_is_refused_naming_the_line(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ValueError, match=message):
        main(["fit", "-c", str(CONF / "abmil.yaml"), "-c", str(bad), "--print_config"])


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"gone\.yaml: config file not found"):
        main(["fit", "-c", str(tmp_path / "gone.yaml")])


def test_the_innermost_reason_of_a_nested_union_error():
    nested = """Parser key "model":
  Does not validate against any of the Union subtypes
  Errors:
    - Problem with given class_path 'icmil_pl.loop.ICMIL':
        Parser key "coupling":
          Errors:
            - Problem with given class_path 'icmil_pl.coupling.BagGradient':
                Parser key "select_by":
                  Expected a typing.Literal['loss', 'auroc']. Got value: nope
            - Expected a <class 'NoneType'>
  Given value: NestedArg(key='coupling.init_args.select_by', val='nope')"""
    assert innermost(nested) == ("select_by", "Expected a typing.Literal['loss', 'auroc']. Got value: nope")
