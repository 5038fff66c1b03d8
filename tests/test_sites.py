"""The generator's confounders (issue 32): sites that stain, light, blur and compress their slides their own way,
and benign mimics in slides of both classes, each off by default, drawn from new random streams only."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from data_modules import synthetic
from data_modules.synthetic import (
    CohortSpec,
    make_cohort,
    mimic_mask,
    patch_mimic_fraction,
    render_region,
    tissue_mask,
    tumour_mask,
    tumour_patches,
    write_slide,
)
from data_modules.synthetic.scene import Scene, SlideInfo
from data_modules.synthetic.sites import REFERENCE_EOSIN, REFERENCE_HEMATOXYLIN, Site, make_sites, recolour
from data_modules.synthetic.textures import NUCLEI_PERIOD, Nuclei

SPEC = CohortSpec(size=(1024, 1024), tumour_contrast=1.0, compression="lzw")


def test_the_reference_site_changes_no_colour_and_others_follow_beer_lambert():
    colours = np.array([[240.0, 186.0, 216.0], [78.0, 46.0, 128.0], [255.0, 255.0, 255.0]])
    reference = Site(0, REFERENCE_HEMATOXYLIN, REFERENCE_EOSIN, (1.0, 1.0), 1.0, 0.0, 90)
    np.testing.assert_allclose(recolour(colours, reference), colours, atol=1e-9)
    darker = Site(0, REFERENCE_HEMATOXYLIN, REFERENCE_EOSIN, (2.0, 1.0), 1.0, 0.0, 90)
    # twice the hematoxylin: the nucleus colour's optical density grows, white (nothing absorbs) stays
    od = -np.log((recolour(colours, darker) + 1) / 256)
    assert (od[1] > -np.log((colours[1] + 1) / 256)).all()
    np.testing.assert_allclose(recolour(colours, darker)[2], colours[2], atol=1.0)
    sites = make_sites(4, seed=0, variation=1.0)
    assert len({s.hematoxylin for s in sites}) == 4 and all(60 <= s.quality <= 95 for s in sites)
    assert make_sites(4, seed=0, variation=0.0)[0].amounts == (1.0, 1.0)
    assert make_sites(4, seed=0, variation=1.0) == sites  # a function of the seed


def test_without_sites_and_mimics_the_generator_is_unchanged(tmp_path):
    """New streams and palette blocks only: the tissue, the tumour and the palette do not move when mimics are
    added, and the default spec writes no site and no mimic."""
    plain = Scene(11, (512, 512), 0.5, True, 1.0, (0.05, 0.4))
    mimics = Scene(11, (512, 512), 0.5, True, 1.0, (0.05, 0.4), mimic_area=(0.05, 0.1))
    assert np.array_equal(mimics.palette[: len(plain.palette)], plain.palette)
    assert [r.centre for r in mimics.tumour_regions] == [r.centre for r in plain.tumour_regions]
    assert mimics.mimic_regions and not plain.mimic_regions
    info = write_slide(tmp_path / "s.tif", SPEC, seed=11, tumour=True, flavour="tiff", levels=1)
    assert info.site is None and info.mimic_regions == () and info.quality == SPEC.quality


def test_a_site_stains_lights_blurs_and_compresses_its_slides(tmp_path):
    site = Site(2, (0.55, 0.75, 0.37), (0.1, 0.98, 0.15), (1.4, 0.7), 0.92, 1.0, 70)
    plain = write_slide(tmp_path / "a.tif", SPEC, seed=5, tumour=True, flavour="tiff", levels=1)
    stained = write_slide(tmp_path / "b.tif", SPEC, seed=5, tumour=True, flavour="tiff", levels=1, site=site)
    assert stained.tumour_regions == plain.tumour_regions and stained.quality == 70
    assert stained.site.index == 2 and stained.site.amounts != site.amounts  # the slide jitters around its site
    a, b = (render_region(info, (0, 0), (1024, 1024)).astype(float) for info in (plain, stained))
    tissue = tissue_mask(plain, 1)
    assert np.abs(a[tissue].mean(0) - b[tissue].mean(0)).max() > 10  # another stain
    assert b[~tissue].mean() < a[~tissue].mean() - 10  # dimmer light on the glass too

    def detail(image):  # high-frequency energy inside the tissue
        return np.abs(image - ndimage.uniform_filter(image, (3, 3, 1)))[tissue].mean()

    assert detail(b) < 0.8 * detail(a)  # the site's optics blur
    # a region's blurred pixels do not depend on how the region is cut
    np.testing.assert_array_equal(render_region(stained, (100, 200), (64, 64)), b[200:264, 100:164].astype(np.uint8))


def test_mimics_are_masked_apart_from_the_tumour_and_are_not_tumour(tmp_path):
    spec = CohortSpec(size=(1024, 1024), tumour_contrast=1.0, compression="lzw", mimic_area=(0.04, 0.08))
    info = write_slide(tmp_path / "s.tif", spec, seed=3, tumour=True, flavour="tiff", levels=1, mimics=True)
    mimic, tumour = mimic_mask(info, 1), tumour_mask(info, 1)
    assert mimic.sum() > 0.02 * tissue_mask(info, 1).sum() and not (mimic & tumour).any()
    image = render_region(info, (0, 0), (1024, 1024)).astype(float)
    normal = tissue_mask(info, 1) & ~ndimage.binary_dilation(mimic | tumour, iterations=32)
    assert (np.abs(image[mimic].mean(0) - image[normal].mean(0)) < 4).all()  # texture, not colour

    def deepest(mask):  # the top-left of a 32 px patch around the pixel farthest from the mask's edge
        y, x = np.unravel_index(ndimage.distance_transform_edt(mask).argmax(), mask.shape)
        return np.array([[x - 16, y - 16]])

    coords = deepest(mimic)
    assert not tumour_patches(info, coords, 32).any()  # a patch inside a mimic is a negative
    assert patch_mimic_fraction(info, coords, 32) == pytest.approx([1.0])
    assert patch_mimic_fraction(info, deepest(tumour), 32) == pytest.approx([0.0])
    normal_slide = write_slide(tmp_path / "n.tif", spec, seed=4, tumour=False, flavour="tiff", levels=1, mimics=True)
    assert normal_slide.mimic_regions and not normal_slide.tumour_regions


def test_a_cohort_puts_each_patient_in_one_site_and_mimics_in_both_classes(tmp_path):
    spec = CohortSpec(n_slides=16, seed=1, size=(384, 384), sites=3, mimics=0.5, mimic_area=(0.05, 0.1))
    root = make_cohort(tmp_path, spec)
    infos = synthetic.slide_infos(root)
    rows = [line.split(",") for line in (root / "labels.csv").read_text().splitlines()[1:]]
    site_of: dict[str, set[int]] = {}
    for slide_id, _, patient, _ in rows:
        site_of.setdefault(patient, set()).add(infos[slide_id].site.index)
    assert all(len(sites) == 1 for sites in site_of.values()) and len(set().union(*site_of.values())) == 3
    with_mimics = {label for slide_id, label, *_ in rows if infos[slide_id].mimic_regions}
    assert with_mimics == {"0", "1"}
    reloaded = synthetic.load_cohort(root)[0]  # cohort.json keeps what regenerates the pixels
    original = infos[reloaded.path.name.split(".")[0]]
    assert reloaded.site == original.site and reloaded.mimic_regions == original.mimic_regions


def test_reactive_mimics_are_as_large_and_crowded_as_tumour_but_regular(tmp_path):
    """Reactive atypia: size and crowding of type a tumour, the regularity of normal nuclei, the mean colour of normal
    tissue; the kind is kept in cohort.json (an older manifest reads as lymphocytes)."""
    tumour, reactive, normal = Nuclei().tumour(0.6), Nuclei().reactive(0.6), Nuclei()
    assert (reactive.radius_um, reactive.per_100um2) == (tumour.radius_um, tumour.per_100um2)
    assert (reactive.radius_sd_um, reactive.aspect_sd, reactive.lobes) == (
        normal.radius_sd_um,
        normal.aspect_sd,
        normal.lobes,
    )
    spec = CohortSpec(size=(1024, 1024), tumour_contrast=1.0, compression="lzw", mimic_area=(0.04, 0.08))
    kinds = {}
    for kind in ("lymphocytes", "reactive"):
        info = write_slide(
            tmp_path / f"{kind}.tif",
            replace(spec, mimic_kind=kind),
            seed=3,
            tumour=False,
            flavour="tiff",
            levels=1,
            mimics=True,
        )
        image, mimic = render_region(info, (0, 0), (1024, 1024)), mimic_mask(info, 1)
        normal_px = tissue_mask(info, 1) & ~ndimage.binary_dilation(mimic, iterations=32)
        # texture, not colour: matched in expectation; larger nuclei are fewer, so a focus's mean varies more
        assert (np.abs(image[mimic].mean(0) - image[normal_px].mean(0)) < 6).all()
        kinds[kind] = (info, image[mimic])
    assert kinds["reactive"][0].mimic_regions == kinds["lymphocytes"][0].mimic_regions  # only the nuclei differ
    assert not np.array_equal(kinds["reactive"][1], kinds["lymphocytes"][1])
    info = kinds["reactive"][0]
    assert SlideInfo.from_dict(info.to_dict()).mimic_kind == "reactive"
    old = {k: v for k, v in info.to_dict().items() if k != "mimic_kind"}
    assert SlideInfo.from_dict(old).mimic_kind == "lymphocytes"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sites": -1}, "sites"),
        ({"site_variation": 5}, "site_variation"),
        ({"mimics": 2}, "mimics"),
        ({"mimic_area": (0.2, 0.1)}, "mimic_area"),
        ({"mimic_kind": "plasma"}, "mimic_kind"),
        ({"mimic_extent": "patchy"}, "mimic_extent"),
    ],
)
def test_bad_confounder_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: expected"):
        CohortSpec(**kwargs)


def test_tumour_cellularity_mixes_tumour_cells_among_normal_nuclei(tmp_path):
    """A low-cellularity focus holds a few tumour nuclei among normal ones: its share of nuclei larger than nearly all
    normal ones lies between normal tissue's and a solid tumour's; an older manifest reads as solid tumour."""

    def large_share(texture: np.ndarray, limit: float | None = None) -> tuple[float, float]:
        labels, n = ndimage.label(texture[:NUCLEI_PERIOD, :NUCLEI_PERIOD] >= 4)
        areas = np.bincount(labels.ravel())[1:]
        limit = float(np.quantile(areas, 0.95)) if limit is None else limit
        return float((areas > limit).mean()), limit

    def scene(cellularity: float) -> Scene:
        return Scene(5, (512, 512), 0.5, True, 1.0, (0.05, 0.1), cellularity=cellularity)

    solid, sparse = scene(1.0), scene(0.25)
    normal_share, limit = large_share(solid.nuclei)
    shares = [large_share(s.tumour_nuclei, limit)[0] for s in (sparse, solid)]
    assert normal_share < shares[0] - 0.05 and shares[0] < shares[1] - 0.2, (normal_share, shares)
    assert np.array_equal(sparse.nuclei, solid.nuclei) and sparse.tumour_regions == solid.tumour_regions
    info = write_slide(tmp_path / "x.tif", CohortSpec(size=(256, 256), tumour_cellularity=0.25), seed=1, tumour=True)
    assert SlideInfo.from_dict(info.to_dict()).tumour_cellularity == 0.25
    old = {k: v for k, v in info.to_dict().items() if k != "tumour_cellularity"}
    assert SlideInfo.from_dict(old).tumour_cellularity == 1.0


def test_diffuse_mimics_fill_the_tissue_outside_the_tumour(tmp_path):
    """A reactive background: every tissue pixel outside the tumour is a mimic, the tumour's pixels are those of the
    same slide with mimic foci (the tumour paints over the mimic); an older manifest reads as foci."""
    spec = replace(SPEC, mimic_kind="reactive", mimic_area=(0.04, 0.08))
    infos = {
        extent: write_slide(
            tmp_path / f"{extent}.tif", replace(spec, mimic_extent=extent), seed=3, tumour=True, levels=1, mimics=True
        )
        for extent in ("foci", "diffuse")
    }
    diffuse, foci = infos["diffuse"], infos["foci"]
    assert diffuse.tumour_regions == foci.tumour_regions and len(diffuse.mimic_regions) == 1
    tissue, tumour = tissue_mask(diffuse, 1), tumour_mask(diffuse, 1)
    mimic = mimic_mask(diffuse, 1)
    assert mimic[tissue].all() and tumour.any()
    images = {extent: render_region(info, (0, 0), (1024, 1024)) for extent, info in infos.items()}
    assert np.array_equal(images["diffuse"][tumour], images["foci"][tumour])
    normal = tissue & ~tumour & ~ndimage.binary_dilation(mimic_mask(foci, 1), iterations=8)
    assert (images["diffuse"][normal] != images["foci"][normal]).any(axis=1).mean() > 0.1  # reactive, not normal
    assert SlideInfo.from_dict(diffuse.to_dict()).mimic_extent == "diffuse"
    old = {k: v for k, v in diffuse.to_dict().items() if k != "mimic_extent"}
    assert SlideInfo.from_dict(old).mimic_extent == "foci"
