"""The run report: one self-contained, escaped HTML page that shows a run's (or several seeds') results, figures and
slides, and fails with one line on a folder that holds no run."""

from __future__ import annotations

import base64
import html
import io
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pytest
import torch
from PIL import Image

from data_modules.cohort.splits import save_splits
from data_modules.io import safe_name
from icmil_pl.callbacks.prediction_writer import PREDICTIONS_FILE, PredictionWriter
from icmil_pl.results import write_results
from icmil_pl.run_dir import RunDir
from icmil_pl.tasks import Classification
from icmil_pl.tools.statistics import mean_interval
from icmil_pl.views.report import REPORT_FILE, THUMBNAIL_PX, main, write_report

CLASSES = ["normal", "tumour"]
EVIL = "<script>x</script>"
# slide id, label (None: unknown), probabilities; the evil and the nested ids are predicted right, `b` wrong
SLIDES = [
    (EVIL, 1, [0.2, 0.8]),
    ("case 1/slide a", 0, [0.9, 0.1]),
    ("b", 0, [0.3, 0.7]),
    ("unlabelled", None, [0.6, 0.4]),
]


class Page(HTMLParser):
    """Every start tag with its attributes, every table as rows of cell texts, and the text outside tags."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.tables: list[list[list[str]]] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def table(self, first_header: str) -> list[list[str]]:
        return next(t for t in self.tables if t[0][0] == first_header)

    def attrs(self, tag: str, name: str) -> list[str]:
        return [a[name] for t, a in self.tags if t == tag and name in a]


def _png(path: Path, size: tuple[int, int] = (80, 60), colour: str = "red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _iteration(i: int, auroc: float, accuracy: float = 0.75) -> dict:
    metrics = {"auroc": auroc, "accuracy": accuracy, "f1": 0.6, "balanced_accuracy": 0.7}
    return {
        "iteration": i,
        "checkpoint": f"iter{i}/bag/checkpoints/best.ckpt",
        "val": metrics,
        "test": {**metrics, "auroc": auroc - 0.1},
        "seconds": {"embed": 12.5, "bag": 30.25, "couple": 40.0},
    }


def _predictions(folder: Path, slides=SLIDES) -> Path:
    writer = PredictionWriter()
    rows = [(s, None if label is None else torch.tensor(label), torch.tensor(p)) for s, label, p in slides]
    writer.rows = [{"slide_id": s, "label": label, "outputs": p} for s, label, p in rows]
    writer._write(folder / PREDICTIONS_FILE, Classification(), CLASSES)
    return folder / PREDICTIONS_FILE


@pytest.fixture
def run(tmp_path) -> Path:
    """An ICMIL run with two iterations, a skipped slide, a config, figures and predictions (one heatmap missing)."""
    root = tmp_path / "my run"
    write_results(root, [_iteration(0, 0.8123), _iteration(1, 0.9056)], model="ICMIL", skipped={"bad": "not a TIFF"})
    RunDir(root).config_path.write_text("model:\n  class_path: icmil_pl.loop.ICMIL  # <b>\n")
    _png(RunDir(root).figures_dir / "auroc_by_iteration.png")
    test = RunDir(root).final_dir("test")
    _png(test / "figures" / "test_roc.png")
    _png(test / "figures" / "test_confusion.png")
    predict = RunDir(root).final_dir("predict")
    _predictions(predict)
    for slide_id, _, _ in SLIDES[:3]:
        _png(predict / "figures" / f"{safe_name(slide_id)}_heatmap.png", size=(800, 400), colour="blue")
        _png(predict / "figures" / f"{safe_name(slide_id)}_patches.png")
    return root


def test_single_run(run):
    path = write_report(run, viewer_port=8123)
    assert path == run / REPORT_FILE and path.is_file()
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no temporary left
    text = path.read_text()
    page = Page(text)
    assert page.tags[0][0] == "html"
    assert "my run" in text and "ICMIL" in text
    assert f"python -m icmil_pl view '{run.resolve()}' --port 8123" in "".join(page.text)
    assert "ssh -L 8123:localhost:8123" in text

    results = page.table("iteration")
    assert results[0] == [
        "iteration",
        *(f"val {m}" for m in ("auroc", "accuracy", "f1", "balanced_accuracy")),
        *(f"test {m}" for m in ("auroc", "accuracy", "f1", "balanced_accuracy")),
        "embed s",
        "bag s",
        "couple s",
    ]
    assert results[1] == [
        "0",
        "0.812",
        "0.750",
        "0.600",
        "0.700",
        "0.712",
        "0.750",
        "0.600",
        "0.700",
        "12.5",
        "30.2",
        "40.0",
    ]
    assert results[2][:2] == ["1", "0.906"]
    assert page.table("slide")[1:] == [["bad", "not a TIFF"]]  # skipped slides

    # the figures: root and stage figures with their captions, no per-slide ones
    captions = [a for a in page.attrs("img", "alt") if not a.startswith("heatmap of")]
    assert captions == [
        "figures/auroc_by_iteration.png",
        "final/test/figures/test_confusion.png",
        "final/test/figures/test_roc.png",
    ]
    assert "_patches.png" not in text

    # the slides table: one row per slide, right / wrong / unlabelled
    slides = page.table("heatmap")
    assert slides[0] == ["heatmap", "slide", "label", "predicted", "p(predicted)", "p(normal)", "p(tumour)", "correct"]
    assert [row[1] for row in slides[1:]] == [s for s, _, _ in SLIDES]
    assert [row[-1] for row in slides[1:]] == ["yes", "yes", "no", ""]
    assert slides[1][2:7] == ["tumour", "tumour", "0.800", "0.200", "0.800"]
    assert "4 slides, 3 with a label, 2 correct (accuracy 0.667)" in text

    # the config, collapsed and escaped
    assert "<details><summary>config.yaml</summary><pre>" in text
    assert "# &lt;b&gt;" in text


def test_self_contained_and_escaped(run):
    text = write_report(run, viewer_port=8123).read_text()
    page = Page(text)
    sources = page.attrs("img", "src")
    assert len(sources) == 3 + 3  # three figures, three heatmaps (the unlabelled slide has none)
    assert all(s.startswith("data:image/") for s in sources)
    assert 'src="http' not in text and "<link" not in text and "@import" not in text and "url(" not in text
    assert [a for t, a in page.tags if t == "script"] == [{}]  # our inline script only
    links = page.attrs("a", "href")
    assert links and all(h.startswith("http://localhost:8123/#slide=") for h in links)

    assert EVIL not in text and html.escape(EVIL) in text
    for slide_id, _, _ in SLIDES:
        assert f"http://localhost:8123/#slide={quote(safe_name(slide_id))}" in links
    assert links.count(f"http://localhost:8123/#slide={quote(safe_name('unlabelled'))}") == 1  # no thumbnail link

    thumbnails = [s for s in sources if s.startswith("data:image/jpeg;base64,")]
    assert len(thumbnails) == 3
    image = Image.open(io.BytesIO(base64.b64decode(thumbnails[0].partition(",")[2])))
    assert image.size == (THUMBNAIL_PX, THUMBNAIL_PX // 2)


def test_several_seeds(tmp_path):
    """Per iteration and metric: mean_interval over the seeds that reached it; a smoke test's results left out."""
    aurocs = {"seed0": [0.80, 0.86], "seed1": [0.74, 0.90], "nested/seed2": [0.77]}
    for name, values in aurocs.items():
        write_results(tmp_path / name, [_iteration(i, a) for i, a in enumerate(values)], model="ICMIL")
    write_results(RunDir(tmp_path / "seed0").smoke_test().root, [_iteration(0, 0.01)], model="ICMIL")
    _predictions(RunDir(tmp_path / "seed1").final_dir("test"), SLIDES[:2])

    text = write_report(tmp_path).read_text()
    page = Page(text)
    means = page.table("iteration")
    assert means[0][:2] == ["iteration", "val auroc"]
    first = mean_interval([0.80, 0.74, 0.77])
    second = mean_interval([0.86, 0.90])
    assert means[1][:2] == ["0", f"{first} (n=3)"]
    assert means[2][:2] == ["1", f"{second} (n=2)"]
    assert means[1][5] == f"{mean_interval([0.70, 0.64, 0.67])} (n=3)"  # test auroc

    per_run = page.table("run")
    assert [row[:3] for row in per_run[1:]] == [
        ["nested/seed2", "0", "0.770"],
        ["seed0", "0", "0.800"],
        ["seed0", "1", "0.860"],
        ["seed1", "0", "0.740"],
        ["seed1", "1", "0.900"],
    ]
    assert "fast_dev_run" not in text and "0.010" not in text
    assert len(page.table("heatmap")) == 1 + 2  # seed1's test predictions, in its own section
    for name in aurocs:
        assert f"Run {name}" in text


def test_without_predictions_or_figures(tmp_path):
    write_results(tmp_path, [_iteration(0, 0.7)], model="BagClassifier")
    text = write_report(tmp_path).read_text()
    assert "0.700" in text and "No predictions.csv in this run." in text and "No figures." in text
    assert "<img" not in text


def test_single_model_predictions_at_its_root(tmp_path):
    """A single model's folder (lightning_logs/version_k) keeps predictions.csv and figures at its root."""
    folder = tmp_path / "lightning_logs" / "version_0"
    write_results(folder, [{"iteration": 0, "val": {"auroc": 0.9}, "test": {"auroc": 0.8}, "seconds": {"fit": 3.0}}])
    _predictions(folder, SLIDES[1:3])
    _png(RunDir(folder).figures_dir / "test_roc.png")
    page = Page(write_report(tmp_path).read_text())  # found below the folder given
    assert [row[1] for row in page.table("heatmap")[1:]] == ["case 1/slide a", "b"]
    assert "figures/test_roc.png" in page.attrs("img", "alt")


def test_cohort_predictions_when_no_predict(tmp_path):
    write_results(tmp_path, [_iteration(0, 0.7)])
    _predictions(RunDir(tmp_path).final_dir("test"), SLIDES[:1])
    _predictions(RunDir(tmp_path).predict_dir("other.csv"), SLIDES[1:])
    text = write_report(tmp_path).read_text()
    assert "Slides (final/predict-other/predictions.csv)" in text
    assert len(Page(text).table("heatmap")) == 1 + 3


@pytest.mark.parametrize("make", [False, True], ids=["missing", "empty"])
def test_no_run_names_the_folder(tmp_path, make):
    folder = tmp_path / "nothing here"
    if make:
        (folder / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match=f"^{re.escape(str(folder))}: .*results.json") as error:
        write_report(folder)
    assert "\n" not in str(error.value)
    assert not (folder / REPORT_FILE).exists()
    assert not make or [p.name for p in folder.iterdir()] == ["sub"]


def test_main(run, capsys):
    main([str(run), "--port", "9001"])
    assert capsys.readouterr().out == f"report: {run / REPORT_FILE}\n"
    assert "http://localhost:9001/#slide=b" in (run / REPORT_FILE).read_text()


def test_a_predict_folder_without_results(tmp_path):
    """A single model's `predict` writes its own folder (lightning_logs/version_k): predictions, no results.json."""
    _predictions(tmp_path, SLIDES[1:3])
    (tmp_path / "qupath").mkdir()
    text = write_report(tmp_path).read_text()
    assert [row[1] for row in Page(text).table("heatmap")[1:]] == ["case 1/slide a", "b"]
    assert "QuPath: File &gt; Import objects from file" in text


def test_slides_carry_their_split_and_accuracy_is_given_per_split(run):
    """predict scores training slides too: the table says which split each slide is in, and accuracy per split."""
    save_splits({"train": ["b"], "val": [], "test": [EVIL, "case 1/slide a"]}, run)
    page = Page(write_report(run).read_text())
    table = page.table("heatmap")
    assert table[0][:4] == ["heatmap", "slide", "split", "label"]
    splits = {row[1]: row[2] for row in table[1:]}
    assert splits == {EVIL: "test", "case 1/slide a": "test", "b": "train", "unlabelled": ""}
    assert "By split: train: 1 labelled, 0 correct; test: 2 labelled, 2 correct." in " ".join(page.text)
