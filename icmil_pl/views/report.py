"""`python -m icmil_pl report <run_dir> [--port 8000]`: one self-contained `<run_dir>/report.html` to read a run by.

It opens from disk and loads nothing from the network (a hospital machine may have none): CSS and JS are inline and
every image is a base64 data URI. It holds:

- a header: the run folder, its model, when the report was written, and how to start the zoomable viewer
  (`python -m icmil_pl view`) that the slide links open;
- the results: val and test metrics and the seconds of every phase, per iteration, and the slides skipped;
- for a folder of several runs (seeds, folds: no results.json of its own, but some below it, `fast_dev_run` folders
  left out): each run's results, and per iteration and metric the mean over the runs with its 95 % interval
  (`icmil_pl.tools.statistics.mean_interval`); the sections below then follow once per run, under its relative path;
- the figures: every PNG of `figures/` and of each `final/<stage>/figures/`, apart from the per-slide ones;
- the slides of `final/predict/predictions.csv` (else of `final/predict-<cohort>/`, `final/test/`, or a single
  model's own predictions.csv): label, prediction, probabilities, whether it is right, and a heatmap thumbnail, the
  id and thumbnail linking to the slide in the viewer; sortable by any column;
- the resolved config.yaml, collapsed.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import os
import shlex
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import quote

from PIL import Image

from data_modules.cohort.splits import SPLITS, split_of
from data_modules.io import atomic_write, check, safe_name

from ..callbacks.figure_writer import SLIDE_FIGURES
from ..callbacks.prediction_writer import PREDICTIONS_FILE
from ..outputs.qupath import QUPATH_DIR
from ..results import RESULTS_FILE, STAGES, read_results
from ..run_dir import RunDir
from ..tasks import METRIC_NAMES
from ..tools.statistics import mean_interval

__all__ = ["REPORT_FILE", "THUMBNAIL_PX", "find_runs", "main", "write_report"]

REPORT_FILE = "report.html"
THUMBNAIL_PX = 320  # the widest a heatmap thumbnail in the slides table gets
_SMOKE_TEST = RunDir(".").smoke_test().root.name

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: middle; }
th { background: #f3f3f3; cursor: pointer; user-select: none; }
th[data-order="asc"]::after { content: " \\25B2"; }
th[data-order="desc"]::after { content: " \\25BC"; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
figure img { max-width: 640px; border: 1px solid #ddd; }
figcaption, .note { color: #555; font-size: 0.9em; }
code, pre { background: #f5f5f5; padding: 0.1em 0.3em; }
pre { padding: 0.8em; overflow-x: auto; }
td img { display: block; }
"""

# Click a header to sort its table by that column (numbers as numbers), again to reverse.
_JS = """
const number = (text) => (text === "" ? NaN : Number(text));
document.querySelectorAll("table.sortable th").forEach((th) =>
  th.addEventListener("click", () => {
    const table = th.closest("table"), body = table.tBodies[0], column = th.cellIndex;
    const ascending = th.dataset.order !== "asc";
    table.querySelectorAll("th").forEach((other) => delete other.dataset.order);
    th.dataset.order = ascending ? "asc" : "desc";
    const key = (row) => row.cells[column].textContent.trim();
    const rows = [...body.rows].sort((a, b) => {
      const x = key(a), y = key(b), nx = number(x), ny = number(y);
      const order = isNaN(nx) || isNaN(ny) ? x.localeCompare(y, undefined, { numeric: true }) : nx - ny;
      return ascending ? order : -order;
    });
    body.append(...rows);
  })
);
"""


class _Html(str):
    """Markup this module built itself; any other text that reaches the page is escaped."""


def _text(value: object) -> str:
    return value if isinstance(value, _Html) else html.escape(str(value))


def _num(value: object, digits: int = 3) -> str:
    """A metric or probability at fixed precision; text that is not a number as it is, nothing as blank."""
    if value is None or value == "":
        return ""
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> _Html:
    head = "".join(f"<th>{_text(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_text(c)}</td>" for c in row) + "</tr>\n" for row in rows)
    return _Html(f'<table class="sortable"><thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>')


def _section(title: str, parts: Iterable[str], level: int = 2) -> _Html:
    return _Html(f"<section><h{level}>{_text(title)}</h{level}>\n" + "\n".join(map(_text, parts)) + "\n</section>")


def _paragraph(*parts: object, css: str = "") -> _Html:
    attribute = f' class="{css}"' if css else ""
    return _Html(f"<p{attribute}>" + "".join(map(_text, parts)) + "</p>")


def _code(text: str) -> _Html:
    return _Html(f"<code>{_text(text)}</code>")


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _figure(path: Path, caption: str) -> _Html:
    uri = _data_uri(path.read_bytes(), "image/png")
    return _Html(f'<figure><img src="{uri}" alt="{_text(caption)}"><figcaption>{_text(caption)}</figcaption></figure>')


def _thumbnail(path: Path) -> str | None:
    """The heatmap as a small JPEG data URI: full-size PNGs of every slide would make the report huge."""
    if not path.is_file():
        return None
    try:
        with Image.open(path) as image:
            small = image.convert("RGB")
    except OSError:  # a half-written or broken figure costs its thumbnail, not the report
        return None
    small.thumbnail((THUMBNAIL_PX, small.height))
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=85)
    return _data_uri(buffer.getvalue(), "image/jpeg")


def find_runs(root: Path) -> list[Path]:
    """`[root]` when it holds results.json (or, a single model's test or predict folder, only predictions.csv), else
    every folder below it that holds results.json (smoke tests left out), sorted."""
    if not root.is_dir():
        raise ValueError(f"{root}: no such folder; expected a run folder holding {RESULTS_FILE}")
    if RunDir(root).results_path.is_file() or (root / PREDICTIONS_FILE).is_file():
        return [root]
    runs = sorted(p.parent for p in root.rglob(RESULTS_FILE) if _SMOKE_TEST not in p.relative_to(root).parts)
    if not runs:
        raise ValueError(f"{root}: expected {RESULTS_FILE} in this folder or in a subfolder of it, found none")
    return runs


def _view_command(folder: Path, port: int) -> str:
    return f"python -m icmil_pl view {shlex.quote(str(folder.resolve()))} --port {port}"


def _results_table(runs: dict[str, dict]) -> _Html:
    """One row per run and iteration: val and test metrics, then the seconds of each phase; the run column only
    when there are several runs."""
    entries = [(name, it) for name, results in runs.items() for it in results.get("iterations", [])]
    metrics = [(s, m) for s in STAGES for m in METRIC_NAMES if any(m in it.get(s, {}) for _, it in entries)]
    phases = list(dict.fromkeys(p for _, it in entries for p in it.get("seconds", {})))
    several = len(runs) > 1
    header = [
        *(["run"] if several else []),
        "iteration",
        *(f"{s} {m}" for s, m in metrics),
        *(f"{p} s" for p in phases),
    ]
    rows = [
        [
            *([name] if several else []),
            it.get("iteration", ""),
            *(_num(it.get(s, {}).get(m)) for s, m in metrics),
            *(_num(it.get("seconds", {}).get(p), 1) for p in phases),
        ]
        for name, it in entries
    ]
    return _table(header, rows)


def _interval_table(runs: dict[str, dict]) -> _Html:
    """Per iteration and metric: the mean over the runs that reached that iteration, with its 95 % interval."""
    values: dict[int, dict[tuple[str, str], list[float]]] = {}
    for results in runs.values():
        for it in results.get("iterations", []):
            for stage in STAGES:
                for metric, value in it.get(stage, {}).items():
                    values.setdefault(it["iteration"], {}).setdefault((stage, metric), []).append(float(value))
    columns = [(s, m) for s in STAGES for m in METRIC_NAMES if any((s, m) in v for v in values.values())]

    def cell(found: list[float] | None) -> str:
        if not found:
            return ""
        interval = mean_interval(found)
        return f"{interval} (n={interval.n})"

    rows = [[i, *(cell(by_metric.get(c)) for c in columns)] for i, by_metric in sorted(values.items())]
    return _table(["iteration", *(f"{s} {m}" for s, m in columns)], rows)


def _figures(run: RunDir) -> list[_Html]:
    """The run's own figures, then each final stage's (FigureWriter writes `figures/` under every output folder, as
    RunDir names the run's own); per-slide heatmaps and patches belong to the slides table."""
    final = run.final_dir("test").parent
    stages = sorted(d for d in final.iterdir() if d.is_dir()) if final.is_dir() else []
    folders = [run.figures_dir, *(RunDir(d).figures_dir for d in stages)]
    paths = [p for f in folders for p in sorted(f.glob("*.png")) if not p.name.endswith(SLIDE_FIGURES)]
    return [_figure(p, p.relative_to(run.root).as_posix()) for p in paths]


def _predictions(run: RunDir) -> Path | None:
    """The predictions the slides table shows: predict, else a cohort's predict, else test, else a single model's."""
    predict = run.final_dir("predict")
    folders = [predict, *sorted(predict.parent.glob(f"{predict.name}-*")), run.final_dir("test"), run.root]
    return next((f / PREDICTIONS_FILE for f in folders if (f / PREDICTIONS_FILE).is_file()), None)


def _split_of(run: RunDir, predictions: Path) -> dict[str, str]:
    """Slide id -> its split from the run's splits.json, else the one beside the predictions: predict scores every
    slide, and accuracy over training slides says little."""
    return split_of(run.splits_path.parent, predictions.parent)


def _slides(path: Path, caption: str, split_of: dict[str, str], port: int, level: int) -> _Html:
    """The slides table of a predictions.csv (PredictionWriter's format: slide_id, label, predicted, the task's
    outputs), with accuracy lines above it where the calls are classes: over all labelled slides, and per split where
    the run has splits. Other tasks (a value, a risk, a set of labels) show their outputs and no right or wrong."""
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        columns = list(reader.fieldnames or [])
        bag, outputs = columns[0], columns[3:]  # slide_id, or patient_id for patient bags
    classes = [name.removeprefix("prob_") for name in outputs if name.startswith("prob_")]
    judged = bool(classes) and all(row.get("predicted") in classes for row in rows)  # one class per call
    figures = RunDir(path.parent).figures_dir
    table: list[list] = []
    counts: dict[str, list[int]] = {}  # group -> [labelled, correct]
    for row in rows:
        slide_id, label, predicted = row[bag], row.get("label") or "", row.get("predicted") or ""
        name = safe_name(slide_id)
        link = html.escape(f"http://localhost:{port}/#slide={quote(name)}")
        thumbnail = _thumbnail(figures / f"{name}{SLIDE_FIGURES[0]}")
        image = f'<a href="{link}"><img src="{thumbnail}" alt="heatmap of {_text(slide_id)}"></a>' if thumbnail else ""
        right, split = label == predicted, split_of.get(slide_id, "")
        for group in ("all", split) if label and judged else ():
            count = counts.setdefault(group, [0, 0])
            count[0], count[1] = count[0] + 1, count[1] + right
        table.append(
            [
                _Html(image),
                _Html(f'<a href="{link}">{_text(slide_id)}</a>'),
                *([split] if split_of else []),
                label,
                predicted,
                *([_num(row.get(f"prob_{predicted}"))] if judged else []),
                *(_num(row.get(c)) for c in outputs),
                *([("yes" if right else "no") if label else ""] if judged else []),
            ]
        )
    labelled, correct = counts.get("all", [0, 0])
    accuracy = f" (accuracy {correct / labelled:.3f})" if labelled else ""
    if judged:
        summary = _paragraph(f"{len(rows)} slides, {labelled} with a label, {correct} correct{accuracy}.")
    else:
        summary = _paragraph(f"{len(rows)} slides, {sum(bool(r.get('label')) for r in rows)} with a label.")
    splits = [f"{g}: {counts[g][0]} labelled, {counts[g][1]} correct" for g in SPLITS if g in counts]
    if splits:
        summary = _Html(summary + _paragraph("By split: ", "; ".join(splits), "."))
    if (path.parent / QUPATH_DIR).is_dir():
        where = _code(f"{(path.parent / QUPATH_DIR).resolve()}/<slide>.geojson")
        note = ("QuPath: File > Import objects from file, ", where, " (tiles with attention and class probabilities).")
        summary = _Html(summary + _paragraph(*note, css="note"))
    header = [
        "heatmap",
        "slide",
        *(["split"] if split_of else []),
        "label",
        "predicted",
        *(["p(predicted)"] if judged else []),
        *(f"p({c.removeprefix('prob_')})" if c.startswith("prob_") else c for c in outputs),
        *(["correct"] if judged else []),
    ]
    return _section(f"Slides ({caption})", [summary, _table(header, table)], level)


def _run_sections(run: RunDir, results: dict, port: int, level: int) -> list[_Html]:
    """What each run shows after its results: skipped slides, figures, slides, config."""
    parts = []
    if results.get("skipped"):
        parts.append(
            _section("Skipped slides", [_table(["slide", "error"], sorted(results["skipped"].items()))], level)
        )
    figures = _figures(run)
    parts.append(_section("Figures", figures or [_paragraph("No figures.", css="note")], level))
    predictions = _predictions(run)
    if predictions is not None:
        caption = predictions.relative_to(run.root).as_posix()
        parts.append(_slides(predictions, caption, _split_of(run, predictions), port, level))
    else:
        parts.append(_section("Slides", [_paragraph(f"No {PREDICTIONS_FILE} in this run.", css="note")], level))
    if run.config_path.is_file():
        name, text = _text(run.config_path.name), _text(run.config_path.read_text())
        config = _Html(f"<details><summary>{name}</summary><pre>{text}</pre></details>")
        parts.append(_section("Config", [config], level))
    return parts


def _render(root: Path, runs: list[Path], port: int) -> str:
    results = {run: read_results(run) if RunDir(run).results_path.is_file() else {} for run in runs}
    models = ", ".join(sorted({str(r.get("model", "?")) for r in results.values()}))
    title = f"Run report: {root.resolve().name}"
    body = [
        _Html(f"<h1>{_text(title)}</h1>"),
        _paragraph(
            "Model: ",
            _code(models),
            f" · written {time.strftime('%Y-%m-%d %H:%M')} · folder ",
            _code(str(root.resolve())),
        ),
        _paragraph(
            "Zoomable viewer: run ",
            _code(_view_command(root, port)),
            ", then the slide links work (over SSH, first ",
            _code(f"ssh -L {port}:localhost:{port} <host>"),
            ").",
            css="note",
        ),
    ]
    if runs == [root]:
        body.append(_section("Results", [_results_table({"": results[root]})]))
        body += _run_sections(RunDir(root), results[root], port, level=2)
    else:
        named = {run.relative_to(root).as_posix(): r for run, r in results.items()}
        summary = _paragraph(f"{len(runs)} runs; mean over the runs with its 95 % interval [low, high] (n runs).")
        body.append(_section("Mean over runs", [summary, _interval_table(named)]))
        body.append(_section("Results per run", [_results_table(named)]))
        for (name, r), run in zip(named.items(), runs, strict=True):
            view = _paragraph("Viewer: ", _code(_view_command(run, port)), css="note")
            body.append(_section(f"Run {name}", [view, *_run_sections(RunDir(run), r, port, level=3)]))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_text(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + f"\n<script>{_JS}</script>\n</body></html>\n"
    )


def write_report(run_dir: str | os.PathLike, viewer_port: int = 8000) -> Path:
    """Write `<run_dir>/report.html` (see the module docstring) and return its path. The page is built whole before
    anything is written, then replaces the old one at once: a failed or killed report leaves no half file."""
    check("viewer_port", 0 < viewer_port < 65536, "a port in 1..65535", viewer_port)
    root = Path(run_dir)
    text = _render(root, find_runs(root), viewer_port)
    path = root / REPORT_FILE
    return atomic_write(path, text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m icmil_pl report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder (results.json), or a folder of several runs (seeds, folds)")
    parser.add_argument("--port", type=int, default=8000, help="the viewer's port, for the slide links")
    args = parser.parse_args(argv)
    print(f"report: {write_report(args.run_dir, args.port)}")
