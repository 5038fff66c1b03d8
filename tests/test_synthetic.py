"""The synthetic cohort generator writes real WSI files (OpenSlide and tifffile agree) with known ground truth."""

import csv
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import zarr
from scipy import ndimage
from skimage.filters import threshold_otsu

from data_modules import synthetic
from data_modules.synthetic import (
    CohortSpec,
    make_cohort,
    patch_tumour_fraction,
    render_region,
    tissue_mask,
    tumour_mask,
    write_slide,
)
from data_modules.synthetic.__main__ import main as command_line
from data_modules.synthetic.scene import Scene, cached_scene


def _levels(path: Path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        return [level.asarray() for level in tif.series[0].levels]


def _openslide_rgb(slide: openslide.OpenSlide, level: int) -> np.ndarray:
    return np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]))[..., :3]


def test_same_seed_same_pixels_other_seed_differs(tmp_path):
    a = write_slide(tmp_path / "a.svs", CohortSpec(size=(600, 500), tile_size=128), seed=1, tumour=True)
    cached_scene.cache_clear()  # rebuild the procedural slide from the seed
    b = write_slide(tmp_path / "b.svs", CohortSpec(size=(600, 500), tile_size=128), seed=1, tumour=True)
    c = write_slide(tmp_path / "c.svs", CohortSpec(size=(600, 500), tile_size=128), seed=2, tumour=True)
    assert a.tumour_boxes == b.tumour_boxes and a.tissue_fraction == b.tissue_fraction
    for x, y, z in zip(_levels(a.path), _levels(b.path), _levels(c.path), strict=True):
        assert np.array_equal(x, y)
        assert np.abs(x.astype(int) - z).mean() > 10


@pytest.mark.parametrize(
    ("flavour", "compression", "mpp", "vendor"),
    [
        ("svs", "jpeg", 0.5, "aperio"),
        ("svs", "jpeg2000", 0.25, "aperio"),
        ("svs", "deflate", 0.5, "aperio"),
        ("tiff", "jpeg", 0.5, "generic-tiff"),
        ("tiff", "lzw", 1.0, "generic-tiff"),
    ],
)
def test_openslide_reads_what_tifffile_reads(tmp_path, flavour, compression, mpp, vendor):
    info = write_slide(
        tmp_path / f"s{synthetic.EXTENSIONS[flavour]}",
        CohortSpec(size=(1500, 1200), mpp=mpp, compression=compression, tile_size=256),
        seed=3,
        tumour=True,
        flavour=flavour,
    )
    assert info.level_dimensions == ((1500, 1200), (375, 300))
    levels = _levels(info.path)
    with openslide.OpenSlide(info.path) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == vendor
        assert slide.level_count == 2
        assert slide.level_dimensions == info.level_dimensions
        assert slide.level_downsamples == (1.0, 4.0)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(mpp)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(mpp)
        for level, pixels in enumerate(levels):
            assert np.array_equal(_openslide_rgb(slide, level), pixels)  # identical decoding, no colour drift
        if flavour == "svs":
            assert slide.properties["aperio.AppMag"] == str(round(10 / mpp))
            assert set(slide.associated_images) == {"thumbnail", "label", "macro"}
            assert slide.associated_images["thumbnail"].size == (375, 300)
    lossy = compression in ("jpeg", "jpeg2000")
    error = np.abs(levels[0].astype(int) - render_region(info, (0, 0), (1500, 1200))).mean()
    assert error < 2.5 if lossy else error == 0


@pytest.mark.parametrize("compression", ["lzw", "jpeg2000"])
def test_ome_levels_and_physical_size(tmp_path, compression):
    info = write_slide(
        tmp_path / "s.ome.tif",
        CohortSpec(size=(1500, 1200), mpp=0.25, compression=compression, tile_size=128),
        seed=3,
        tumour=False,
        flavour="ome",
        levels=3,
    )
    with tifffile.TiffFile(info.path) as tif:
        assert tif.is_ome and len(tif.pages) == 1  # the lower levels are SubIFDs
        series = tif.series[0]
        assert [level.shape for level in series.levels] == [(1200, 1500, 3), (300, 375, 3), (75, 94, 3)]
        pixels = tif.ome_metadata.split("<Pixels ")[1]
        assert 'PhysicalSizeX="0.25"' in pixels and 'PhysicalSizeY="0.25"' in pixels
        assert 'PhysicalSizeXUnit="µm"' in pixels
        level2 = series.levels[2].asarray()
    expected = render_region(info, (0, 0), (94, 75), level=2)
    error = np.abs(level2.astype(int) - expected).mean()
    assert error == 0 if compression == "lzw" else error < 1


def test_lossless_files_hold_the_content_function_at_every_level_for_any_tile_size(tmp_path):
    infos = [
        write_slide(
            tmp_path / f"t{tile}.tif",
            CohortSpec(size=(1000, 700), compression="lzw", tile_size=tile),
            seed=5,
            tumour=True,
            flavour="tiff",
            levels=3,
        )
        for tile in (128, 256)
    ]
    assert infos[0].level_dimensions == infos[1].level_dimensions == ((1000, 700), (250, 175), (63, 44))
    for a, b, (w, h), level in zip(
        _levels(infos[0].path), _levels(infos[1].path), infos[0].level_dimensions, range(3), strict=True
    ):
        assert np.array_equal(a, b)
        assert np.array_equal(a, render_region(infos[0], (0, 0), (w, h), level=level))


def test_content_is_independent_of_how_the_region_is_cut(tmp_path):
    info = write_slide(
        tmp_path / "s.tif", CohortSpec(size=(1500, 1200), tile_size=128), seed=3, tumour=True, flavour="tiff"
    )
    bx, by, bw, bh = info.tumour_boxes[0]
    x0, y0, w, h = bx - 211, by - 97, 700, 500  # covers a tumour, normal tissue and (usually) the tissue edge
    whole = render_region(info, (x0, y0), (w, h))
    for step in (128, 100, 37):
        rows = [
            np.concatenate(
                [
                    render_region(info, (x0 + x, y0 + y), (min(step, w - x), min(step, h - y)))
                    for x in range(0, w, step)
                ],
                axis=1,
            )
            for y in range(0, h, step)
        ]
        assert np.array_equal(np.concatenate(rows), whole)
    # lower levels: any level-aligned window of the level equals the same window of the whole level
    level1 = render_region(info, (0, 0), info.level_dimensions[1], level=1)
    assert np.array_equal(render_region(info, (400, 200), (75, 60), level=1), level1[50:110, 100:175])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_tissue_fraction_otsu_mask_and_tumours_inside_tissue(tmp_path, seed):
    info = write_slide(tmp_path / "s.svs", CohortSpec(size=(1500, 1200), tile_size=256), seed=seed, tumour=True)
    assert 0.3 <= info.tissue_fraction <= 0.6
    tissue = tissue_mask(info, 1)
    assert abs(tissue.mean() - info.tissue_fraction) < 0.01
    # like on real H&E: Otsu on saturation of the (compressed) low-resolution level finds the tissue
    with openslide.OpenSlide(info.path) as slide:
        rgb = _openslide_rgb(slide, 1).astype(float)
    saturation = (rgb.max(-1) - rgb.min(-1)) / np.maximum(rgb.max(-1), 1)
    found, truth = saturation > threshold_otsu(saturation), tissue_mask(info, 4)
    assert (found & truth).sum() / (found | truth).sum() > 0.97
    tumour = tumour_mask(info, 1)
    assert 1 <= len(info.tumour_regions) <= 3
    assert tumour.any() and not (tumour & ~tissue).any()
    boxes = np.zeros_like(tumour)
    for x, y, w, h in info.tumour_boxes:
        boxes[y : y + h, x : x + w] = True
    assert not (tumour & ~boxes).any()
    labels, n = ndimage.label(tumour)
    areas = np.bincount(labels.ravel())[1:] / tissue.sum()
    assert n == len(info.tumour_regions) and ((0.008 < areas) & (areas < 0.06)).all()


def test_tumour_area_sets_the_witness_rate(tmp_path):
    for seed in range(3):
        info = write_slide(
            tmp_path / "s.tif",
            CohortSpec(size=(1024, 1024), tumour_area=(0.15, 0.25)),
            seed=seed,
            tumour=True,
            flavour="tiff",
            levels=1,
        )
        tumour, tissue = tumour_mask(info, 1), tissue_mask(info, 1)
        labels, _ = ndimage.label(tumour)
        areas = np.bincount(labels.ravel())[1:] / tissue.sum()
        assert 0.1 < areas.max() < 0.26 and not (tumour & ~tissue).any()


def test_normal_slides_have_no_tumour(tmp_path):
    info = write_slide(tmp_path / "s.svs", CohortSpec(size=(600, 500), tile_size=128), seed=4, tumour=False)
    assert info.tumour_regions == () and info.label == 0
    assert not tumour_mask(info, 2).any()
    assert tumour_mask(info, 2).shape == tissue_mask(info, 2).shape == (250, 300)


def _patches(image: np.ndarray, select: np.ndarray, size: int = 64) -> np.ndarray:
    h, w = select.shape
    return np.stack(
        [
            image[y : y + size, x : x + size]
            for y in range(0, h - size, size)
            for x in range(0, w - size, size)
            if select[y : y + size, x : x + size].all()
        ]
    ).astype(float)


def _best_threshold_accuracy(positive: np.ndarray, negative: np.ndarray) -> float:
    values = np.concatenate([positive, negative])
    accuracies = [((positive >= t).mean() + (negative < t).mean()) / 2 for t in np.unique(values)]
    return max(max(accuracies), 1 - min(accuracies))


def _nuclei(patches: np.ndarray) -> tuple[float, float]:
    """Nuclear pixel fraction and mean nucleus (connected component) area: hematoxylin-blue beats eosin-red."""
    nuclear = patches[..., 2] > patches[..., 0]
    areas = np.concatenate([np.bincount(ndimage.label(n)[0].ravel())[1:] for n in nuclear])
    return float(nuclear.mean()), float(areas.mean())


@pytest.mark.parametrize("contrast", [1.0, 0.0])
def test_tumour_differs_in_nuclei_not_in_mean_colour(tmp_path, contrast):
    info = write_slide(
        tmp_path / "s.tif",
        CohortSpec(size=(2048, 2048), tumour_contrast=contrast, compression="lzw"),
        seed=11,
        tumour=True,
        flavour="tiff",
        levels=1,
    )
    image = render_region(info, (0, 0), (2048, 2048))
    tumour, tissue = tumour_mask(info, 1), tissue_mask(info, 1)
    normal = tissue & (ndimage.distance_transform_edt(~tumour) > 32)
    colour_gap = np.abs(image[tumour].mean(0) - image[normal].mean(0))
    assert (colour_gap < 3).all(), colour_gap
    t, n = _patches(image, tumour), _patches(image, normal)
    assert len(t) >= 15 and len(n) >= 200
    # the patch mean colour barely separates the classes (0.5 is chance) ...
    for c in range(3):
        assert _best_threshold_accuracy(t.mean((1, 2))[:, c], n.mean((1, 2))[:, c]) < 0.7
    # ... the nuclei do, unless the contrast is 0
    (t_fraction, t_area), (n_fraction, n_area) = _nuclei(t), _nuclei(n)
    if contrast:
        assert t_fraction > 1.5 * n_fraction and t_area > 1.5 * n_area
    else:
        assert t_fraction == pytest.approx(n_fraction, rel=0.15) and t_area == pytest.approx(n_area, rel=0.25)


def test_two_tumour_types_differ_from_each_other_and_from_normal_in_nuclei_not_in_mean_colour(tmp_path):
    spec = CohortSpec(size=(2048, 2048), tumour_contrast=1.0, compression="lzw", tumour_types=2)
    info = write_slide(tmp_path / "s.tif", spec, seed=11, tumour=True, flavour="tiff", levels=1)
    assert sorted(r.kind for r in info.tumour_regions) == [0, 1, 1] and info.tumour_types == 2
    image = render_region(info, (0, 0), (2048, 2048))
    a, b, tissue = tumour_mask(info, 1, kind=0), tumour_mask(info, 1, kind=1), tissue_mask(info, 1)
    assert np.array_equal(a | b, tumour_mask(info, 1)) and not (a & b).any()
    normal = tissue & (ndimage.distance_transform_edt(~(a | b)) > 32)
    for kind in (a, b):  # within 4 grey levels: the type-a focus is small (8 whole patches)
        assert (np.abs(image[kind].mean(0) - image[normal].mean(0)) < 4).all()
    (a_fraction, a_area), (b_fraction, b_area), (n_fraction, n_area) = (
        _nuclei(_patches(image, m)) for m in (a, b, normal)
    )
    assert a_area > 1.5 * n_area and b_area < 0.8 * n_area  # large pleomorphic nuclei; small crowded ones
    assert b_fraction > 1.2 * n_fraction and a_fraction > 1.5 * n_fraction


def test_a_one_type_cohort_is_the_same_with_the_two_type_machinery(tmp_path):
    """A type-b palette block follows the others, so the one-type palette and pixels do not move; and a cohort.json
    written before tumour types (no `tumour_types`, no region `kind`) still loads and is reused."""
    one = Scene(11, (512, 512), 0.5, True, 1.0, (0.05, 0.4))
    two = Scene(11, (512, 512), 0.5, True, 1.0, (0.05, 0.4), types=2)
    assert np.array_equal(two.palette[: len(one.palette)], one.palette) and len(two.palette) > len(one.palette)
    assert [r.centre for r in two.tumour_regions] == [r.centre for r in one.tumour_regions]
    root = make_cohort(tmp_path, CohortSpec(n_slides=2, seed=0, size=(256, 256)))
    manifest = json.loads((root / "cohort.json").read_text())
    del manifest["params"]["tumour_types"]
    for slide in manifest["slides"]:
        del slide["tumour_types"]
        for region in slide["tumour_regions"]:
            del region["kind"]
    (root / "cohort.json").write_text(json.dumps(manifest))
    make_cohort(root, CohortSpec(n_slides=2, seed=0, size=(256, 256)))  # no "other parameters" error
    assert all(i.tumour_types == 1 and all(r.kind == 0 for r in i.tumour_regions) for i in synthetic.load_cohort(root))
    with (root / "targets.csv").open() as fh:
        assert "tumour_a" not in next(csv.reader(fh))


def test_a_two_type_cohort_marks_each_type_in_its_targets(tmp_path):
    root = make_cohort(tmp_path, CohortSpec(n_slides=8, seed=0, size=(512, 512), tumour_types=2))
    with (root / "targets.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    infos = synthetic.slide_infos(root)
    for row in rows:
        kinds = {r.kind for r in infos[row["slide_id"]].tumour_regions}
        assert (row["tumour_a"], row["tumour_b"]) == (str(int(0 in kinds)), str(int(1 in kinds)))
        assert row["tumour"] == str(int(bool(kinds)))
    assert {(r["tumour_a"], r["tumour_b"]) for r in rows} >= {("0", "0"), ("1", "0"), ("0", "1")}


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def test_cohort_labels_patients_rerun_and_files(tmp_path):
    root = tmp_path / "cohort"
    spec = CohortSpec(n_slides=6, seed=0, size=(600, 500), tile_size=128, flavours=("svs", "tiff", "ome"))
    assert make_cohort(root, spec) == root
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["slide_id", "label", "patient_id", "annotations"]
    assert {r["label"] for r in rows} == {"0", "1"}
    patients = [r["patient_id"] for r in rows]
    assert len(set(patients)) == 4 and max(patients.count(p) for p in patients) == 2
    names = sorted(p.name for p in (root / "slides").iterdir())
    assert names == [
        "slide_000.svs",
        "slide_001.tif",
        "slide_002.ome.tif",
        "slide_003.svs",
        "slide_004.tif",
        "slide_005.ome.tif",
    ]
    infos = synthetic.load_cohort(root)
    for row, info in zip(rows, infos, strict=True):
        assert info.path == root / "slides" / f"{row['slide_id']}{synthetic.EXTENSIONS[info.flavour]}"
        assert info.label == int(row["label"]) and bool(info.tumour_regions) == info.tumour
        assert synthetic.SlideInfo.from_dict(info.to_dict(root), root) == info
        if info.flavour == "ome":
            assert _levels(info.path)[0].shape == (500, 600, 3)
        else:
            with openslide.OpenSlide(info.path) as slide:
                assert slide.dimensions == (600, 500)
    assert json.loads((root / "cohort.json").read_text())["classes"] == ["normal", "tumour"]

    before = _tree(root)
    make_cohort(root, spec)
    assert _tree(root) == before  # nothing rewritten
    with pytest.raises(ValueError, match="root: .* other parameters"):
        make_cohort(root, dataclasses.replace(spec, seed=1))


def test_command_line_writes_a_cohort(tmp_path):
    command_line(
        [
            str(tmp_path),
            "--n-slides",
            "2",
            "--size",
            "600",
            "500",
            "--tile-size",
            "128",
            "--flavours",
            "tiff",
            "--seed",
            "3",
        ]
    )
    assert (tmp_path / "labels.csv").read_text().splitlines()[0] == "slide_id,label,patient_id,annotations"
    assert sorted(p.name for p in (tmp_path / "slides").iterdir()) == ["slide_000.tif", "slide_001.tif"]


def test_writes_are_atomic(tmp_path, monkeypatch):
    write_slide(tmp_path / "ok.svs", CohortSpec(size=(600, 500), tile_size=128), seed=1, tumour=False)
    assert sorted(os.listdir(tmp_path)) == ["ok.svs"]  # no temp file, no spool directory

    render = Scene.render
    calls = []

    def failing(self, *args):
        calls.append(args)
        if len(calls) == 7:
            raise RuntimeError("killed")
        return render(self, *args)

    monkeypatch.setattr(Scene, "render", failing)
    with pytest.raises(RuntimeError, match="killed"):
        write_slide(tmp_path / "broken.svs", CohortSpec(size=(600, 500), tile_size=128), seed=1, tumour=False)
    assert sorted(os.listdir(tmp_path)) == ["ok.svs"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"size": (10, 500)}, "size"),
        ({"size": (600,)}, "size"),
        ({"n_slides": 0}, "n_slides"),
        ({"tile_size": 100}, "tile_size"),
        ({"flavours": ("ndpi",)}, "flavours"),
        ({"compression": "webp"}, "compression"),
        ({"quality": 0}, "quality"),
        ({"mpp": 0}, "mpp"),
        ({"positive_fraction": 1.5}, "positive_fraction"),
        ({"patients_per_slide": 0}, "patients_per_slide"),
        ({"tumour_contrast": -1}, "tumour_contrast"),
        ({"tumour_area": (0.2, 0.1)}, "tumour_area"),
        ({"tumour_types": 3}, "tumour_types"),
    ],
)
def test_a_bad_spec_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        CohortSpec(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"flavour": "ndpi"}, "flavour"), ({"levels": 0}, "levels"), ({"seed": -1}, "seed")]
)
def test_bad_slide_arguments_name_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        write_slide(tmp_path / "s.svs", CohortSpec(size=(600, 500)), **{"seed": 0, "tumour": False, **kwargs})
    assert not (tmp_path / "s.svs").exists()


def test_equal_specs_compare_equal_however_they_were_written():
    """A spec from YAML (lists, ints) equals the one written in code: a cohort on disk is reused, not refused."""
    yaml_like = CohortSpec(size=[600, 500], flavours=["svs"], mpp=1, tumour_contrast=1, tumour_area=[0.1, 0.2])
    assert yaml_like == CohortSpec(
        size=(600, 500), flavours=("svs",), mpp=1.0, tumour_contrast=1.0, tumour_area=(0.1, 0.2)
    )


def test_bad_region_and_cohort_arguments(tmp_path):
    info = write_slide(
        tmp_path / "s.tif", CohortSpec(size=(600, 500), tile_size=128), seed=0, tumour=False, flavour="tiff"
    )
    with pytest.raises(ValueError, match="^level: expected"):
        render_region(info, (0, 0), (10, 10), level=2)
    with pytest.raises(ValueError, match="^location/size:"):
        render_region(info, (2, 0), (10, 10), level=1)
    with pytest.raises(ValueError, match="^downsample: expected"):
        tissue_mask(info, 0.5)


@pytest.mark.slow
def test_large_slide_is_written_with_bounded_memory(tmp_path):
    """20000 x 20000 (1.2 GB of RGB at level 0): peak RSS grows by < 150 MB over the imported baseline."""
    script = textwrap.dedent(f"""
        import resource
        from data_modules.synthetic import CohortSpec, write_slide
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        write_slide({str(tmp_path / "big.svs")!r}, CohortSpec(size=(20000, 20000)), seed=9, tumour=True)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
    """)
    growth_mb = int(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)
    assert growth_mb < 150
    with openslide.OpenSlide(tmp_path / "big.svs") as slide:
        assert slide.level_dimensions == ((20000, 20000), (5000, 5000), (1250, 1250), (313, 313))
        region = np.asarray(slide.read_region((12345, 6789), 0, (300, 200)))[..., :3]
    with tifffile.TiffFile(tmp_path / "big.svs") as tif:
        level0 = zarr.open(tif.pages[0].aszarr(), mode="r")
        assert np.array_equal(region, level0[6789:6989, 12345:12645])


def test_synthetic_cohort_data_module_writes_once_then_reads(tmp_path):
    from data_modules.slides.tiling import TilingConfig
    from data_modules.synthetic import SyntheticCohortDataModule

    def module(n_slides: int) -> SyntheticCohortDataModule:
        return SyntheticCohortDataModule(
            str(tmp_path / "c"),
            CohortSpec(n_slides=n_slides, size=(1024, 1024)),
            tiling=TilingConfig(mpp=1.0, patch_size=32),
            grid_cache=str(tmp_path / "g"),
        )

    data = module(4)
    assert not (tmp_path / "c").exists()  # nothing is written before prepare_data
    data.prepare_data()
    stamp = (tmp_path / "c" / "labels.csv").stat().st_mtime_ns
    data.setup()
    assert data.slide_ids == [f"slide_{i:03d}" for i in range(4)] and all(len(s.grid) > 0 for s in data.slide_patches)
    module(4).prepare_data()  # complete: reused as is
    assert (tmp_path / "c" / "labels.csv").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other parameters"):
        module(5).prepare_data()


def test_patch_tumour_fraction_is_the_mask_mean_over_each_patch(tmp_path):
    info = write_slide(
        tmp_path / "s.tif", CohortSpec(size=(1024, 1024), tumour_area=(0.15, 0.25)), seed=1, tumour=True, levels=1
    )
    coords = np.array([(x, y) for y in range(0, 1024, 128) for x in range(0, 1024, 128)])
    mask = tumour_mask(info, 4)
    expected = [mask[y // 4 : y // 4 + 32, x // 4 : x // 4 + 32].mean() for x, y in coords]
    fractions = patch_tumour_fraction(info, coords, 128)
    np.testing.assert_allclose(fractions, expected)
    assert (fractions == 0).any() and (fractions > 0.5).any()
    edge = patch_tumour_fraction(info, np.array([[1000, 1000]]), 128)  # a patch past the edge counts what is inside
    assert 0 <= edge[0] <= 1
