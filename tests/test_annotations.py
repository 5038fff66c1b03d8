"""Ground truth through one door (`data_modules.annotations`): QuPath GeoJSON and ASAP XML, found by the labels CSV's
`annotations` column or a folder, and the synthetic cohort's truth written and read back through it, patch for patch
the generator's own."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from shapely.geometry import shape

from data_modules.annotations import locate_annotations, read_annotations, write_geojson
from data_modules.cohort import read_labels
from data_modules.synthetic import CohortSpec, make_cohort, slide_infos, tumour_mask, tumour_patches

SQUARE = {"type": "Polygon", "coordinates": [[[0, 0], [400, 0], [400, 400], [0, 400], [0, 0]]]}
HOLE = {"type": "Polygon", "coordinates": [[[100, 100], [300, 100], [300, 300], [100, 300], [100, 100]]]}


def _feature(geometry: dict, name: str | None = "Tumor", kind: str = "annotation") -> dict:
    properties = {"objectType": kind} | ({"classification": {"name": name, "color": [200, 0, 0]}} if name else {})
    return {
        "type": "Feature",
        "id": "5b4a2f0e-0000-4000-8000-000000000000",
        "geometry": geometry,
        "properties": properties,
    }


def test_the_generator_writes_its_truth_as_qupath_geojson_and_reads_back_its_own_patch_truth(tmp_path):
    root = make_cohort(tmp_path / "cohort", CohortSpec(n_slides=4, size=(1024, 1024), positive_fraction=0.5))
    rows = read_labels(root / "labels.csv")
    files = locate_annotations(rows, root / "labels.csv")
    assert sorted(files) == [r.slide_id for r in rows] and all(r.annotations for r in rows)
    infos, rng = slide_infos(root), np.random.default_rng(0)
    for slide_id, path in files.items():
        info, truth = infos[slide_id], read_annotations(path)
        assert json.loads(path.read_text())["type"] == "FeatureCollection"
        assert truth.tumour.is_empty == (not info.tumour)  # a normal slide: annotated, no tumour
        assert truth.tumour.area == pytest.approx(tumour_mask(info, 4).sum() * 16)
        coords = rng.integers(-64, 1024, (2000, 2))
        for side in (32, 64, 100):
            np.testing.assert_array_equal(truth.patch_truth(coords, side), tumour_patches(info, coords, side))
    assert any(info.tumour for info in infos.values()) and not all(info.tumour for info in infos.values())


@pytest.mark.parametrize("layout", ["collection", "list", "feature", "geometry"])
def test_qupath_geojson_in_each_layout_qupath_writes(tmp_path, layout):
    features = [_feature(SQUARE), _feature(HOLE, "Ignore*"), _feature({"type": "Point", "coordinates": [5, 5]})]
    data = {
        "collection": {"type": "FeatureCollection", "features": features},
        "list": features,  # QuPath before 0.4
        "feature": features[0],
        "geometry": SQUARE,
    }[layout]
    (tmp_path / "a.geojson").write_text(json.dumps(data))
    truth = read_annotations(tmp_path / "a.geojson")
    holed = layout in ("collection", "list")  # the Ignore* region is cut out of the tumour
    assert truth.tumour.area == 400 * 400 - (200 * 200 if holed else 0)
    coords = np.array([[0, 0], [150, 150], [350, 0], [380, 380], [1000, 1000]])
    fractions = truth.patch_fraction(coords, 40)
    assert fractions.tolist() == [1.0, 0.0 if holed else 1.0, 1.0, 0.25, 0.0]
    assert shape(truth.outline()).equals(truth.tumour)


def test_asap_xml_as_camelyon16_writes_it(tmp_path):
    """Groups `_0` and `_1` are tumour; `_2` is an exclusion inside it; dots mark nothing."""

    def annotation(group: str, points: list, kind: str = "Polygon") -> str:
        coords = "".join(f'<Coordinate Order="{k}" X="{x}" Y="{y}" />' for k, (x, y) in enumerate(points))
        head = f'<Annotation Name="a" Type="{kind}" PartOfGroup="{group}" Color="#F4FA58">'
        return f"{head}<Coordinates>{coords}</Coordinates></Annotation>"

    xml = (
        '<?xml version="1.0"?><ASAP_Annotations><Annotations>'
        + annotation("_0", [(0, 0), (400, 0), (400, 400), (0, 400)])
        + annotation("_1", [(1000, 1000), (1100, 1000), (1100, 1100), (1000, 1100)])
        + annotation("_2", [(100, 100), (300, 100), (300, 300), (100, 300)])
        + annotation("_0", [(2000, 2000)], "Dot")
        + '</Annotations><AnnotationGroups><Group Name="_0" PartOfGroup="None" Color="#FF0000" /></AnnotationGroups>'
        "</ASAP_Annotations>"
    )
    (tmp_path / "tumor_001.xml").write_text(xml)
    truth = read_annotations(tmp_path / "tumor_001.xml")
    assert truth.tumour.area == 400 * 400 - 200 * 200 + 100 * 100
    assert truth.patch_truth(np.array([[0, 0], [150, 150], [1000, 1000]]), 40).tolist() == [True, False, True]


def test_a_row_cell_or_a_folder_names_each_slide_s_annotations(tmp_path):
    (tmp_path / "qupath").mkdir()
    write_geojson(tmp_path / "qupath" / "a.geojson", SQUARE)
    write_geojson(tmp_path / "folder" / "b.geojson", HOLE)
    write_geojson(tmp_path / "folder" / "TCGA" / "01.geojson", None)  # a nested id: its safe name keeps the folder
    (tmp_path / "folder" / "c.xml").write_text("<ASAP_Annotations><Annotations /></ASAP_Annotations>")
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label,annotations\na,1,qupath/a.geojson\nb,1,\nc,0,\nTCGA/01,0,\nd,0,\n")
    rows = read_labels(labels)
    assert locate_annotations(rows, labels) == {"a": tmp_path / "qupath" / "a.geojson"}
    found = locate_annotations(rows, labels, tmp_path / "folder")
    assert found == {
        "a": tmp_path / "qupath" / "a.geojson",
        "b": tmp_path / "folder" / "b.geojson",
        "c": tmp_path / "folder" / "c.xml",
        "TCGA/01": tmp_path / "folder" / "TCGA" / "01.geojson",
    }  # d: no file, no truth
    assert read_annotations(found["c"]).tumour.is_empty and read_annotations(found["TCGA/01"]).outline() is None


def test_bad_annotations_get_one_line_naming_the_file(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label,annotations\na,1,gone.geojson\n")
    with pytest.raises(ValueError, match=r"labels.csv:2: column annotations: no file .*gone.geojson"):
        locate_annotations(read_labels(labels), labels)
    with pytest.raises(ValueError, match=r"annotations: .*nowhere is not a folder"):
        locate_annotations([], labels, tmp_path / "nowhere")
    (tmp_path / "bad.geojson").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.geojson: not GeoJSON"):
        read_annotations(tmp_path / "bad.geojson")
    (tmp_path / "bad.xml").write_text("<ASAP_Annotations>")
    with pytest.raises(ValueError, match=r"bad.xml: not ASAP XML"):
        read_annotations(tmp_path / "bad.xml")
    (tmp_path / "mask.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"mask.png: annotations must be QuPath GeoJSON"):
        read_annotations(tmp_path / "mask.png")
    assert shapely.is_valid(read_annotations(write_geojson(tmp_path / "ok.geojson", SQUARE)).tumour)
