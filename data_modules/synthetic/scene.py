"""The procedural slide: tissue geometry, tumour foci, benign mimics and level-0 pixels, a pure function of the
slide's settings and the position, so any region can be regenerated (`levels.render_region`) and the ground truth
read back (`truth`). A slide of a site (`sites.Site`) is stained, lit and blurred as that site's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from .sites import Site, recolour
from .spec import Compression, Flavour, MimicExtent, MimicKind
from .textures import (
    GLASS,
    MIMIC,
    NUCLEI_PERIOD,
    STROMA_PERIOD,
    TUMOUR,
    TUMOUR_B,
    Nuclei,
    doubled,
    histogram,
    nuclei_alpha,
    palette,
    quantise,
    radial,
    stroma_texture,
    value_noise,
    window,
)

__all__ = ["Scene", "SlideInfo", "TumourRegion", "cached_scene", "scene_of"]

_FIELD_MARGIN = 1024  # px beyond the slide's right and bottom edges where the tissue field still varies
_ANALYSIS_PX = 512  # resolution (longest side) at which tissue is measured and tumours are placed


@dataclass(frozen=True)
class TumourRegion:
    """A tumour focus: points at distance < radius * (1 + sum a cos(k theta + phi)) from the centre (level-0 px)."""

    centre: tuple[float, float]
    radius: float
    harmonics: tuple[tuple[int, float, float], ...]  # (k, a, phi)
    box: tuple[int, int, int, int]  # (x, y, w, h), level-0 px, clipped to the slide
    kind: int = 0  # 0: tumour type a, 1: type b (cohorts with tumour_types 2)

    def contains(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Membership on the grid ys x xs (level-0 coordinates) as a (len(ys), len(xs)) bool array."""
        dx = np.asarray(xs, np.float64)[None, :] - self.centre[0]
        dy = np.asarray(ys, np.float64)[:, None] - self.centre[1]
        d = np.hypot(dx, dy)
        safe = np.where(d > 0, d, 1.0)
        return d < self.radius * radial(dx / safe, dy / safe, self.harmonics)


@dataclass(frozen=True)
class SlideInfo:
    """What was written and the ground truth to check predictions against; enough to regenerate any region."""

    path: Path
    seed: int
    dimensions: tuple[int, int]  # (w, h) at level 0
    mpp: float
    tumour: bool
    tumour_contrast: float
    tumour_area: tuple[float, float]  # range of the tissue fraction of each focus
    flavour: Flavour
    compression: Compression
    quality: int
    tile_size: int
    level_dimensions: tuple[tuple[int, int], ...]
    tissue_fraction: float
    tumour_regions: tuple[TumourRegion, ...]
    tumour_types: int = 1
    site: Site | None = None  # where it was stained and scanned (None: the generator's own colours, no blur)
    mimic_area: tuple[float, float] | None = None  # range of the tissue fraction of each mimic focus; None: none
    mimic_regions: tuple[TumourRegion, ...] = ()  # benign mimics: not tumour
    mimic_kind: MimicKind = "lymphocytes"
    tumour_cellularity: float = 1.0
    mimic_extent: MimicExtent = "foci"

    @property
    def label(self) -> int:
        return int(self.tumour)

    @property
    def tumour_boxes(self) -> tuple[tuple[int, int, int, int], ...]:
        return tuple(region.box for region in self.tumour_regions)

    def to_dict(self, relative_to: Path | None = None) -> dict:
        d = asdict(self)
        d["path"] = str(self.path.relative_to(relative_to) if relative_to else self.path)
        return d

    @classmethod
    def from_dict(cls, d: dict, relative_to: Path | None = None) -> SlideInfo:
        def regions(key: str) -> tuple[TumourRegion, ...]:
            return tuple(
                TumourRegion(
                    centre=tuple(r["centre"]),
                    radius=r["radius"],
                    harmonics=tuple(tuple(h) for h in r["harmonics"]),
                    box=tuple(r["box"]),
                    kind=r.get("kind", 0),  # cohorts written before tumour types
                )
                for r in d.get(key, ())
            )

        path = Path(d["path"])
        return cls(
            **{
                **d,
                "path": relative_to / path if relative_to else path,
                "dimensions": tuple(d["dimensions"]),
                "tumour_area": tuple(d["tumour_area"]),
                "level_dimensions": tuple(tuple(x) for x in d["level_dimensions"]),
                "tumour_regions": regions("tumour_regions"),
                "site": Site.from_dict(d["site"]) if d.get("site") else None,
                "mimic_area": tuple(d["mimic_area"]) if d.get("mimic_area") else None,
                "mimic_regions": regions("mimic_regions"),
            }
        )


class Scene:
    """The procedural slide at level 0. Every value is a function of the constructor arguments and the position."""

    def __init__(
        self,
        seed: int,
        size: tuple[int, int],
        mpp: float,
        tumour: bool,
        contrast: float,
        area: tuple[float, float],
        types: int = 1,
        site: Site | None = None,
        mimic_area: tuple[float, float] | None = None,
        mimic_kind: MimicKind = "lymphocytes",
        cellularity: float = 1.0,
        mimic_extent: MimicExtent = "foci",
    ) -> None:
        self.size = size
        self.scale = max(size)  # tissue geometry is defined relative to the slide, in units of its longest side
        self.step = max(8, self.scale // 1024)  # the tissue field is bilinear between nodes this many px apart
        # a child stream per part: a new part draws from new streams only, so older cohorts keep their pixels
        streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(12)]  # the first 6: one type
        tissue_rng, stroma_rng, normal_rng, tumour_rng, stain_rng, place_rng, kind_rng, tumour_b_rng = streams[:8]
        mimic_place_rng, mimic_rng, among_rng, among_b_rng = streams[8:]

        self.analysis_downsample = max(1, math.ceil(self.scale / _ANALYSIS_PX))
        self._init_tissue(tissue_rng)
        mask = self.tissue(*centres(size, self.analysis_downsample))
        self.tissue_fraction = float(mask.mean())
        regions = self._place_foci(place_rng, mask, self.analysis_downsample, area) if tumour else ()
        if types == 2:  # each focus type a or b, at random
            regions = tuple(
                replace(r, kind=int(k)) for r, k in zip(regions, kind_rng.integers(0, 2, len(regions)), strict=True)
            )
        self.tumour_regions = regions
        self.mimic_regions = ()
        if mimic_area is not None and mimic_extent == "diffuse":  # one region over the whole slide, under the tumour
            self.mimic_regions = (_region((size[0] / 2, size[1] / 2), math.hypot(*size) / 2 + 1, (), size),)
        elif mimic_area is not None:
            self.mimic_regions = self._place_foci(mimic_place_rng, mask, self.analysis_downsample, mimic_area, regions)
        self.blur_px = site.blur_um / mpp if site is not None else 0.0

        stroma = stroma_texture(stroma_rng, mpp)
        normal = nuclei_alpha(normal_rng, mpp, Nuclei())
        # tumour nuclei are paler (vesicular), which offsets part of their extra hematoxylin; lighter stroma offsets
        # the rest (see palette), so tumour and normal tissue share the mean colour
        tumour_q = (
            self._matched(self._focus(tumour_rng, among_rng, mpp, Nuclei().tumour(contrast), cellularity), normal)
            if tumour
            else None
        )
        has_b = any(r.kind == 1 for r in regions)
        tumour_b_q = (
            self._matched(self._focus(tumour_b_rng, among_b_rng, mpp, Nuclei().tumour_b(contrast), cellularity), normal)
            if has_b
            else None
        )
        mimic = Nuclei().lymphocytes() if mimic_kind == "lymphocytes" else Nuclei().reactive(contrast)
        mimic_q = self._matched(nuclei_alpha(mimic_rng, mpp, mimic), normal) if self.mimic_regions else None
        normal_q = quantise(normal)
        self.palette = palette(
            stain_rng,
            histogram(stroma, 256),
            histogram(normal_q, 16),
            *(histogram(q, 16) if q is not None else None for q in (tumour_q, tumour_b_q, mimic_q)),
            recolour=None if site is None else functools.partial(recolour, site=site),
        )
        self.stroma, self.nuclei = doubled(stroma), doubled(normal_q)
        self.tumour_nuclei = doubled(tumour_q) if tumour_q is not None else None
        self.tumour_b_nuclei = doubled(tumour_b_q) if tumour_b_q is not None else None
        self.mimic_nuclei = doubled(mimic_q) if mimic_q is not None else None

    @staticmethod
    def _focus(
        rng: np.random.Generator, among: np.random.Generator, mpp: float, nuclei: Nuclei, cellularity: float
    ) -> np.ndarray:
        """A tumour focus's nuclei opacity: `cellularity` of the density tumour cells, the rest normal nuclei among
        them (drawn from `among`, so a solid tumour's pixels do not depend on it)."""
        alpha = nuclei_alpha(rng, mpp, nuclei, share=cellularity)
        if cellularity < 1:
            alpha = np.maximum(alpha, nuclei_alpha(among, mpp, Nuclei(), share=1 - cellularity))
        return alpha

    @staticmethod
    def _matched(alpha: np.ndarray, normal: np.ndarray) -> np.ndarray:
        """A foreign population's quantised nuclei texture (a tumour type, a mimic), its opacity scaled to the normal
        nuclei's mean by sqrt."""
        alpha = alpha * math.sqrt(normal.mean() / alpha.mean())
        return quantise(alpha)

    # tissue: a sum of elliptical Gaussians plus two octaves of value noise, thresholded at a target area quantile
    def _init_tissue(self, rng: np.random.Generator) -> None:
        w, h = self.size
        k = int(rng.integers(2, 5))
        self.blob_centres = rng.uniform(0.25, 0.75, (k, 2)) * np.array([w, h]) / self.scale
        major = rng.uniform(0.10, 0.22, k)
        self.blob_axes = np.stack([major, major / rng.uniform(1.0, 2.2, k)], axis=1)
        self.blob_angles = rng.uniform(0, np.pi, k)
        self.blob_weights = rng.uniform(0.7, 1.0, k)
        self.lattices = [(rng.standard_normal((n, n)), amp) for n, amp in ((6, 0.25), (17, 0.1))]
        target = rng.uniform(0.35, 0.55)
        # the field is bilinear between nodes on a grid covering the slide plus a margin, and constant beyond it
        nx, ny = (w + _FIELD_MARGIN) // self.step + 2, (h + _FIELD_MARGIN) // self.step + 2
        self.nodes = self._analytic(np.arange(nx) * float(self.step), np.arange(ny) * float(self.step))
        self.nodes -= np.quantile(self.field(*centres(self.size, self.analysis_downsample)), 1 - target)

    def _analytic(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        u = xs[None, :] / self.scale
        v = ys[:, None] / self.scale
        f = np.zeros((len(ys), len(xs)))
        for (cx, cy), (a, b), angle, weight in zip(
            self.blob_centres, self.blob_axes, self.blob_angles, self.blob_weights, strict=True
        ):
            c, s = math.cos(angle), math.sin(angle)
            du, dv = u - cx, v - cy
            f += weight * np.exp(-0.5 * (((du * c + dv * s) / a) ** 2 + ((dv * c - du * s) / b) ** 2))
        for lattice, amp in self.lattices:
            f += amp * value_noise(lattice, xs / self.scale, ys / self.scale)
        return f

    def field(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Tissue field (> 0 is tissue) on the grid ys x xs (level-0 positions)."""
        return self._bilinear(*self._cells(xs, ys))

    def _cells(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return (*_cell(xs / self.step, self.nodes.shape[1]), *_cell(ys / self.step, self.nodes.shape[0]))

    def _bilinear(self, ix: np.ndarray, fx: np.ndarray, iy: np.ndarray, fy: np.ndarray) -> np.ndarray:
        rows = self.nodes[iy.min() : iy.max() + 2]
        along = rows[:, ix] * (1 - fx) + rows[:, ix + 1] * fx  # separable: x first on the few node rows
        iy = iy - iy.min()
        return along[iy] * (1 - fy)[:, None] + along[iy + 1] * fy[:, None]

    def tissue(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        return self.field(xs, ys) > 0

    def _place_foci(
        self,
        rng: np.random.Generator,
        mask: np.ndarray,
        d: int,
        area_range: tuple[float, float],
        avoid: Sequence[TumourRegion] = (),
    ) -> tuple[TumourRegion, ...]:
        """1-3 foci, each covering a fraction of the tissue drawn from `area_range` (less where the tissue is too thin
        to hold it), placed where the tissue is deep enough to contain them whole, apart from `avoid` (the tumour,
        for mimics; with it, a slide without room gets none)."""
        depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1] * d  # the slide edge bounds tumours too
        tissue_px = self.tissue_fraction * self.size[0] * self.size[1]
        xs, ys = centres(self.size, d)
        margin = 2 * d + 1
        taken = np.zeros_like(mask)  # foci (with a margin) placed so far: keep the next one apart
        for region in avoid:
            reach = region.radius * (1 + sum(a for _, a, _ in region.harmonics)) + margin
            taken |= np.hypot(xs[None, :] - region.centre[0], ys[:, None] - region.centre[1]) < reach
        regions: list[TumourRegion] = []
        for _ in range(int(rng.integers(1, 4))):
            harmonics = tuple((k, float(rng.uniform(0, 0.12)), float(rng.uniform(0, 2 * np.pi))) for k in (2, 3, 4, 5))
            amp = sum(a for _, a, _ in harmonics)
            area = rng.uniform(*area_range) * tissue_px
            radius = math.sqrt(area / (np.pi * (1 + sum(a * a for _, a, _ in harmonics) / 2)))
            room = np.minimum(depth, ndimage.distance_transform_edt(~taken) * d) if taken.any() else depth
            radius = min(radius, (room.max() - margin) / (1 + amp))
            if radius < 2:
                if regions or avoid:
                    break
                raise ValueError(f"size: {self.size} has no room for a tumour region; use a larger slide")
            iy, ix = np.nonzero(room >= min(radius * (1 + amp) + margin, room.max()))  # max: exact when clipped
            pick = int(rng.integers(len(ix)))
            centre = (float(xs[ix[pick]]), float(ys[iy[pick]]))
            regions.append(_region(centre, float(radius), harmonics, self.size))
            taken |= np.hypot(xs[None, :] - centre[0], ys[:, None] - centre[1]) < radius * (1 + amp) + margin
        return tuple(regions)

    def render(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Level-0 pixels [y, y+h) x [x, x+w) as uint8 (h, w, 3); defined everywhere, also outside the slide. A
        site's optics blur them (rendered with a margin, so a region's pixels do not depend on its bounds)."""
        if self.blur_px <= 0:
            return self._sharp(x, y, w, h)
        m = math.ceil(4 * self.blur_px)
        sharp = self._sharp(x - m, y - m, w + 2 * m, h + 2 * m).astype(np.float32)
        blurred = ndimage.gaussian_filter(sharp, sigma=(self.blur_px, self.blur_px, 0), mode="nearest", truncate=4.0)
        return np.clip(np.rint(blurred[m : m + h, m : m + w]), 0, 255).astype(np.uint8)

    def _sharp(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        sg = window(self.stroma, STROMA_PERIOD, x, y, w, h).astype(np.uint16)
        xs, ys = np.arange(x, x + w, dtype=np.float64), np.arange(y, y + h, dtype=np.float64)
        cells = self._cells(xs, ys)
        ix, _, iy, _ = cells
        nodes = self.nodes[iy[0] : iy[-1] + 2, ix[0] : ix[-1] + 2]
        if (nodes <= 0).all():  # bilinear interpolation cannot leave the nodes' range
            return np.take(self.palette, sg + GLASS, axis=0)
        idx = (sg << 4) | window(self.nuclei, NUCLEI_PERIOD, x, y, w, h)
        foci = (  # later ones paint over earlier ones: the tumour over a diffuse mimic (foci never overlap)
            (self.mimic_regions, MIMIC, self.mimic_nuclei),
            ([r for r in self.tumour_regions if r.kind == 0], TUMOUR, self.tumour_nuclei),
            ([r for r in self.tumour_regions if r.kind == 1], TUMOUR_B, self.tumour_b_nuclei),
        )
        for regions, offset, nuclei in foci:
            inside = in_regions(regions, xs, ys)
            if inside is not None:
                tumour = (sg << 4) | window(nuclei, NUCLEI_PERIOD, x, y, w, h)
                idx = np.where(inside, tumour + offset, idx)
        if not (nodes > 0).all():
            idx = np.where(self._bilinear(*cells) > 0, idx, sg + GLASS)
        return np.take(self.palette, idx, axis=0)


cached_scene = functools.lru_cache(maxsize=4)(Scene)  # a scene's textures take seconds: the last few slides'


def scene_of(info: SlideInfo) -> Scene:
    return cached_scene(
        info.seed,
        info.dimensions,
        info.mpp,
        info.tumour,
        info.tumour_contrast,
        info.tumour_area,
        info.tumour_types,
        info.site,
        info.mimic_area,
        info.mimic_kind,
        info.tumour_cellularity,
        info.mimic_extent,
    )


def centres(size: tuple[int, int], downsample: float) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 positions of the pixel centres of a grid `downsample` times coarser than level 0."""
    w, h = size
    nx, ny = math.ceil(w / downsample), math.ceil(h / downsample)
    return (np.arange(nx) * downsample + (downsample - 1) / 2, np.arange(ny) * downsample + (downsample - 1) / 2)


def _region(centre: tuple[float, float], radius: float, harmonics: tuple, size: tuple[int, int]) -> TumourRegion:
    theta = np.linspace(0, 2 * np.pi, 2880, endpoint=False)
    c, s = np.cos(theta), np.sin(theta)
    r = radius * radial(c, s, harmonics)
    x0 = max(0, math.floor(centre[0] + (r * c).min()) - 1)
    y0 = max(0, math.floor(centre[1] + (r * s).min()) - 1)
    x1 = min(size[0], math.ceil(centre[0] + (r * c).max()) + 2)
    y1 = min(size[1], math.ceil(centre[1] + (r * s).max()) + 2)
    return TumourRegion(centre, radius, harmonics, (x0, y0, x1 - x0, y1 - y0))


def in_regions(regions: Sequence[TumourRegion], xs: np.ndarray, ys: np.ndarray) -> np.ndarray | None:
    """Membership of any of `regions` on the grid ys x xs (sorted level-0 positions), evaluated inside the regions'
    boxes only; None when no box meets the grid."""
    mask = None
    for region in regions:
        bx, by, bw, bh = region.box
        (i0, i1), (j0, j1) = np.searchsorted(xs, [bx, bx + bw]), np.searchsorted(ys, [by, by + bh])
        if i0 < i1 and j0 < j1:
            if mask is None:
                mask = np.zeros((len(ys), len(xs)), bool)
            mask[j0:j1, i0:i1] |= region.contains(xs[i0:i1], ys[j0:j1])
    return mask


def _cell(g: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell index and fraction of grid positions `g` on n nodes, clamped to the grid."""
    g = np.clip(g, 0, n - 1)
    i = np.minimum(np.floor(g).astype(np.intp), n - 2)
    return i, g - i
