"""The YAML config files of a command, read strictly before LightningCLI parses them, and its parse errors said in one
line naming the file and line: a typo should not cost a 50-line usage dump that never names the file.

Strict means: a key given twice in one mapping (`lr: 1e-3`, later `lr: 100`; YAML keeps the last without a word) and
YAML syntax errors (a tab in the indentation) are refused with `file:line`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from pytorch_lightning.cli import LightningArgumentParser

__all__ = ["ConfigParser", "config_files", "innermost", "locate_key"]

_CONFIG_FLAGS = ("-c", "--config")
# what jsonargparse's messages name: an unknown option, or a key whose value is wrong
_KEY = (re.compile(r"Option '([\w.]+)' is not accepted"), re.compile(r'Parser key "([\w.]+)"'))
_REASONS = ("is not accepted", "Expected", "Got value", "does not exist", "Unexpected", "Problems parsing")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first on line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def config_files(argv: Sequence[str]) -> list[Path]:
    """The config files `argv` names (`-c F`, `--config F`, `--config=F`), each read strictly: a duplicate key or a
    syntax error raises ValueError naming `file:line`."""
    files = []
    for i, arg in enumerate(argv):
        if arg in _CONFIG_FLAGS and i + 1 < len(argv):
            files.append(Path(argv[i + 1]))
        elif arg.startswith("--config="):
            files.append(Path(arg.split("=", 1)[1]))
    for path in files:
        if not path.is_file():
            raise ValueError(f"{path}: config file not found")
        text = path.read_text(encoding="utf-8")
        try:
            yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
        except yaml.MarkedYAMLError as error:
            mark = error.problem_mark
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            problem = error.problem or str(error)
            if "\t" in (text.splitlines() or [""])[mark.line if mark else 0]:
                problem += " (a tab: YAML indents with spaces)"
            raise ValueError(f"{where}: {problem}") from None
    return files


def locate_key(files: Sequence[Path], key: str) -> str | None:
    """`file:line` of the last config file that sets `key` (dotted; its last part is matched), or None."""
    leaf = key.split(".")[-1]
    for path in reversed(list(files)):
        try:
            node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
        except (OSError, yaml.YAMLError):
            continue
        stack = [node]
        while stack:
            current = stack.pop()
            if isinstance(current, yaml.MappingNode):
                for key_node, value in current.value:
                    if key_node.value == leaf:
                        return f"{path}:{key_node.start_mark.line + 1}"
                    stack.append(value)
            elif isinstance(current, yaml.SequenceNode):
                stack.extend(current.value)
    return None


class ConfigParser(LightningArgumentParser):
    """LightningCLI's parser that says a config error in one line, naming where the setting is given (`argv`: the
    command line, `files`: its config files) and jsonargparse's innermost reason, instead of the usage text and a
    nested report of every union member that did not match (`--help` still prints the usage)."""

    def __init__(self, *args, argv: Sequence[str] = (), files: Sequence[Path] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.argv, self.files = tuple(argv), tuple(files)

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        key, reason = innermost(message)
        text = reason if key is None else f"{key}: {reason}"
        if key is not None:
            given = [a.split("=", 1)[0] for a in getattr(self, "argv", ()) if a.startswith("--")]
            flag = next((a for a in given if a.split(".")[-1] == key.split(".")[-1]), None)
            where = locate_key(getattr(self, "files", ()), key) if flag is None else None
            text = f"{flag}: {reason}" if flag else f"{where}: {text}" if where else text
        sys.stderr.write(f"error: {text}\n(`{self.prog.split(' [')[0]} <command> --help` lists every setting)\n")
        sys.exit(2)


def innermost(message: str) -> tuple[str | None, str]:
    """(the setting, why) from one of jsonargparse's nested messages: its most deeply nested key and reason, the
    `None` member of an optional setting's union left out."""
    lines = [(len(line) - len(line.lstrip()), line.strip().removeprefix("- ")) for line in message.splitlines()]
    lines = [(depth, text) for depth, text in lines if text and "NoneType" not in text]
    keyed = [(depth, m.group(1)) for depth, text in lines for pattern in _KEY if (m := pattern.search(text))]
    reasons = [(depth, text) for depth, text in lines if any(r in text for r in _REASONS)]
    key = max(keyed, key=lambda d: d[0])[1] if keyed else None
    reason = max(reasons, key=lambda d: d[0])[1] if reasons else " ".join(text for _, text in lines)
    given = next((text for _, text in lines if text.startswith("Given value:")), None)
    if given and "Got value" not in reason and "not accepted" not in reason:
        reason += f" ({given.replace('Given value:', 'got').strip()})"
    return key, reason
