"""Slide ids from users' CSVs as file names: hostile ids never write outside their folder, and never share a file."""

from __future__ import annotations

import numpy as np
import pytest

from data_modules.datasets.feature_cache import FeatureCache
from data_modules.io import safe_name

HOSTILE = [
    "..",
    ".",
    "../escape",
    "../../../../escape2",
    "/abs/path",
    "a//b",
    "a/../../b",
    "a\\b",
    "C:\\slides\\x",
    ".hidden",
    "näïve σ 切片",
    "x" * 300,
    "y" * 300,
    "%2E%2E",
    "a%2Fb",
    "a/b",
    "TCGA-AB-1234/slide-01",
    "ends-with-slash/",
    "tab\tand\nnewline",
]


def test_every_id_maps_to_a_plain_relative_path_of_short_parts():
    for slide_id in HOSTILE:
        name = safe_name(slide_id)
        parts = name.split("/")
        assert all(part not in ("", ".", "..") and not part.startswith(".") for part in parts), slide_id
        assert all(len(part.encode()) <= 200 for part in parts) and "\\" not in name and "\n" not in name
        assert safe_name(slide_id) == name  # stable
    assert safe_name("slide_001") == "slide_001" and safe_name("TCGA-AB-1234/slide-01") == "TCGA-AB-1234/slide-01"


def test_names_are_unique():
    names = [safe_name(s) for s in HOSTILE]
    assert len(set(names)) == len(HOSTILE)


@pytest.mark.parametrize("slide_id", HOSTILE)
def test_the_feature_cache_keeps_every_id_inside_its_folder(tmp_path, slide_id):
    cache = FeatureCache(tmp_path / "cache" / "key")
    writer = cache.writer(slide_id, 3, 2, "float32", {"slide_id": slide_id})
    writer.append(np.ones((3, 2), np.float32), np.zeros((3, 2), np.int32))
    writer.commit()
    assert cache.has(slide_id) and cache.read(slide_id).attrs["slide_id"] == slide_id
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(p.resolve().is_relative_to(cache.path.resolve()) for p in written)
