"""A sweep's trials as people and scripts read them: ranked best first, kept in state.json and trials.csv (each
written whole), and printed as a table with short parameter names."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Literal, TypedDict

from data_modules.io import atomic_write

__all__ = ["Goal", "Trial", "format_value", "print_table", "ranked", "save_trials", "short_names"]

Goal = Literal["maximize", "minimize"]
Status = Literal["running", "finished", "failed"]


class Trial(TypedDict):
    """One trial as state.json keeps it; "running" after a kill means: run it again with these parameters."""

    trial: int
    status: Status
    params: dict[str, Any]
    metric: float | None
    error: str


def ranked(trials: list[Trial], goal: Goal) -> list[Trial]:
    """Finished trials best first, then the rest (failed, or without a finite metric) in trial order."""
    sign = -1.0 if goal == "maximize" else 1.0

    def key(t: Trial) -> tuple[bool, float, int]:
        ok = t["status"] == "finished" and math.isfinite(t["metric"])
        return not ok, sign * t["metric"] if ok else 0.0, t["trial"]

    return sorted(trials, key=key)


def save_trials(out: Path, state: dict, sweep: dict) -> None:
    """state.json and trials.csv, each replaced whole: a kill never leaves half a file."""
    out.mkdir(parents=True, exist_ok=True)
    keys = list(sweep["parameters"])
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["trial", "status", "metric", *keys, "error"])
    for t in ranked(state["trials"], sweep["metric"]["goal"]):
        writer.writerow(
            [
                t["trial"],
                t["status"],
                "" if t["metric"] is None else t["metric"],
                *(t["params"].get(k, "") for k in keys),
                t["error"],
            ]
        )
    for name, text in (("state.json", json.dumps(state, indent=1)), ("trials.csv", table.getvalue())):
        atomic_write(out / name, text)


def short_names(keys: list[str]) -> dict[str, str]:
    """`model.init_args.bag.init_args.lr` -> `bag.lr`: the shortest dotted suffix, without init_args and class_path,
    that no other parameter shares; for the printed table."""
    parts = {key: [p for p in key.split(".") if p not in ("init_args", "class_path")] or [key] for key in keys}

    def suffix(p: list[str], n: int) -> str:
        return ".".join(p[-n:])

    return {
        key: next(
            (
                suffix(p, n)
                for n in range(1, len(p) + 1)
                if sum(suffix(q, n) == suffix(p, n) for q in parts.values()) == 1
            ),
            key,
        )
        for key, p in parts.items()
    }


def format_value(value: Any) -> str:
    """A parameter or metric as the table and errors print it."""
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def print_table(trials: list[Trial], sweep: dict) -> None:
    keys = list(sweep["parameters"])
    names = short_names(keys)
    rows = [["trial", "status", sweep["metric"]["name"], *(names[k] for k in keys), "error"]]
    rows += [
        [
            str(t["trial"]),
            t["status"],
            format_value(t["metric"]),
            *(format_value(t["params"].get(k)) for k in keys),
            t["error"][:80],
        ]
        for t in trials
    ]
    widths = [max(map(len, column)) for column in zip(*rows, strict=True)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
