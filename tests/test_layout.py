"""The layout's rules, read from the source (DESIGN.md section 2): `data_modules` never imports `icmil_pl` and has no
import cycle, the training core never imports the views, no module passes 400 lines, and no code outside the task
folders compares task-kind strings."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data_modules", "icmil_pl")
MAX_LINES = 400
TASK_FOLDERS = ("icmil_pl/tasks", "data_modules/cohort/targets")
KINDS = ("classification", "multilabel", "regression", "survival", "ordinal")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Modules `name` imports when it is imported: module level, `if TYPE_CHECKING:` blocks and function bodies left
    out (a function's import runs when it is called)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, *([base] if base else [])])
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                visit([*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", [])])

    visit(ast.parse(path.read_text()).body)
    return {m for m in found if m in MODULES and not name.startswith(f"{m}.")}  # a package's own __init__ aside


def test_data_modules_never_imports_icmil_pl_and_has_no_cycle():
    graph = {name: _imports(name, path) for name, path in MODULES.items() if name.startswith("data_modules")}
    upward = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if b.startswith("icmil_pl"))
    assert not upward
    cycles = []

    def walk(node: str, stack: list[str], done: set[str]) -> None:
        if node in stack:
            cycles.append(" -> ".join([*stack[stack.index(node) :], node]))
            return
        if node in done:
            return
        for dep in sorted(graph.get(node, ())):
            walk(dep, [*stack, node], done)
        done.add(node)

    done: set[str] = set()
    for node in sorted(graph):
        walk(node, [], done)
    assert not cycles


def test_the_loop_and_the_cli_never_import_the_views():
    for name in ("icmil_pl.loop", "icmil_pl.cli"):
        assert not {m for m in _imports(name, MODULES[name]) if m.startswith("icmil_pl.views")}, name


@pytest.mark.parametrize("folder", [*PACKAGES, "benchmarks"])
def test_no_module_over_400_lines(folder):
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / folder).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long


def test_no_kind_string_switch_outside_the_task_folders():
    """A task kind is a class with capabilities (`Task.probabilities`, `strata`, ...), never a string compared."""
    switch = re.compile(
        rf"""(==|!=|\bin\b)\s*\(?\s*["']({"|".join(KINDS)})["']|["']({"|".join(KINDS)})["']\s*(==|!=)"""
    )
    found = []
    for name, path in MODULES.items():
        if any(str(path.relative_to(ROOT)).startswith(folder) for folder in TASK_FOLDERS):
            continue
        found += [f"{name}:{k}" for k, line in enumerate(path.read_text().splitlines(), 1) if switch.search(line)]
    assert not found
