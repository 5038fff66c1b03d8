"""Ground truth beside a slide: region annotations -> geometry, outlines and patch-level truth.

The one door through which truth enters: heatmaps, the QuPath export, the viewer, the patch probes and SSL's probe
read it here, for a real cohort as for the synthetic one (whose generator writes its tumour masks through
`write_geojson`). A slide's file is its labels CSV row's `annotations` cell (a path, relative to the CSV), else
`<folder>/<slide id>.geojson` (or `.json`, `.xml`) in the `annotations` folder a data module is given.

Two formats, in level-0 pixels: QuPath GeoJSON as QuPath exports it (a FeatureCollection, a list of features, one
feature or a bare geometry; polygons and multipolygons, holes kept) and ASAP XML, the format of Camelyon16's masks.
Every region is tumour except those named as exclusions (`EXCLUDED`: QuPath's `Ignore*` class, ASAP's group `_2`,
Camelyon16's non-tumour islands inside tumour), which are cut out of it. A file with no region says the slide was
annotated and holds no tumour; a slide without a file has no truth.
"""

from __future__ import annotations

import functools
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import mapping, shape

from .io import atomic_write, id_key, safe_name
from .slides.outlines import plain

__all__ = [
    "ANNOTATION_SUFFIXES",
    "EXCLUDED",
    "Annotations",
    "annotations_of",
    "box_fraction",
    "locate_annotations",
    "read_annotations",
    "write_geojson",
]

ANNOTATION_SUFFIXES = (".geojson", ".json", ".xml")
EXCLUDED = ("ignore", "ignore*", "exclusion", "exclude", "_2")  # class or group names cut out of the tumour (id_key)
TRUTH_DOWNSAMPLE = 4  # patch fractions are counted on a grid this much coarser than level 0 (the generator's too)
_TUMOUR = {"name": "Tumor", "color": [200, 0, 0]}  # QuPath's built-in class, as its exports name it


@dataclass(frozen=True)
class Annotations:
    """A slide's tumour as one shapely geometry in level-0 pixels (empty: annotated, no tumour)."""

    tumour: shapely.Geometry
    source: Path | None = None

    def outline(self) -> dict | None:
        """The tumour as a GeoJSON geometry (lists of floats), None where there is none."""
        return None if self.tumour.is_empty else plain(mapping(self.tumour))

    def patch_fraction(self, coords: np.ndarray, side: float, downsample: int = TRUTH_DOWNSAMPLE) -> np.ndarray:
        """(N,): the share of each square patch (level-0 top-left `coords`, `side` level-0 pixels) inside the tumour,
        counted on a mask `downsample` times coarser than level 0 (a mask pixel is in where its centre is)."""
        coords = np.asarray(coords, np.float64).reshape(-1, 2)
        if self.tumour.is_empty or len(coords) == 0:
            return np.zeros(len(coords))
        x0, y0, x1, y1 = self.tumour.bounds
        ox, oy = int(x0 // downsample), int(y0 // downsample)  # the mask covers the tumour's bounds only
        xs = (np.arange(ox, int(x1 // downsample) + 1) * downsample + (downsample - 1) / 2).astype(np.float64)
        ys = (np.arange(oy, int(y1 // downsample) + 1) * downsample + (downsample - 1) / 2).astype(np.float64)
        gx, gy = np.meshgrid(xs, ys)
        shapely.prepare(self.tumour)
        mask = shapely.contains_xy(self.tumour, gx, gy)
        return box_fraction(mask, coords - np.array([ox, oy]) * downsample, side, downsample)

    def patch_truth(self, coords: np.ndarray, side: float) -> np.ndarray:
        """(N,) bool: the patches at least half inside the tumour, the patch-level truth every measurement uses."""
        return self.patch_fraction(coords, side) >= 0.5


def box_fraction(mask: np.ndarray, coords: np.ndarray, side: float, downsample: float) -> np.ndarray:
    """(N,): the mean of `mask` (a grid `downsample` times coarser than level 0, origin at level-0 (0, 0)) over each
    square of top-left `coords` and `side` level-0 pixels, in O(1) a patch; outside the mask counts as False."""
    integral = np.pad(np.asarray(mask, bool).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = np.shape(mask)
    cell = max(1, round(side / downsample))
    x0 = (np.asarray(coords[:, 0]) // downsample).astype(int)
    y0 = (np.asarray(coords[:, 1]) // downsample).astype(int)
    x0, x1 = np.clip(x0, 0, w), np.clip(x0 + cell, 0, w)
    y0, y1 = np.clip(y0, 0, h), np.clip(y0 + cell, 0, h)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / (cell * cell)


def read_annotations(path: str | os.PathLike) -> Annotations:
    """A slide's annotations from a QuPath GeoJSON or ASAP XML file; read once per version of the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: annotations file not found")
    if path.suffix.lower() not in ANNOTATION_SUFFIXES:
        raise ValueError(f"{path}: annotations must be QuPath GeoJSON (.geojson, .json) or ASAP XML (.xml)")
    return _read(str(path.resolve()), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _read(path: str, mtime_ns: int) -> Annotations:
    regions = _xml_regions(Path(path)) if path.lower().endswith(".xml") else _geojson_regions(Path(path))
    positive = [g for g, name in regions if id_key(name or "") not in EXCLUDED]
    excluded = [g for g, name in regions if id_key(name or "") in EXCLUDED]
    tumour = shapely.union_all(positive) if positive else shapely.Polygon()
    if excluded:
        tumour = shapely.difference(tumour, shapely.union_all(excluded))
    return Annotations(tumour, Path(path))


def _geojson_regions(path: Path) -> list[tuple[shapely.Geometry, str | None]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not GeoJSON ({error})") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features") or []
    elif isinstance(data, list):  # QuPath before 0.4 exports a bare list of features
        features = data
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and "coordinates" in data:
        features = [{"type": "Feature", "geometry": data, "properties": {}}]
    else:
        raise ValueError(f"{path}: expected a GeoJSON FeatureCollection, a list of features, a feature or a geometry")
    regions = []
    for k, feature in enumerate(features):
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        if geometry is None or geometry.get("type") not in ("Polygon", "MultiPolygon", "GeometryCollection"):
            continue  # points and lines mark, but enclose nothing
        try:
            region = shapely.make_valid(shape(geometry))
        except (ValueError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}: feature {k}: not a polygon ({error})") from None
        properties = feature.get("properties") or {}
        classification = properties.get("classification") or {}
        regions.append((region, classification.get("name") if isinstance(classification, dict) else None))
    return regions


def _xml_regions(path: Path) -> list[tuple[shapely.Geometry, str | None]]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise ValueError(f"{path}: not ASAP XML ({error})") from None
    regions = []
    for annotation in root.iter("Annotation"):
        if annotation.get("Type", "Polygon") in ("Dot", "PointSet"):
            continue
        points = [(float(c.get("X")), float(c.get("Y"))) for c in annotation.iter("Coordinate")]
        if len(points) >= 3:
            regions.append((shapely.make_valid(shapely.Polygon(points)), annotation.get("PartOfGroup")))
    return regions


def write_geojson(path: str | os.PathLike, tumour: dict | None) -> Path:
    """A slide's tumour (a GeoJSON geometry, None for none) as QuPath GeoJSON: a FeatureCollection of one `Tumor`
    annotation, or of none (annotated, no tumour). Written whole."""
    features = []
    if tumour is not None:
        properties = {"objectType": "annotation", "classification": _TUMOUR}
        features.append({"type": "Feature", "geometry": tumour, "properties": properties})
    return atomic_write(path, json.dumps({"type": "FeatureCollection", "features": features}))


def locate_annotations(
    rows: Sequence, labels: str | os.PathLike, folder: str | os.PathLike | None = None
) -> dict[str, Path]:
    """Slide id -> annotations file of each row that has one: its `annotations` cell (`~` expanded, relative to the
    CSV's folder; the file must exist), else `<folder>/<safe name of the id>` with a suffix of
    `ANNOTATION_SUFFIXES` where such a file exists."""
    labels = Path(labels)
    root = None if folder is None else Path(folder).expanduser()
    if root is not None and not root.is_dir():
        raise ValueError(f"annotations: {root} is not a folder")
    found: dict[str, Path] = {}
    for row in rows:
        cell = getattr(row, "annotations", None)
        if cell is not None:
            path = Path(cell).expanduser()
            path = path if path.is_absolute() else labels.parent / path
            if not path.is_file():
                raise ValueError(f"{labels}:{row.line}: column annotations: no file {path}")
            found[row.slide_id] = path
        elif root is not None:
            name = safe_name(row.slide_id)
            path = next((root / f"{name}{s}" for s in ANNOTATION_SUFFIXES if (root / f"{name}{s}").is_file()), None)
            if path is not None:
                found[row.slide_id] = path
    return found


def annotations_of(files: Mapping[str, Path], slide_id: str) -> Annotations | None:
    """The annotations of one slide of a cohort (`locate_annotations`), None where it has none."""
    path = files.get(slide_id)
    return None if path is None else read_annotations(path)
