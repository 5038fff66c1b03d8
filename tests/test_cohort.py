"""The labels CSV and the cohort on disk: forgiving about whitespace, strict about what it does not know; class names
bound to label values; slide files found in any letter case; each slide's level-0 resolution from the right source."""

from __future__ import annotations

import csv
import re
from collections import defaultdict

import pytest
import tifffile

from data_modules.cohort import SlideCohort, find_slide, name_classes, read_labels
from data_modules.cohort.splits import SplitConfig, make_splits
from data_modules.slides import open_slide
from data_modules.slides.tiling import TilingConfig
from data_modules.synthetic import CohortSpec, make_cohort
from helpers import write_labels


def _rows(n: int = 40) -> list[tuple[str, str, str]]:
    return [(f"s{i:02d}", str(i % 2), f"patient_{i // 2:02d}") for i in range(n)]  # 2 slides per patient


@pytest.mark.parametrize(
    "header",
    [
        "slide_id,label, patient_id",
        "slide_id, label, patient_id",
        " slide_id ,label,patient_id ",
        "\ufeffslide_id,label,patient_id",
    ],
    ids=["space-before-patient", "spaces", "padded", "bom"],
)
def test_header_whitespace_and_a_bom_keep_every_column(tmp_path, header):
    """`slide_id,label, patient_id` used to drop the patient column silently, so one patient's slides landed in
    several splits; with spaces after every comma every slide 'had no label'; a BOM lost `slide_id`."""
    path = tmp_path / "labels.csv"
    path.write_text(header + "\n" + "".join(f"{s}, {label} ,{p}\n" for s, label, p in _rows()), encoding="utf-8")
    rows = read_labels(path)
    assert [(r.slide_id, r.label, r.patient_id) for r in rows] == _rows()
    splits = make_splits(rows, SplitConfig(folds=5, val_fraction=0.25))
    patient = {r.slide_id: r.patient_id for r in rows}
    where = defaultdict(set)
    for name, ids in splits.items():
        for slide_id in ids:
            where[patient[slide_id]].add(name)
    assert len(where) == 20 and all(len(names) == 1 for names in where.values())  # no patient in two splits


@pytest.mark.parametrize(
    "header, message",
    [
        (
            "slide_id,label,patient",
            r"unknown column 'patient'; the columns are slide_id, label, patient_id, split, mpp",
        ),
        ("slide_id,label,label", r"a repeated column"),
        ("id,label", r"missing column 'slide_id'"),
    ],
)
def test_columns_it_does_not_know_are_refused(tmp_path, header, message):
    path = tmp_path / "labels.csv"
    path.write_text(f"{header}\na,0\n")
    with pytest.raises(ValueError, match=rf"^{path}: {message}"):
        read_labels(path)


@pytest.mark.parametrize("separator", [";", "\t"])
def test_a_spreadsheet_s_semicolons_or_tabs_and_decimal_commas_are_read(tmp_path, separator):
    """A European Excel export separates cells with `;` and writes `0,25`: it read as one unknown column."""
    path = tmp_path / "labels.csv"
    path.write_text(
        "\ufeff"
        + "\n".join(separator.join(r) for r in [("slide_id", "label", "mpp"), ("a", "1", "0,25"), ("b", "0", "")])
    )
    assert [(r.slide_id, r.label, r.mpp) for r in read_labels(path)] == [("a", "1", 0.25), ("b", "0", None)]


def test_a_cohort_of_one_class_is_refused_for_training_naming_the_file(tmp_path):
    path = write_labels(tmp_path / "tumour_only.csv", [(f"s{i}", "tumour", f"p{i}") for i in range(20)])
    with pytest.raises(
        ValueError, match=r"tumour_only\.csv: every labelled slide is of class 'tumour'; training needs"
    ):
        make_splits(read_labels(path), SplitConfig(), path)


def test_rows_longer_than_the_header_and_bad_mpp_are_refused(tmp_path):
    path = write_labels(tmp_path / "a.csv", [("a", "0", "p", "extra")])
    with pytest.raises(ValueError, match=r"a\.csv:2: 4 cells, but the header names 3 columns"):
        read_labels(path)
    path = write_labels(
        tmp_path / "b.csv", [("a", "0", "0.25"), ("b", "1", ""), ("c", "1", "fast")], ("slide_id", "label", "mpp")
    )
    with pytest.raises(ValueError, match=r"b\.csv:4: mpp 'fast' is not microns per pixel"):
        read_labels(path)
    path = write_labels(tmp_path / "c.csv", [("a", "0", "0.25"), ("b", "1", "")], ("slide_id", "label", "mpp"))
    assert [r.mpp for r in read_labels(path)] == [0.25, None]


@pytest.mark.parametrize(
    "other",
    ["patient_002", "PATIENT\u200b_002", "PATIENT_002\ufeff", "PATIENT\u00a0002", "PATIENT  002"],
    ids=["case", "zero-width space", "byte-order mark", "no-break space", "two spaces"],
)
def test_a_patient_id_written_two_ways_is_refused(tmp_path, other):
    """`PATIENT_002` and `patient_002` (or with an invisible character) were two patients: on the demo's labels that
    put 19 patients' slides in two splits. Both spellings are named with repr, so the invisible one shows."""
    first = "PATIENT 002" if " " in other or "\u00a0" in other else "PATIENT_002"
    rows = [("s1", "0", first), ("s2", "1", "patient_003"), ("s3", "1", other)]
    path = write_labels(tmp_path / "labels.csv", rows)
    expected = rf"^{path}: patient_id {first!r} \(line 2\) and {re.escape(repr(other))} \(line 4\) differ in case or "
    with pytest.raises(ValueError, match=expected + r"invisible characters: write one patient's id one way$"):
        read_labels(path)


def test_slide_ids_in_two_letter_cases_are_two_slides_of_two_patients(tmp_path):
    """Only patient ids as written are compared: a slide's default patient is its id, and `S1` and `s1` are two
    files."""
    rows = read_labels(write_labels(tmp_path / "labels.csv", [("S1", "0", ""), ("s1", "1", ""), ("s2", "1", "p")]))
    assert [(r.slide_id, r.patient_id) for r in rows] == [("S1", "S1"), ("s1", "s1"), ("s2", "p")]
    with pytest.raises(ValueError, match=r"labels2\.csv: duplicate slide_id 's1'"):
        read_labels(write_labels(tmp_path / "labels2.csv", [("s1", "0", ""), ("s2", "1", ""), ("s1", "1", "")]))


def test_class_names_are_bound_to_label_values():
    assert name_classes(None, ["0", "1"]) == ["0", "1"]
    with pytest.raises(
        ValueError, match=r"class_names: 'normal' is not one of the label values \['0', '1'\]; a list only"
    ):
        name_classes(["normal", "tumour"], ["0", "1"])  # names bound by position alone
    assert name_classes({"1": "tumour", "0": "normal"}, ["0", "1"]) == ["normal", "tumour"]
    assert name_classes({0: "normal", 1: "tumour"}, ["0", "1"]) == ["normal", "tumour"]  # YAML reads 0: as an int
    assert name_classes(["normal", "tumour"], ["normal", "tumour"]) == ["normal", "tumour"]
    with pytest.raises(ValueError, match=r"class_names: 'tumour' is at position 0, but label 'tumour' is class 1"):
        name_classes(["tumour", "normal"], ["normal", "tumour"])  # would call every normal slide tumour
    assert name_classes(["Normal", "TUMOUR"], ["normal", "tumour"]) == ["Normal", "TUMOUR"]  # restyled, by value
    with pytest.raises(ValueError, match=r"class_names: 'Tumour' is at position 0, but label 'tumour' is class 1"):
        name_classes(["Tumour", "Normal"], ["normal", "tumour"])  # was accepted: normal slides named Tumour
    with pytest.raises(ValueError, match=r"class_names: expected a name for each label value \['0', '1'\]"):
        name_classes({"0": "normal", "2": "tumour"}, ["0", "1"])
    with pytest.raises(ValueError, match=r"class_names: expected 2 names"):
        name_classes(["normal"], ["0", "1"])


def test_slide_files_are_found_in_any_letter_case(tmp_path):
    for name in ("a.SVS", "b.Tif", "c.ome.TIFF", "d.svs", "d.SVS"):
        (tmp_path / name).write_bytes(b"")
    assert find_slide(tmp_path, "a") == tmp_path / "a.SVS"
    assert find_slide(tmp_path, "b") == tmp_path / "b.Tif"
    assert find_slide(tmp_path, "c") == tmp_path / "c.ome.TIFF"
    assert find_slide(tmp_path, "d") == tmp_path / "d.svs"  # the exact extension wins
    assert find_slide(tmp_path, "e") is None and find_slide(tmp_path / "nope", "a") is None


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Two slides at 0.5 um/px, one written with its resolution and one (the same pixels) without any."""
    root = make_cohort(tmp_path_factory.mktemp("mixed"), CohortSpec(n_slides=2, seed=3, size=(1024, 1024)))
    with open(root / "labels.csv") as fh:
        ids = [row["slide_id"] for row in csv.DictReader(fh)]
    known = next((root / "slides").glob(f"{ids[0]}.*"))
    with tifffile.TiffFile(next((root / "slides").glob(f"{ids[1]}.*"))) as tif:
        pixels = tif.series[0].levels[0].asarray()
    for old in (root / "slides").glob(f"{ids[1]}.*"):
        old.unlink()
    tifffile.imwrite(root / "slides" / f"{ids[1]}.tif", pixels, tile=(256, 256), photometric="rgb")
    assert open_slide(known).mpp == 0.5 and open_slide(root / "slides" / f"{ids[1]}.tif").mpp is None
    return root, ids


def _levels(cohort: SlideCohort, tiling: TilingConfig, tmp_path) -> dict[str, float]:
    """Level-0 pixels per patch side of each slide (patch size x target mpp / the level-0 mpp used)."""
    return {p.slide_id: p.grid.level0_size for p in cohort.patches(tiling, tmp_path)}


def test_mpp_override_serves_only_the_slides_without_metadata(mixed, tmp_path):
    """`mpp_override` used to apply to every slide, the calibrated ones included (15 patches instead of 26)."""
    root, (known, unknown) = mixed
    cohort = SlideCohort(root / "labels.csv", root / "slides")
    with pytest.raises(ValueError, match=rf"{unknown}\.tif: microns per pixel unknown"):
        cohort.patches(TilingConfig(mpp=1.0, patch_size=64), tmp_path)
    fallback = _levels(cohort, TilingConfig(mpp=1.0, patch_size=64, mpp_override=0.4), tmp_path)
    assert fallback == {known: 128.0, unknown: 160.0}  # the file's 0.5 um/px where it has one
    forced = _levels(cohort, TilingConfig(mpp=1.0, patch_size=64, mpp_override=0.4, force_mpp=True), tmp_path)
    assert forced == {known: 160.0, unknown: 160.0}
    with pytest.raises(ValueError, match="tiling.force_mpp: expected a tiling.mpp_override"):
        TilingConfig(force_mpp=True)


def test_an_mpp_column_sets_the_resolution_of_its_slides(mixed, tmp_path):
    root, (known, unknown) = mixed
    labels = write_labels(
        tmp_path / "labels.csv", [(known, "0", ""), (unknown, "1", "0.5")], ("slide_id", "label", "mpp")
    )
    cohort = SlideCohort(labels, root / "slides")
    assert _levels(cohort, TilingConfig(mpp=1.0, patch_size=64), tmp_path) == {known: 128.0, unknown: 128.0}
    patches = {p.slide_id: p for p in cohort.patches(TilingConfig(mpp=1.0, patch_size=64), tmp_path)}
    assert patches[unknown].mpp_override == 0.5 and patches[known].mpp_override is None


def test_mpp_from_objective_reads_a_file_without_mpp_at_ten_over_its_power(mixed, tmp_path):
    """An SVS with `AppMag = 20` and no `MPP`: 0.5 um/px with a warning naming it, only when asked for."""
    root, (known, unknown) = mixed
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / known).with_suffix(".svs").symlink_to(next((root / "slides").glob(f"{known}.*")))
    pixels = open_slide(root / "slides" / f"{unknown}.tif").read_region((0, 0), 0, (1024, 1024))
    aperio = "Aperio Image Library v12.0.0 \r\n1024x1024 [0,0 1024x1024] (256x256) RAW|AppMag = 20|Filename = x"
    tifffile.imwrite(slides / f"{unknown}.svs", pixels, tile=(256, 256), photometric="rgb", description=aperio)
    with open_slide(slides / f"{unknown}.svs") as slide:
        assert slide.mpp is None and slide.objective_power == 20
    cohort = SlideCohort(root / "labels.csv", slides)
    with pytest.raises(ValueError, match=r"microns per pixel unknown .*20x objective.*mpp_from_objective"):
        cohort.patches(TilingConfig(mpp=1.0, patch_size=64), tmp_path / "grids")
    with pytest.warns(UserWarning, match=rf"{unknown}\.svs: no mpp in its metadata; assuming 0.5 um/px from its 20x"):
        levels = _levels(cohort, TilingConfig(mpp=1.0, patch_size=64, mpp_from_objective=True), tmp_path / "grids")
    assert levels == {known: 128.0, unknown: 128.0}
    # the objective comes before the plain override, which still serves files with neither
    tiling = TilingConfig(mpp=1.0, patch_size=64, mpp_from_objective=True, mpp_override=0.4)
    with pytest.warns(UserWarning, match="assuming 0.5 um/px"):
        assert _levels(cohort, tiling, tmp_path / "grids") == {known: 128.0, unknown: 128.0}
