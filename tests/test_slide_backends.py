"""Which reader opens which file, single-level TIFFs (tiled or in strips, with computed coarse levels), the OpenSlide
backend against OpenSlide itself, the objective-power fallback's inputs, and the errors of each."""

from __future__ import annotations

import os
import shutil

import numpy as np
import openslide
import pytest
import tifffile

from data_modules import SlideError, open_slide
from data_modules.slides import file_signature, opening
from data_modules.synthetic import CohortSpec, write_slide
from data_modules.synthetic.dicom import write_dicom_wsi


def _image(h: int, w: int, seed: int = 0, noise: int = 40) -> np.ndarray:
    """Smooth gradients plus noise: every pixel differs from its neighbours, so misplaced reads show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], axis=-1)
    return (base + rng.integers(0, noise, (h, w, 3))).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def svs(tmp_path_factory):
    path = tmp_path_factory.mktemp("svs") / "scan.svs"
    write_slide(path, CohortSpec(size=(1024, 768), mpp=0.25, tile_size=256), seed=1, tumour=True, flavour="svs")
    return path


@pytest.mark.parametrize(
    "name, options",
    [
        ("raw_strips", {"rowsperstrip": 16}),
        ("raw_one_strip", {}),
        ("zlib_strips", {"rowsperstrip": 40, "compression": "zlib"}),
        ("jpeg_strips", {"rowsperstrip": 64, "compression": "jpeg", "compressionargs": {"level": 95}}),
        ("tiled", {"tile": (128, 128), "compression": "zlib"}),
    ],
)
def test_single_level_tiffs_read_exactly_as_tifffile_decodes_them(tmp_path, name, options):
    image = _image(301, 517)
    path = tmp_path / f"{name}.tif"
    tifffile.imwrite(path, image, photometric="rgb", **options)
    truth = tifffile.imread(path)
    with open_slide(path, mpp=0.5) as slide:
        assert slide.backend == "tifffile" and slide.level_dimensions == ((517, 301),)
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (517, 301)), truth)
        for (x, y), (w, h) in [((13, 7), (50, 33)), ((500, 290), (40, 40)), ((-5, 250), (30, 70))]:
            expected = np.full((h, w, 3), 255, np.uint8)
            sx, sy = max(x, 0), max(y, 0)
            part = truth[sy : y + h, sx : x + w]
            expected[sy - y : sy - y + part.shape[0], sx - x : sx - x + part.shape[1]] = part
            np.testing.assert_array_equal(slide.read_region((x, y), 0, (w, h)), expected)
        assert slide.read_at_mpp((0, 0), (64, 64), mpp=1.0).shape == (64, 64, 3)


def test_an_uncompressed_single_strip_is_read_in_bands_not_whole(tmp_path):
    path = tmp_path / "one_strip.tif"
    image = _image(1200, 1000)
    tifffile.imwrite(path, image, photometric="rgb", rowsperstrip=1200)
    with open_slide(path) as slide:
        level = slide._levels[0]
        assert level.raw and level.tile_h < 1200 and level.tile_h * 1000 * 3 <= 1 << 20
        np.testing.assert_array_equal(slide.read_region((400, 700), 0, (200, 300)), image[700:1000, 400:600])


def test_a_large_single_level_tiff_gets_coarse_levels_built_in_bands(tmp_path):
    image = _image(1800, 2600, seed=4)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(
        path,
        image,
        photometric="rgb",
        tile=(256, 256),
        compression="zlib",
        resolution=(1e4 / 0.5,) * 2,
        resolutionunit="CENTIMETER",
    )
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.5)
        assert slide.level_dimensions == ((2600, 1800),) and slide.level_count == 1  # the file's, as OpenSlide says
        assert slide.pyramid_dimensions == ((2600, 1800), (650, 450))  # one computed level, 4x: under 1024 px
        assert slide.pyramid_downsamples == pytest.approx((1.0, 4.0))
        assert slide.properties["icmil.computed_levels"] == "1"
        coarse = image[:1800, :2600].reshape(450, 4, 650, 4, 3).mean(axis=(1, 3))
        np.testing.assert_allclose(slide.read_pyramid((0, 0), 1, (650, 450)), coarse, atol=0.51)
        np.testing.assert_array_equal(slide.read_pyramid((2400, 1600), 1, (100, 100))[50:, :], 255)  # past the edge
        with pytest.raises(SlideError, match="level 1 out of range"):
            slide.read_region((0, 0), 1, (8, 8))  # OpenSlide's levels: a computed one is not the file's
        patch = slide.read_at_mpp((400, 400), (32, 32), mpp=2.0)  # 4x coarser: read from the computed level
        np.testing.assert_allclose(patch, coarse[100:132, 100:132], atol=0.51)
        thumb = slide.get_thumbnail((260, 260))
        assert thumb.shape == (180, 260, 3)
        with pytest.raises(SlideError, match="level 1 is computed, not stored"):
            slide.zarr_level(1)


def test_oversized_strips_are_refused_with_the_conversion_to_do(tmp_path):
    path = tmp_path / "huge_strip.tif"
    with tifffile.TiffWriter(path) as tw:  # a 7000 x 7000 deflated single strip: 147 MB decoded per read
        tw.write(np.zeros((7000, 7000, 3), np.uint8), photometric="rgb", compression="zlib", rowsperstrip=7000)
    with pytest.raises(SlideError, match=r"huge_strip\.tif: level 0 is stored in strips of 7000 x 7000 px.*--tile"):
        open_slide(path)


def test_the_openslide_backend_reads_what_openslide_reads(svs):
    ours, ref = open_slide(svs, backend="openslide"), openslide.OpenSlide(svs)
    exact = open_slide(svs)
    assert ours.backend == "openslide" and exact.backend == "tifffile"
    assert ours.level_dimensions == ref.level_dimensions == exact.level_dimensions
    assert ours.level_downsamples == pytest.approx(ref.level_downsamples)
    assert ours.mpp == pytest.approx(0.25) and ours.objective_power == exact.objective_power == 40
    assert ours.properties["vendor"] == "aperio"
    for level in range(ours.level_count):
        ds = round(ours.level_downsamples[level])
        for x, y in [(0, 0), (128 * ds, 64 * ds), (900 // ds * ds, 700 // ds * ds)]:
            np.testing.assert_array_equal(
                ours.read_region((x, y), level, (100, 90)), exact.read_region((x, y), level, (100, 90))
            )
    np.testing.assert_array_equal(
        ours.read_at_mpp((256, 256), (64, 64), 1.0), exact.read_at_mpp((256, 256), (64, 64), 1.0)
    )
    assert ours.get_thumbnail((128, 128)).shape == exact.get_thumbnail((128, 128)).shape
    with pytest.raises(SlideError, match="zarr views need the tifffile backend"):
        ours.zarr_level(0)
    with pytest.raises(TypeError, match="cannot be pickled"):
        __import__("pickle").dumps(ours)


def test_openslide_formats_by_suffix_and_their_errors(tmp_path):
    mrxs = tmp_path / "scan.mrxs"
    mrxs.write_bytes(b"[GENERAL]\n")
    with pytest.raises(SlideError, match=r"scan\.mrxs: an MRXS slide needs its data folder beside it .*scan/"):
        open_slide(mrxs)
    garbage = tmp_path / "scan.scn"
    garbage.write_bytes(b"not a slide at all")
    with pytest.raises(SlideError, match=r"scan\.scn: not a slide format OpenSlide reads"):
        open_slide(garbage)
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    with pytest.raises(SlideError, match=r"series: a folder is read as a DICOM WSI series, but it holds no \.dcm"):
        open_slide(folder)


def test_an_unknown_file_is_named_by_the_tifffile_error(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(SlideError, match=r"photo\.png: not a readable TIFF-based slide"):
        open_slide(path)


# -- DICOM WSI: a folder of instances, one per level, read by OpenSlide ------------------------------------------------
def _halved(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[0] // 2, image.shape[1] // 2
    return image[: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).mean(axis=(1, 3)).astype(np.uint8)


@pytest.fixture
def dicom(tmp_path):
    levels = [_image(500, 700, seed=5, noise=8)]  # JPEG keeps a little noise well
    levels += [_halved(levels[-1])]
    levels += [_halved(levels[-1])]
    folder = tmp_path / "case_01"
    return folder, write_dicom_wsi(folder, levels, 0.25, tile=128), levels


def test_a_dicom_series_opens_from_its_folder_or_any_instance(dicom):
    folder, files, levels = dicom
    for path in (folder, files[2]):
        with open_slide(path) as slide, openslide.OpenSlide(files[0]) as ref:
            assert slide.backend == "openslide" and slide.properties["vendor"] == "dicom"
            assert slide.path == path
            assert slide.level_dimensions == ((700, 500), (350, 250), (175, 125)) == ref.level_dimensions
            assert slide.mpp == pytest.approx(0.25)
            for level, source in enumerate(levels):
                w, h = slide.level_dimensions[level]
                got = slide.read_region((0, 0), level, (w, h))
                np.testing.assert_array_equal(got, np.asarray(ref.read_region((0, 0), level, (w, h)))[..., :3])
                assert np.abs(got.astype(int) - source).mean() < 3  # JPEG q95
            beyond = slide.read_region((650, 450), 0, (100, 100))
            assert (beyond[50:] == 255).all() and (beyond[:, 50:] == 255).all()  # white outside, not black
            patch = slide.read_at_mpp((128, 128), (64, 64), mpp=0.5)
            assert np.abs(patch.astype(int) - levels[1][64:128, 64:128]).mean() < 3
            assert slide.get_thumbnail((100, 100)).shape == (71, 100, 3)


def test_a_dicom_series_without_its_full_resolution_instance_is_refused(dicom):
    folder, files, _ = dicom
    files[0].unlink()  # OpenSlide alone would open levels 1 and 2 as a 350 px slide at 0.5 um/px
    with pytest.raises(SlideError, match=r"case_01: the DICOM series has no full-resolution instance .*350 x 250 px"):
        open_slide(folder)


def test_a_truncated_dicom_instance_fails_on_the_lost_frames_only(dicom):
    folder, files, _ = dicom
    os.truncate(files[1], files[1].stat().st_size // 2)
    with open_slide(folder) as slide:
        with pytest.raises(SlideError, match=r"case_01: level 1 at \(0, 0\) cannot be read \(.*end of filehandle"):
            slide.read_region((0, 0), 1, (350, 250))
        assert slide.read_region((0, 0), 0, (64, 64)).shape == (64, 64, 3)  # OpenSlide's sticky error is not ours


def test_a_rewritten_dicom_instance_changes_its_series_signature(dicom):
    """Grid and feature caches key on `file_signature`: a folder's own stat would miss a rewritten level."""
    folder, files, _ = dicom
    before = file_signature(folder)
    assert before[0] == sum(path.stat().st_size for path in files)
    stat = files[1].stat()
    os.utime(files[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert file_signature(folder) != before and file_signature(folder)[1] == stat.st_mtime_ns + 10**9


def _rewrite_in_place(path, offset: int) -> None:
    """Other bytes at `offset`, the same size and mtime: what a copy of another scan with `cp -p`, or a converter that
    restores times, leaves behind."""
    stat = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0xFF]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)


def test_a_rewrite_with_the_same_size_and_mtime_changes_the_signature(svs, dicom, tmp_path, monkeypatch):
    """Caches keyed on (size, mtime) reused a rewritten slide's old grid and features: a content sample notices."""
    copy = tmp_path / svs.name
    shutil.copy2(svs, copy)
    before = file_signature(copy)
    _rewrite_in_place(copy, copy.stat().st_size - 100)
    after = file_signature(copy)
    assert after[:2] == before[:2] and after != before
    folder, files, _ = dicom
    before = file_signature(folder)
    _rewrite_in_place(files[1], files[1].stat().st_size // 2)
    assert file_signature(folder)[:2] == before[:2] and file_signature(folder) != before
    monkeypatch.setattr(opening, "_sample", lambda *args: pytest.fail("read again, though no file changed"))
    assert file_signature(copy) == after  # memoised on each file's stat: a repeated call reads nothing
