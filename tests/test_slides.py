"""The slide reader against OpenSlide and tifffile on files we generate, and its errors on bad files."""

from __future__ import annotations

import pickle
import struct

import imagecodecs
import numpy as np
import openslide
import pytest
import tifffile

from data_modules import SlideError, open_slide
from data_modules.synthetic import CohortSpec, write_slide

W, H = 2048, 1536  # divisible by 4 and 16: integer downsamples, as OpenSlide needs for exact agreement


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    out = {}
    for flavour, ext in [("svs", ".svs"), ("tiff", ".tif"), ("ome", ".ome.tif")]:
        for compression in ["jpeg", "jpeg2000", "lzw", "deflate"]:
            if flavour != "tiff" and compression != "jpeg":
                continue
            path = root / f"{flavour}_{compression}{ext}"
            write_slide(
                path,
                CohortSpec(size=(W, H), mpp=0.25, compression=compression, tile_size=256),
                seed=3,
                tumour=True,
                flavour=flavour,
            )
            out[flavour, compression] = path
    return out


def _regions(rng, n, w, h, ds):
    """Random regions, some hanging over the image border, at multiples of the level downsample."""
    xs = rng.integers(-64, w - 64, n) // ds * ds
    ys = rng.integers(-64, h - 64, n) // ds * ds
    return [(int(x), int(y)) for x, y in zip(xs, ys, strict=True)]


@pytest.mark.parametrize("key", [("svs", "jpeg"), ("tiff", "jpeg"), ("tiff", "lzw"), ("tiff", "deflate")])
def test_agrees_with_openslide_pixel_for_pixel(slides, key):
    path = slides[key]
    ours, ref = open_slide(path), openslide.OpenSlide(path)
    assert ours.dimensions == ref.dimensions == (W, H)
    assert ours.level_count == ref.level_count >= 2
    assert ours.level_dimensions == ref.level_dimensions
    assert ours.level_downsamples == pytest.approx(ref.level_downsamples)
    assert ours.mpp == pytest.approx(float(ref.properties["openslide.mpp-x"])) == pytest.approx(0.25)
    rng = np.random.default_rng(0)
    for level in range(ours.level_count):
        ds = round(ours.level_downsamples[level])
        for x, y in _regions(rng, 12, W, H, ds):
            size = (int(rng.integers(1, 300)), int(rng.integers(1, 300)))
            mine = ours.read_region((x, y), level, size)
            theirs = np.asarray(ref.read_region((x, y), level, size))
            inside = theirs[..., 3] == 255
            assert mine.shape == (size[1], size[0], 3) and mine.dtype == np.uint8
            np.testing.assert_array_equal(mine[inside], theirs[..., :3][inside])
            assert (mine[~inside] == 255).all()  # outside the image: white


@pytest.mark.parametrize("key", [("tiff", "jpeg2000"), ("ome", "jpeg"), ("svs", "jpeg")])
def test_agrees_with_tifffile_decoding_whole_levels(slides, key):
    """JPEG 2000 (tifffile's code 34712) and OME-TIFF are formats OpenSlide does not read: tifffile is the reference."""
    slide = open_slide(slides[key])
    with tifffile.TiffFile(slides[key]) as tif:
        for level, truth in enumerate(lv.asarray() for lv in tif.series[0].levels):
            assert slide.level_dimensions[level] == (truth.shape[1], truth.shape[0])
            whole = slide.read_region((0, 0), level, slide.level_dimensions[level])
            np.testing.assert_array_equal(whole, truth[..., :3])


def test_vendor_and_aperio_properties(slides):
    slide = open_slide(slides["svs", "jpeg"])
    assert slide.properties["vendor"] == "aperio"
    assert float(slide.properties["aperio.MPP"]) == pytest.approx(0.25)
    assert open_slide(slides["tiff", "jpeg"]).properties["vendor"] == "generic-tiff"


def test_ome_levels_and_physical_size(slides):
    path = slides["ome", "jpeg"]
    slide = open_slide(path)
    assert slide.mpp == pytest.approx(0.25)
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        assert slide.level_dimensions == tuple((lv.shape[1], lv.shape[0]) for lv in levels)
        truth = levels[1].asarray()
    np.testing.assert_array_equal(slide.read_region((0, 0), 1, slide.level_dimensions[1]), truth[..., :3])


def test_ome_levels_as_series(tmp_path):
    """Older OME pyramids store each level as its own image (series), not as SubIFDs."""
    rng = np.random.default_rng(1)
    base = rng.integers(0, 255, (512, 768, 3), dtype=np.uint8)
    path = tmp_path / "series.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        for ds in (1, 2, 4):
            tw.write(
                base[::ds, ::ds],
                tile=(128, 128),
                photometric="rgb",
                compression="deflate",
                metadata={"PhysicalSizeX": 0.5 * ds, "PhysicalSizeY": 0.5 * ds, "PhysicalSizeXUnit": "µm"},
            )
    slide = open_slide(path)
    assert slide.level_dimensions == ((768, 512), (384, 256), (192, 128))
    assert slide.mpp == pytest.approx(0.5)
    np.testing.assert_array_equal(slide.read_region((100, 60), 0, (50, 40)), base[60:100, 100:150])
    np.testing.assert_array_equal(slide.read_region((400, 200), 2, (20, 10)), base[::4, ::4][50:60, 100:120])


def test_mpp_override_and_unknown_mpp(tmp_path, slides):
    assert open_slide(slides["svs", "jpeg"], mpp=0.5).mpp == 0.5
    path = tmp_path / "nompp.tif"
    tifffile.imwrite(path, np.zeros((256, 256, 3), np.uint8), tile=(128, 128), photometric="rgb")
    slide = open_slide(path)
    assert slide.mpp is None
    with pytest.raises(
        SlideError, match=r"nompp\.tif.*microns per pixel unknown.*`mpp` cell of the labels CSV.*tiling\.mpp_override"
    ):
        slide.read_at_mpp((0, 0), (64, 64), mpp=1.0)
    assert open_slide(path, mpp=0.5).read_at_mpp((0, 0), (64, 64), mpp=1.0).shape == (64, 64, 3)
    with pytest.raises(SlideError, match="positive"):
        open_slide(path, mpp=-1)


def test_read_at_mpp_picks_the_level_at_or_finer_than_the_target(slides):
    slide = open_slide(slides["tiff", "lzw"])  # lossless: resampled values are comparable
    ds1 = slide.level_downsamples[1]
    # exactly level 1's resolution: a plain read, no resampling
    exact = slide.read_at_mpp((512, 256), (100, 80), mpp=0.25 * ds1)
    np.testing.assert_array_equal(exact, slide.read_region((512, 256), 1, (100, 80)))
    # between level 0 and 1: read level 0 and downsample by 2 once (compare with a box average of level 0)
    half = slide.read_at_mpp((512, 256), (100, 80), mpp=0.5, resample="box")
    level0 = slide.read_region((512, 256), 0, (200, 160)).astype(float)
    box = level0.reshape(80, 2, 100, 2, 3).mean(axis=(1, 3))
    assert np.abs(half - box).max() <= 1.0


def test_thumbnail_has_the_slide_aspect_and_content(slides):
    slide = open_slide(slides["tiff", "lzw"])
    thumb = slide.get_thumbnail((256, 256))
    assert thumb.shape == (192, 256, 3)
    coarse = slide.read_region((0, 0), slide.level_count - 1, slide.level_dimensions[-1]).astype(float)
    assert abs(thumb.mean() - coarse.mean()) < 3


def test_zarr_view_matches_read_region(slides):
    slide = open_slide(slides["svs", "jpeg"])
    z = slide.zarr_level(0)
    np.testing.assert_array_equal(z[100:300, 200:500], slide.read_region((200, 100), 0, (300, 200)))


def test_slides_refuse_pickling(slides):
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(open_slide(slides["svs", "jpeg"]))


# -- bad input: each names the file and what was expected --------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(SlideError, match=r"nothere\.svs: no such file"):
        open_slide(tmp_path / "nothere.svs")


def test_not_a_tiff(tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("slide_id,label\n")
    with pytest.raises(SlideError, match=r"notes\.svs: not a readable TIFF"):
        open_slide(path)


def test_truncated_file(tmp_path, slides):
    data = slides["svs", "jpeg"].read_bytes()
    path = tmp_path / "truncated.svs"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(SlideError, match=r"truncated\.svs: (truncated|not a readable)"):
        open_slide(path)


def test_corrupt_tile(tmp_path, slides):
    data = bytearray(slides["svs", "jpeg"].read_bytes())
    path = tmp_path / "corrupt.svs"
    with tifffile.TiffFile(slides["svs", "jpeg"]) as tif:
        page = tif.pages.first
        offset, count = page.dataoffsets[5], page.databytecounts[5]
    data[offset : offset + count] = b"\x00" * count
    path.write_bytes(bytes(data))
    slide = open_slide(path)
    tile_w = page.tilewidth
    with pytest.raises(SlideError, match=r"corrupt\.svs: tile 5 of level 0 cannot be decoded"):
        slide.read_region((5 * tile_w % W, (5 * tile_w // W) * tile_w), 0, (16, 16))


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (-5, 10)])
def test_non_positive_region(slides, size):
    slide = open_slide(slides["svs", "jpeg"])
    with pytest.raises(SlideError, match=r"svs_jpeg\.svs: region size must be positive"):
        slide.read_region((0, 0), 0, size)
    with pytest.raises(SlideError, match="region size must be positive"):
        slide.read_at_mpp((0, 0), size, mpp=1.0)


def test_level_out_of_range(slides):
    slide = open_slide(slides["svs", "jpeg"])
    with pytest.raises(SlideError, match="level 9 out of range"):
        slide.read_region((0, 0), 9, (10, 10))


# -- Hamamatsu NDPI: one JPEG per level with restart markers, tiles addressed through the McuStarts tag ----------------
def _ndpi_jpeg(image: np.ndarray, restart_px: int = 64) -> tuple[bytes, np.ndarray]:
    """A baseline JPEG of `image` with a restart marker every `restart_px` columns, and each segment's start.

    Each 8-row x `restart_px` block is encoded on its own with the standard tables; a restart resets exactly the
    state a fresh encoder starts from, so the segments splice into one valid restart-marked scan, as scanners write.
    """
    h, w, _ = image.shape
    header, parts = None, []
    for y in range(0, h, 8):
        for x in range(0, w, restart_px):
            jpeg = imagecodecs.jpeg8_encode(
                np.ascontiguousarray(image[y : y + 8, x : x + restart_px]), level=90, subsampling="444", optimize=False
            )
            i = 2
            while (marker := struct.unpack(">HH", jpeg[i : i + 4]))[0] != 0xFFDA:
                i += 2 + marker[1]
            end = i + 2 + marker[1]
            header = header or jpeg[:end]
            parts.append(jpeg[end:-2])
    sof = header.index(b"\xff\xc0")
    header = header[: sof + 5] + struct.pack(">HH", h, w) + header[sof + 9 :]
    sos = header.index(b"\xff\xda")
    header = header[:sos] + b"\xff\xdd" + struct.pack(">HH", 4, restart_px // 8) + header[sos:]
    out, starts = bytearray(header), []
    for k, data in enumerate(parts):
        if k:
            out += bytes([0xFF, 0xD0 + (k - 1) % 8])
        starts.append(len(out))
        out += data
    return bytes(out + b"\xff\xd9"), np.array(starts, np.uint32)


def _write_ndpi(path, image: np.ndarray, mpp: float, downsamples=(1, 4)) -> None:
    with tifffile.TiffWriter(path) as tw:
        for ds in downsamples:
            level = np.ascontiguousarray(image[::ds, ::ds])
            jpeg, starts = _ndpi_jpeg(level)
            res = 1e4 / (mpp * ds)
            ndpi_tags = [
                (271, "s", 0, "Hamamatsu", True),
                (65420, "I", 1, 1, True),
                (65421, "f", 1, 20.0 / ds, True),
                (65422, "i", 1, 0, True),
                (65423, "i", 1, 0, True),
                (65424, "i", 1, 0, True),
                (65426, "I", len(starts), starts, True),
            ]
            tw.write(
                iter([jpeg]),
                shape=level.shape,
                dtype=np.uint8,
                photometric="ycbcr",
                compression="jpeg",
                subsampling=(1, 1),
                rowsperstrip=level.shape[0],
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                metadata=None,
                extratags=ndpi_tags,
            )


def test_ndpi_agrees_with_openslide(tmp_path):
    # tifffile expects NDPI's 64-bit offset header for the `.ndpi` extension; the crafted file is classic TIFF
    path = tmp_path / "scan.tif"
    rng = np.random.default_rng(2)
    image = rng.integers(0, 255, (64, 128, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    _write_ndpi(path, image, mpp=0.46)
    slide, ref = open_slide(path), openslide.OpenSlide(path)
    assert slide.properties["vendor"] == ref.properties["openslide.vendor"] == "hamamatsu"
    assert slide.mpp == pytest.approx(float(ref.properties["openslide.mpp-x"]), rel=1e-6)
    # OpenSlide adds JPEG-scaled virtual levels between the stored ones; ours are the stored pages
    assert slide.level_dimensions == ((1024, 512), (256, 128))
    assert set(slide.level_dimensions) <= set(ref.level_dimensions)
    for (x, y), size in [((0, 0), (1024, 512)), ((100, 37), (300, 200)), ((900, 400), (200, 200))]:
        theirs = np.asarray(ref.read_region((x, y), 0, size))
        inside = theirs[..., 3] == 255
        np.testing.assert_array_equal(slide.read_region((x, y), 0, size)[inside], theirs[..., :3][inside])
    level = ref.level_dimensions.index((256, 128))
    np.testing.assert_array_equal(
        slide.read_region((64, 32), 1, (100, 60)), np.asarray(ref.read_region((64, 32), level, (100, 60)))[..., :3]
    )
