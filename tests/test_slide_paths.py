"""Slides anywhere on disk: a labels CSV's `path` cells, several slide folders searched recursively (TCGA nests by
project and case), DICOM WSI folders, and the clear errors of an id with no file, two files, or a file with two ids.
Files that are never opened are empty; the one test that tiles writes a small real TIFF."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from data_modules.cohort import SlideCohort, locate_slides, read_labels, slide_roots
from data_modules.cohort import finder as finder_module
from data_modules.slides.tiling import TilingConfig
from helpers import CONF, write_labels
from icmil_pl.cli import main


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _labels(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_labels(path, [(slide_id, "0", cell) for slide_id, cell in rows], ("slide_id", "label", "path"))


def test_a_path_cell_is_absolute_relative_to_the_csv_or_under_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    far = _touch(tmp_path / "scanner" / "x" / "a.svs")
    near = _touch(tmp_path / "study" / "scans" / "b.ndpi")
    home = _touch(tmp_path / "home" / "c.tif")
    found = _touch(tmp_path / "slides" / "d.svs")
    labels = _labels(
        tmp_path / "study" / "meta" / "labels.csv",
        [("a", str(far)), ("b", "../scans/b.ndpi"), ("c", "~/c.tif"), ("d", "")],
    )
    assert [row.path for row in read_labels(labels)] == [str(far), "../scans/b.ndpi", "~/c.tif", None]
    cohort = SlideCohort(labels, tmp_path / "slides")
    assert {k: p.resolve() for k, p in cohort.paths.items()} == {
        k: p.resolve() for k, p in {"a": far, "b": near, "c": home, "d": found}.items()
    }
    assert SlideCohort(labels, str(tmp_path / "slides")).roots == (tmp_path / "slides",)


def test_a_path_cell_without_its_file_names_the_csv_line_and_column(tmp_path):
    labels = _labels(tmp_path / "labels.csv", [("a", str(_touch(tmp_path / "a.svs"))), ("b", "scans/b.svs")])
    with pytest.raises(
        ValueError,
        match=rf"^{re.escape(str(labels))}:3: column path: no file "
        rf"{re.escape(str(tmp_path / 'scans' / 'b.svs'))}$",
    ):
        SlideCohort(labels)


@pytest.fixture
def tcga(tmp_path) -> Path:
    """`root/<project>/<case>/<slide>.<ext>`, one extension in capitals, and hidden copies that must not count."""
    root = tmp_path / "tcga"
    for project, case, slide in [
        ("TCGA-BRCA", "case-01", "s1.svs"),
        ("TCGA-BRCA", "case-02", "s2.SVS"),
        ("TCGA-LUAD", "case-03", "s3.ome.tiff"),
        ("TCGA-LUAD", "case-04", "s4.ndpi"),
    ]:
        _touch(root / project / case / slide)
    _touch(root / ".trash" / "s1.svs")  # hidden folders are not searched: s1 has one file
    _touch(root / "TCGA-BRCA" / "case-01" / ".s2.svs")  # nor hidden files
    return root


def test_slides_are_found_anywhere_below_a_root_with_one_walk(tcga, tmp_path, monkeypatch):
    walks = []
    walk = os.walk
    monkeypatch.setattr(finder_module.os, "walk", lambda top, **kw: walks.append(top) or walk(top, **kw))
    labels = _labels(tmp_path / "labels.csv", [("s1", ""), ("s2", ""), ("s3", ""), ("TCGA-LUAD/case-04/s4", "")])
    cohort = SlideCohort(labels, tcga)
    assert cohort.paths == {
        "s1": tcga / "TCGA-BRCA" / "case-01" / "s1.svs",
        "s2": tcga / "TCGA-BRCA" / "case-02" / "s2.SVS",
        "s3": tcga / "TCGA-LUAD" / "case-03" / "s3.ome.tiff",
        "TCGA-LUAD/case-04/s4": tcga / "TCGA-LUAD" / "case-04" / "s4.ndpi",
    }
    assert walks == [tcga]  # one index for every slide, not a walk per slide
    walks.clear()
    flat = _touch(tmp_path / "flat" / "s9.svs").parent
    assert SlideCohort(_labels(tmp_path / "flat.csv", [("s9", "")]), flat).paths == {"s9": flat / "s9.svs"}
    assert walks == []  # `<root>/<id>.<ext>`: found without a search


def test_several_roots_and_a_folder_linked_into_itself(tcga, tmp_path):
    other = tmp_path / "other"
    _touch(other / "batch2" / "s5.tif")
    (other / "batch2" / "loop").symlink_to(other, target_is_directory=True)  # walked once: s5 has one file
    labels = _labels(tmp_path / "labels.csv", [("s1", ""), ("s5", "")])
    assert SlideCohort(labels, [tcga, other]).paths == {
        "s1": tcga / "TCGA-BRCA" / "case-01" / "s1.svs",
        "s5": other / "batch2" / "s5.tif",
    }
    assert slide_roots(["~/a", Path("b")]) == (Path.home() / "a", Path("b")) and slide_roots(None) == ()


def test_an_id_with_two_files_or_none_is_refused(tcga, tmp_path):
    _touch(tcga / "TCGA-LUAD" / "case-09" / "s1.tif")
    labels = _labels(tmp_path / "labels.csv", [("s2", ""), ("s1", "")])
    two = sorted([tcga / "TCGA-BRCA" / "case-01" / "s1.svs", tcga / "TCGA-LUAD" / "case-09" / "s1.tif"])
    with pytest.raises(ValueError, match=re.escape(f"{labels}:3: slide 's1' matches 2 files ({two[0]}, {two[1]})")):
        SlideCohort(labels, tcga)
    first, second = _touch(tmp_path / "r1" / "s7.svs"), _touch(tmp_path / "r2" / "s7.svs")  # at two roots' tops
    with pytest.raises(ValueError, match=re.escape(f"matches 2 files ({first}, {second})")):
        SlideCohort(_labels(tmp_path / "top.csv", [("s7", "")]), [first.parent, second.parent])
    labels = _labels(tmp_path / "missing.csv", [("s2", ""), ("nope", "")])
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{labels}:3: slide 'nope' has no file in or below {tcga}, {first.parent} (looked for nope{{.svs,"
        ),
    ):
        SlideCohort(labels, [tcga, first.parent])
    with pytest.raises(ValueError, match=rf"^slides: {re.escape(str(tmp_path / 'typo'))} is not a folder$"):
        SlideCohort(labels, [tcga, tmp_path / "typo"])


def test_a_dicom_wsi_is_its_folder_of_dcm_files(tmp_path):
    root = tmp_path / "slides"
    for level in ("level-0.dcm", "level-1.DCM"):
        _touch(root / "project" / "d1" / level)
        _touch(tmp_path / "elsewhere" / "d2" / level)
    _touch(root / "d3" / "level-0.dcm")
    (tmp_path / "elsewhere" / "d2x").mkdir()  # a folder, but no DICOM WSI
    labels = _labels(
        tmp_path / "labels.csv",
        [("d1", ""), ("d2", str(tmp_path / "elsewhere/d2/level-1.DCM")), ("d3", ""), ("d4", "elsewhere/d2x")],
    )
    with pytest.raises(ValueError, match=r"labels\.csv:5: column path: .*d2x is a folder without \.dcm files"):
        SlideCohort(labels, root)
    labels = _labels(labels, [("d1", ""), ("d2", str(tmp_path / "elsewhere/d2/level-1.DCM")), ("d3", "")])
    assert SlideCohort(labels, root).paths == {
        "d1": root / "project" / "d1",  # found by the search
        "d2": tmp_path / "elsewhere" / "d2",  # one instance named: its folder
        "d3": root / "d3",  # found directly
    }
    instances = _labels(tmp_path / "instances.csv", [("level-0", "")])  # an instance is no slide of its own
    with pytest.raises(ValueError, match=r"slide 'level-0' has no file in or below"):
        SlideCohort(instances, root)


def test_two_rows_naming_one_file_are_refused(tcga, tmp_path):
    s1 = tcga / "TCGA-BRCA" / "case-01" / "s1.svs"
    again = f"{tcga}/TCGA-LUAD/../TCGA-BRCA/case-01/s1.svs"
    labels = _labels(tmp_path / "labels.csv", [("a", str(s1)), ("s2", ""), ("c", again)])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(labels))}: slides 'a' \(line 2\) and 'c' \(line 4\) are"):
        SlideCohort(labels, tcga)
    labels = _labels(tmp_path / "found.csv", [("s1", ""), ("other", str(s1))])  # one searched, one named
    with pytest.raises(ValueError, match=r"slides 's1' \(line 2\) and 'other' \(line 3\) are one file"):
        SlideCohort(labels, tcga)


def test_slides_may_be_omitted_when_every_row_has_a_path(tcga, tmp_path):
    s1, s2 = tcga / "TCGA-BRCA" / "case-01" / "s1.svs", tcga / "TCGA-BRCA" / "case-02" / "s2.SVS"
    labels = _labels(tmp_path / "labels.csv", [("s1", str(s1)), ("s2", str(s2))])
    assert SlideCohort(labels).paths == {"s1": s1, "s2": s2} and SlideCohort(labels).roots == ()
    labels = _labels(tmp_path / "partly.csv", [("s1", str(s1)), ("s2", ""), ("s8", "")])
    with pytest.raises(ValueError, match=r"partly\.csv:3: slide 's2' has no path cell, and no slides folder"):
        SlideCohort(labels)
    rows = read_labels(labels)  # heatmaps only (feature bags): slides without a file are left out, not refused
    assert locate_slides(rows, labels, (), required=False) == {"s1": s1}
    assert locate_slides(rows, labels, (tcga, tmp_path / "gone"), required=False) == {"s1": s1, "s2": s2}


def test_nested_slides_with_one_file_name_keep_their_ids_and_grids_apart(tmp_path):
    """Two cases' `slide.tif`: each grid is cached under a key of its full path, outputs are named by slide id."""
    pixels = np.full((512, 512, 3), 255, np.uint8)
    pixels[64:448, 64:448] = (200, 80, 150)
    tifffile.imwrite(tmp_path / "slide.tif", pixels, tile=(256, 256), photometric="rgb")
    for case in ("case-1", "case-2"):
        (tmp_path / "root" / case).mkdir(parents=True)
        shutil.copy(tmp_path / "slide.tif", tmp_path / "root" / case / "slide.tif")
    labels = _labels(tmp_path / "labels.csv", [("case-1/slide", ""), ("two", "root/case-2/slide.tif")])
    patches = SlideCohort(labels, tmp_path / "root").patches(
        TilingConfig(mpp=2.0, patch_size=64, mpp_override=2.0), tmp_path / "grids"
    )
    assert [(p.slide_id, p.path.parent.name) for p in patches] == [("case-1/slide", "case-1"), ("two", "case-2")]
    assert len(list((tmp_path / "grids").glob("slide.tif.*.grid.npz"))) == 2


def test_a_yaml_list_of_slide_folders_parses(tmp_path, capsys):
    config = tmp_path / "roots.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"init_args": {"labels": "l.csv", "slides": ["/a", "/b/c"], "grid_cache": "g"}},
                "trainer": {"callbacks": [{"class_path": "FeatureWriter", "init_args": {"cache_root": "c"}}]},
            }
        )
    )

    def printed(*args: str) -> dict:
        with pytest.raises(SystemExit) as exit_info:
            main(["predict", "-c", str(CONF / "extract.yaml"), "-c", str(config), *args, "--print_config"])
        assert exit_info.value.code in (0, None)
        return yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]

    assert printed()["slides"] == ["/a", "/b/c"]
    assert printed("--data.init_args.slides=/one")["slides"] == "/one"


def test_the_format_table_is_what_the_finder_and_open_slide_read(tmp_path):
    """One row per format: every extension of the table is found by the finder in any letter case, a DICOM instance
    stands for its folder, and the reader is the row's (a TIFF sniffed for vendor dialects)."""
    from data_modules.slides.formats import FORMATS, SLIDE_EXTENSIONS, reader_for, slide_format

    assert slide_format("A.OME.TIFF").name == "OME-TIFF" and slide_format("a.tiff").extensions == (".tif", ".tiff")
    assert slide_format("notes.txt") is None
    for fmt in FORMATS:
        for k, ext in enumerate(fmt.extensions):
            slide_id = f"{fmt.extensions[0][1:].replace('.', '_')}{k}"
            if fmt.folder:
                (tmp_path / slide_id).mkdir()
                (tmp_path / slide_id / f"level0{ext.upper()}").write_bytes(b"")
                expected = tmp_path / slide_id
            else:
                expected = tmp_path / "deep" / f"{slide_id}{ext.upper()}"
                expected.parent.mkdir(exist_ok=True)
                expected.write_bytes(b"")
            assert finder_module.find_slide(tmp_path, slide_id) == expected, fmt.name
            if fmt.reader == "openslide" and fmt.check is None:
                assert reader_for(expected) == "openslide", fmt.name
    assert len(SLIDE_EXTENSIONS) == sum(len(fmt.extensions) for fmt in FORMATS)
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((8, 8, 3), np.uint8))
    assert reader_for(tmp_path / "plain.tif") == "tifffile"
    with pytest.raises(ValueError, match=r"an MRXS slide needs its data folder beside it"):
        reader_for(tmp_path / "deep" / "mrxs0.MRXS")


def test_modules_moved_into_folders_keep_their_old_paths(tmp_path):
    """Run configs saved before the move name `data_modules.slide_bags.SlideBagDataModule`: the old path is the same
    module, so a resumed or compared run resolves its classes."""
    import importlib

    from data_modules.datasets.slide_bags import SlideBagDataModule
    from data_modules.slides.tiling import TilingConfig as Tiling

    assert importlib.import_module("data_modules.slide_bags").SlideBagDataModule is SlideBagDataModule
    assert importlib.import_module("data_modules.tiling").TilingConfig is Tiling
    assert importlib.import_module("data_modules.file_names").safe_name("../x") == "%2E.%2Fx"
