"""Synthetic, labelled cohorts of real pyramidal whole-slide files, so tests, the demo and benchmarks need no download.

A slide is glass with a few smooth tissue pieces stained like H&E (pink stroma, purple nuclei). Tumour slides add a few
small tumour foci inside the tissue whose nuclei are larger, denser and more irregular, with the mean colour matched
to normal tissue: the label lives in the local texture, not in global colour statistics. `tumour_contrast` scales the
difference: 0 is indistinguishable; at 0.5 (default) a linear probe on a random-init ResNet-18 separates 64 px tumour
and normal patches only partly (~75 %) while a small CNN trained for 50 steps separates them (~99 %). `tumour_area`
sets how much of the tissue each focus covers, i.e. the MIL witness rate.

Content is a pure function of (seed, slide size, mpp, tumour, tumour_contrast, tumour_area) and position, so any
region at any level can be regenerated (`render_region`, `tissue_mask`, `tumour_mask`). Level k > 0 is the 4x4 area
average of level k-1 (partial blocks at the image edge average the pixels that exist). Files are written tile by tile
with a bounded memory footprint: lower levels are spooled to raw files next to the output while level 0 is written.

Cohort layout (`make_cohort`): `root/slides/<slide_id>.{svs,tif,ome.tif}`, `root/labels.csv` with columns
`slide_id,label,patient_id` where label is 0 (normal) or 1 (tumour), and `root/cohort.json` (parameters and the
`SlideInfo` of every slide, paths relative to root). Run `python -m data_modules.synthetic ROOT --help`.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Literal, get_args

import numpy as np
import tifffile
from scipy import ndimage
from tqdm.auto import tqdm

Flavour = Literal["svs", "ome", "tiff"]
Compression = Literal["jpeg", "jpeg2000", "lzw", "deflate"]

EXTENSIONS: dict[str, str] = {"svs": ".svs", "tiff": ".tif", "ome": ".ome.tif"}
CLASSES = ("normal", "tumour")  # labels.csv label 0 / 1

_STROMA_PERIOD = 1024  # stroma texture period in px (FFT-friendly)
_NUCLEI_PERIOD = 1021  # nuclei texture period: prime, so the two textures never line up again on a slide
_FIELD_MARGIN = 1024  # px beyond the slide's right and bottom edges where the tissue field still varies
_ANALYSIS_PX = 512  # resolution (longest side) at which tissue is measured and tumours are placed
_THUMBNAIL_PX = 1024  # an SVS thumbnail is the first pyramid level at most this large
_TUMOUR, _GLASS = 4096, 8192  # palette offsets: normal tissue [0, 4096), tumour [4096, 8192), glass [8192, 8448)
_APERIO = "Aperio Image Library v12.0.15"

_LIGHT_STROMA = np.array([240.0, 186.0, 216.0])
_DARK_STROMA = np.array([214.0, 124.0, 176.0])
_NUCLEUS = np.array([78.0, 46.0, 128.0])
_GLASS_RGB = np.array([241.0, 241.0, 243.0])
_PIXEL_NOISE = 0.5  # grey levels per step of the 8-level pixel noise


@dataclass(frozen=True)
class _Nuclei:
    """Nucleus population of a tissue class, in physical units so the texture follows the mpp."""

    radius_um: float = 2.6
    radius_sd_um: float = 0.3
    per_100um2: float = 0.85
    aspect_sd: float = 0.12  # elongation: axis ratio 1 + |N(0, sd)|
    lobes: float = 0.04  # boundary irregularity: relative amplitude of the 2nd and 3rd radial harmonics

    def tumour(self, contrast: float) -> _Nuclei:
        return _Nuclei(
            radius_um=self.radius_um * (1 + 0.35 * contrast),
            radius_sd_um=self.radius_sd_um * (1 + 1.5 * contrast),
            per_100um2=self.per_100um2 * (1 + 0.4 * contrast),
            aspect_sd=self.aspect_sd + 0.15 * contrast,
            lobes=self.lobes + 0.10 * contrast,
        )


@dataclass(frozen=True)
class TumourRegion:
    """A tumour focus: points at distance < radius * (1 + sum a cos(k theta + phi)) from the centre (level-0 px)."""

    centre: tuple[float, float]
    radius: float
    harmonics: tuple[tuple[int, float, float], ...]  # (k, a, phi)
    box: tuple[int, int, int, int]  # (x, y, w, h), level-0 px, clipped to the slide

    def contains(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Membership on the grid ys x xs (level-0 coordinates) as a (len(ys), len(xs)) bool array."""
        dx = np.asarray(xs, np.float64)[None, :] - self.centre[0]
        dy = np.asarray(ys, np.float64)[:, None] - self.centre[1]
        d = np.hypot(dx, dy)
        safe = np.where(d > 0, d, 1.0)
        return d < self.radius * _radial(dx / safe, dy / safe, self.harmonics)


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
        regions = tuple(
            TumourRegion(
                centre=tuple(r["centre"]),
                radius=r["radius"],
                harmonics=tuple(tuple(h) for h in r["harmonics"]),
                box=tuple(r["box"]),
            )
            for r in d["tumour_regions"]
        )
        path = Path(d["path"])
        return cls(
            **{
                **d,
                "path": relative_to / path if relative_to else path,
                "dimensions": tuple(d["dimensions"]),
                "tumour_area": tuple(d["tumour_area"]),
                "level_dimensions": tuple(tuple(x) for x in d["level_dimensions"]),
                "tumour_regions": regions,
            }
        )


# ----------------------------------------------------------------------------------------------- procedural content


class _Scene:
    """The procedural slide at level 0. Every value is a function of the constructor arguments and the position."""

    def __init__(
        self, seed: int, size: tuple[int, int], mpp: float, tumour: bool, contrast: float, area: tuple[float, float]
    ) -> None:
        self.size = size
        self.scale = max(size)  # tissue geometry is defined relative to the slide, in units of its longest side
        self.step = max(8, self.scale // 1024)  # the tissue field is bilinear between nodes this many px apart
        streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6)]
        tissue_rng, stroma_rng, normal_rng, tumour_rng, stain_rng, place_rng = streams

        self.analysis_downsample = max(1, math.ceil(self.scale / _ANALYSIS_PX))
        self._init_tissue(tissue_rng)
        stroma = _stroma_texture(stroma_rng, mpp)
        normal = _nuclei_alpha(normal_rng, mpp, _Nuclei())
        tumour_alpha = _nuclei_alpha(tumour_rng, mpp, _Nuclei().tumour(contrast)) if tumour else None
        if tumour_alpha is not None:
            # tumour nuclei are paler (vesicular), which offsets part of their extra hematoxylin; lighter stroma
            # offsets the rest (see _palette), so tumour and normal tissue share the mean colour
            tumour_alpha *= math.sqrt(normal.mean() / tumour_alpha.mean())
        normal_q = _quantise(normal)
        tumour_q = _quantise(tumour_alpha) if tumour_alpha is not None else None
        self.palette = _palette(
            stain_rng,
            _histogram(stroma, 256),
            _histogram(normal_q, 16),
            _histogram(tumour_q, 16) if tumour_q is not None else None,
        )
        self.stroma, self.nuclei = _doubled(stroma), _doubled(normal_q)
        self.tumour_nuclei = _doubled(tumour_q) if tumour_q is not None else None

        mask = self.tissue(*_centres(size, self.analysis_downsample))
        self.tissue_fraction = float(mask.mean())
        self.tumour_regions = self._place_tumours(place_rng, mask, self.analysis_downsample, area) if tumour else ()

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
        self.nodes -= np.quantile(self.field(*_centres(self.size, self.analysis_downsample)), 1 - target)

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
            f += amp * _value_noise(lattice, xs / self.scale, ys / self.scale)
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

    def _place_tumours(
        self, rng: np.random.Generator, mask: np.ndarray, d: int, area_range: tuple[float, float]
    ) -> tuple[TumourRegion, ...]:
        """1-3 foci, each covering a fraction of the tissue drawn from `area_range` (less where the tissue is too thin
        to hold it), placed where the tissue is deep enough to contain them whole."""
        depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1] * d  # the slide edge bounds tumours too
        tissue_px = self.tissue_fraction * self.size[0] * self.size[1]
        xs, ys = _centres(self.size, d)
        margin = 2 * d + 1
        taken = np.zeros_like(mask)  # foci (with a margin) placed so far: keep the next one apart
        regions: list[TumourRegion] = []
        for _ in range(int(rng.integers(1, 4))):
            harmonics = tuple((k, float(rng.uniform(0, 0.12)), float(rng.uniform(0, 2 * np.pi))) for k in (2, 3, 4, 5))
            amp = sum(a for _, a, _ in harmonics)
            area = rng.uniform(*area_range) * tissue_px
            radius = math.sqrt(area / (np.pi * (1 + sum(a * a for _, a, _ in harmonics) / 2)))
            room = np.minimum(depth, ndimage.distance_transform_edt(~taken) * d) if taken.any() else depth
            radius = min(radius, (room.max() - margin) / (1 + amp))
            if radius < 2:
                if regions:
                    break
                raise ValueError(f"size: {self.size} has no room for a tumour region; use a larger slide")
            iy, ix = np.nonzero(room >= min(radius * (1 + amp) + margin, room.max()))  # max: exact when clipped
            pick = int(rng.integers(len(ix)))
            centre = (float(xs[ix[pick]]), float(ys[iy[pick]]))
            regions.append(_region(centre, float(radius), harmonics, self.size))
            taken |= np.hypot(xs[None, :] - centre[0], ys[:, None] - centre[1]) < radius * (1 + amp) + margin
        return tuple(regions)

    def render(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Level-0 pixels [y, y+h) x [x, x+w) as uint8 (h, w, 3); defined everywhere, also outside the slide."""
        sg = _window(self.stroma, _STROMA_PERIOD, x, y, w, h).astype(np.uint16)
        xs, ys = np.arange(x, x + w, dtype=np.float64), np.arange(y, y + h, dtype=np.float64)
        cells = self._cells(xs, ys)
        ix, _, iy, _ = cells
        nodes = self.nodes[iy[0] : iy[-1] + 2, ix[0] : ix[-1] + 2]
        if (nodes <= 0).all():  # bilinear interpolation cannot leave the nodes' range
            return np.take(self.palette, sg + _GLASS, axis=0)
        idx = (sg << 4) | _window(self.nuclei, _NUCLEI_PERIOD, x, y, w, h)
        inside = _tumour(self.tumour_regions, xs, ys)
        if inside is not None:
            tumour = (sg << 4) | _window(self.tumour_nuclei, _NUCLEI_PERIOD, x, y, w, h)
            idx = np.where(inside, tumour + _TUMOUR, idx)
        if not (nodes > 0).all():
            idx = np.where(self._bilinear(*cells) > 0, idx, sg + _GLASS)
        return np.take(self.palette, idx, axis=0)


@functools.lru_cache(maxsize=4)
def _scene(
    seed: int, size: tuple[int, int], mpp: float, tumour: bool, contrast: float, area: tuple[float, float]
) -> _Scene:
    return _Scene(seed, size, mpp, tumour, contrast, area)


def _scene_of(info: SlideInfo) -> _Scene:
    return _scene(info.seed, info.dimensions, info.mpp, info.tumour, info.tumour_contrast, info.tumour_area)


def _centres(size: tuple[int, int], downsample: float) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 positions of the pixel centres of a grid `downsample` times coarser than level 0."""
    w, h = size
    nx, ny = math.ceil(w / downsample), math.ceil(h / downsample)
    return (np.arange(nx) * downsample + (downsample - 1) / 2, np.arange(ny) * downsample + (downsample - 1) / 2)


def _region(centre: tuple[float, float], radius: float, harmonics: tuple, size: tuple[int, int]) -> TumourRegion:
    theta = np.linspace(0, 2 * np.pi, 2880, endpoint=False)
    c, s = np.cos(theta), np.sin(theta)
    r = radius * _radial(c, s, harmonics)
    x0 = max(0, math.floor(centre[0] + (r * c).min()) - 1)
    y0 = max(0, math.floor(centre[1] + (r * s).min()) - 1)
    x1 = min(size[0], math.ceil(centre[0] + (r * c).max()) + 2)
    y1 = min(size[1], math.ceil(centre[1] + (r * s).max()) + 2)
    return TumourRegion(centre, radius, harmonics, (x0, y0, x1 - x0, y1 - y0))


def _radial(c: np.ndarray, s: np.ndarray, harmonics: Sequence[tuple[int, object, object]]) -> np.ndarray:
    """1 + sum of a cos(k theta + phi) over (k, a, phi) from cos and sin of theta, by angle addition (no per-pixel
    trigonometry); a and phi may be arrays that broadcast against c."""
    out, k, ck, sk = 1.0, 1, c, s
    for kk, a, phi in sorted(harmonics, key=lambda h: h[0]):
        while k < kk:
            ck, sk, k = ck * c - sk * s, sk * c + ck * s, k + 1
        out = out + a * (ck * np.cos(phi) - sk * np.sin(phi))
    return out


def _tumour(regions: Sequence[TumourRegion], xs: np.ndarray, ys: np.ndarray) -> np.ndarray | None:
    """Tumour membership on the grid ys x xs (sorted level-0 positions), evaluated inside the regions' boxes only;
    None when no box meets the grid."""
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


def _value_noise(lattice: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Smooth periodic noise (period 1 in u and v) on the grid v x u."""
    n = lattice.shape[0]
    gu, gv = u * n, v * n
    iu, iv = np.floor(gu).astype(np.int64), np.floor(gv).astype(np.int64)
    fu, fv = gu - iu, gv - iv
    fu, fv = (fu * fu * (3 - 2 * fu))[None, :], (fv * fv * (3 - 2 * fv))[:, None]
    iu0, iu1, iv0, iv1 = iu % n, (iu + 1) % n, iv % n, (iv + 1) % n
    top = lattice[iv0][:, iu0] * (1 - fu) + lattice[iv0][:, iu1] * fu
    bottom = lattice[iv1][:, iu0] * (1 - fu) + lattice[iv1][:, iu1] * fu
    return top * (1 - fv) + bottom * fv


def _stroma_texture(rng: np.random.Generator, mpp: float) -> np.ndarray:
    """Periodic stroma: uint8 with 5 bits of eosin density (fine grain, fibres, patches) and 3 bits of pixel noise."""
    p = _STROMA_PERIOD
    fy, fx = np.fft.fftfreq(p)[:, None], np.fft.rfftfreq(p)[None, :]

    def band(sx_um: float, sy_um: float) -> np.ndarray:
        sx, sy = sx_um / mpp, sy_um / mpp
        spectrum = np.fft.rfft2(rng.standard_normal((p, p))) * np.exp(-2 * np.pi**2 * ((sx * fx) ** 2 + (sy * fy) ** 2))
        x = np.fft.irfft2(spectrum, s=(p, p))
        return (x - x.mean()) / x.std()

    z = 0.45 * band(0.7, 0.7) + 0.6 * np.maximum(band(0.6, 6.0), band(6.0, 0.6)) + 0.7 * band(12.0, 12.0)
    z = (z - z.mean()) / z.std()
    density = np.clip(np.rint((0.5 + 0.22 * z) * 31), 0, 31).astype(np.uint8)
    return (density << 3) | rng.integers(0, 8, (p, p), dtype=np.uint8)


def _nuclei_alpha(rng: np.random.Generator, mpp: float, nuclei: _Nuclei) -> np.ndarray:
    """Periodic hematoxylin opacity in [0, 1] of a Poisson population of irregular elliptical nuclei."""
    p = _NUCLEI_PERIOD
    n = int(rng.poisson(nuclei.per_100um2 / 100 * (p * mpp) ** 2))
    cx, cy = rng.uniform(0, p, (2, n))
    radius = rng.normal(nuclei.radius_um, nuclei.radius_sd_um, n).clip(0.6 * nuclei.radius_um, 1.8 * nuclei.radius_um)
    radius /= mpp
    aspect = np.sqrt(1 + np.abs(rng.normal(0, nuclei.aspect_sd, n)))
    angle = rng.uniform(0, np.pi, n)
    lobe_a = nuclei.lobes * rng.uniform(0.3, 1.2, (2, n))  # 2nd and 3rd radial harmonics
    lobe_phi = rng.uniform(0, 2 * np.pi, (2, n))
    darkness = rng.uniform(0.75, 1.0, n)
    reach = radius * aspect * (1 + lobe_a.sum(0)) + 1.5
    order = np.argsort(reach)  # stamp similar sizes together: each chunk's window fits its largest nucleus
    alpha = np.zeros(p * p, np.float32)
    for i in range(0, n, 256):
        s = order[i : i + 256]  # nuclei of this chunk
        offsets = np.arange(-math.ceil(reach[s].max()), math.ceil(reach[s].max()) + 1)
        px = np.floor(cx[s]).astype(np.int64)[:, None] + offsets
        py = np.floor(cy[s]).astype(np.int64)[:, None] + offsets
        dx = (px - cx[s, None])[:, None, :]
        dy = (py - cy[s, None])[:, :, None]
        c, sn = np.cos(angle[s])[:, None, None], np.sin(angle[s])[:, None, None]
        along, across = dx * c + dy * sn, dy * c - dx * sn
        rho = np.hypot(along / aspect[s, None, None], across * aspect[s, None, None])
        d = np.maximum(np.hypot(along, across), 1e-9)
        lobes = [(k, lobe_a[k - 2, s, None, None], lobe_phi[k - 2, s, None, None]) for k in (2, 3)]
        edge = radius[s, None, None] * _radial(along / d, across / d, lobes)
        a = np.clip(edge - rho + 0.5, 0, 1) * darkness[s, None, None] * rng.uniform(0.8, 1.0, rho.shape)
        index = (py % p)[:, :, None] * p + (px % p)[:, None, :]
        np.maximum.at(alpha, index.ravel(), a.ravel().astype(np.float32))
    return alpha.reshape(p, p)


def _histogram(values: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(values.ravel(), minlength=n) / values.size


def _quantise(alpha: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(alpha * 15), 0, 15).astype(np.uint8)


def _doubled(texture: np.ndarray) -> np.ndarray:
    """Two periods in each direction, so any window up to one period is a plain slice."""
    return np.tile(texture, (2, 2))


def _window(doubled: np.ndarray, period: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    x, y = x % period, y % period
    if w <= period and h <= period:
        return doubled[y : y + h, x : x + w]
    return doubled[np.ix_((y + np.arange(h)) % period, (x + np.arange(w)) % period)]


def _palette(
    rng: np.random.Generator, p_stroma: np.ndarray, p_normal: np.ndarray, p_tumour: np.ndarray | None
) -> np.ndarray:
    """RGB for every (class, stroma byte, nucleus level); tumour stroma is shifted so that tumour and normal tissue
    have the same expected colour."""
    stain = rng.uniform(0.96, 1.04, (3, 3))  # per-slide stain variation
    light, dark, nucleus = _LIGHT_STROMA * stain[0], _DARK_STROMA * stain[1], _NUCLEUS * stain[2]
    sg = np.arange(256)
    stroma = light + (dark - light) * ((sg >> 3) / 31)[:, None]  # (256, 3)
    noise = ((sg & 7) - 3.5) * _PIXEL_NOISE
    alpha = np.arange(16) / 15

    def tissue(shift: np.ndarray) -> np.ndarray:  # (256, 16, 3)
        mix = (stroma + shift)[:, None, :] * (1 - alpha)[None, :, None] + nucleus * alpha[None, :, None]
        return np.clip(mix + noise[:, None, None], 0, 255)

    def mean(colours: np.ndarray, p_nuclei: np.ndarray) -> np.ndarray:
        return np.einsum("s,n,snc->c", p_stroma, p_nuclei, colours)

    normal = tissue(np.zeros(3))
    tumour = normal
    if p_tumour is not None:
        shift = np.zeros(3)
        for _ in range(4):  # linear solve, repeated for the clipping
            shift += (mean(normal, p_normal) - mean(tissue(shift), p_tumour)) / (1 - p_tumour @ alpha)
        tumour = tissue(shift)
    glass = np.clip(_GLASS_RGB + noise[:, None], 0, 255)
    return np.rint(np.concatenate([normal.reshape(-1, 3), tumour.reshape(-1, 3), glass])).astype(np.uint8)


def _area4(a: np.ndarray) -> np.ndarray:
    """4x4 area average (rounded) of an RGB uint8 image; edge blocks average the pixels they have."""
    h, w = a.shape[:2]
    bh, bw = -(-h // 4), -(-w // 4)
    if h % 4 or w % 4:
        padded = np.zeros((bh * 4, bw * 4, 3), np.uint8)
        padded[:h, :w] = a
        a = padded
    rows = a[0::4].astype(np.uint16)
    rows += a[1::4]
    rows += a[2::4]
    rows += a[3::4]
    sums = rows[:, 0::4] + rows[:, 1::4]
    sums += rows[:, 2::4]
    sums += rows[:, 3::4]  # <= 16 * 255, so 2 * sums + count fits uint16
    count = np.minimum(4, h - 4 * np.arange(bh))[:, None, None] * np.minimum(4, w - 4 * np.arange(bw))[None, :, None]
    count = count.astype(np.uint16)
    return ((2 * sums + count) // (2 * count)).astype(np.uint8)


# -------------------------------------------------------------------------------------------- regenerating content


def render_region(info: SlideInfo, location: tuple[int, int], size: tuple[int, int], level: int = 0) -> np.ndarray:
    """The pixels the file holds before compression, OpenSlide-style: `location` in level-0 px, `size` in level px.

    Level 0 is defined everywhere; other levels only inside the level and at locations on the level's pixel grid.
    """
    x, y = location
    w, h = size
    scene = _scene_of(info)
    if not 0 <= level < len(info.level_dimensions):
        raise ValueError(f"level: expected 0..{len(info.level_dimensions) - 1}, got {level}")
    if w < 1 or h < 1:
        raise ValueError(f"size: expected positive (w, h), got {size}")
    if level == 0:
        return scene.render(x, y, w, h)
    ds = 4**level
    lw, lh = info.level_dimensions[level]
    if x % ds or y % ds or x < 0 or y < 0 or x // ds + w > lw or y // ds + h > lh:
        raise ValueError(f"location/size: level {level} region must lie inside {lw}x{lh} at multiples of {ds}")
    return _render_level(scene, info.level_dimensions, level, x // ds, y // ds, w, h)


def _render_level(
    scene: _Scene, dims: Sequence[tuple[int, int]], level: int, x: int, y: int, w: int, h: int
) -> np.ndarray:
    if level == 0:
        return scene.render(x, y, w, h)
    pw, ph = dims[level - 1]
    x0, y0 = 4 * x, 4 * y
    below = _render_level(scene, dims, level - 1, x0, y0, min(4 * w, pw - x0), min(4 * h, ph - y0))
    return _area4(below)


def tissue_mask(info: SlideInfo, downsample: float) -> np.ndarray:
    """Tissue ground truth on a grid `downsample` times coarser than level 0, shape (ceil(h/ds), ceil(w/ds))."""
    return _scene_of(info).tissue(*_centres(info.dimensions, _check_downsample(downsample)))


def tumour_mask(info: SlideInfo, downsample: float) -> np.ndarray:
    """Tumour ground truth on a grid `downsample` times coarser than level 0, shape (ceil(h/ds), ceil(w/ds))."""
    xs, ys = _centres(info.dimensions, _check_downsample(downsample))
    mask = _tumour(info.tumour_regions, xs, ys)
    return np.zeros((len(ys), len(xs)), bool) if mask is None else mask


def _check_downsample(downsample: float) -> float:
    if not downsample >= 1:
        raise ValueError(f"downsample: expected >= 1, got {downsample}")
    return float(downsample)


# ---------------------------------------------------------------------------------------------------- file writing


class _Spool:
    """Pyramid levels 1.. built by streaming 4x4 area averages into raw files, so no level is ever held in memory."""

    def __init__(self, dims: Sequence[tuple[int, int]], directory: Path) -> None:
        self.dims = list(dims)
        self.files: list[IO[bytes]] = [open(directory / f"level{k}.raw", "w+b") for k in range(1, len(dims))]
        # pending[k - 1]: rows of level k waiting for a complete 4-row group of level k + 1
        self.pending = [np.zeros((0, w, 3), np.uint8) for w, _ in self.dims[1:-1]]

    def push(self, level: int, rows: np.ndarray) -> None:
        """Append the next rows of `level` (>= 1) and propagate complete 4-row groups down the pyramid."""
        self.files[level - 1].write(np.ascontiguousarray(rows).tobytes())
        if level + 1 < len(self.dims):
            rows = np.concatenate([self.pending[level - 1], rows])
            whole = len(rows) // 4 * 4
            self.pending[level - 1] = rows[whole:]
            if whole:
                self.push(level + 1, _area4(rows[:whole]))

    def finish(self) -> None:
        """Flush the partial row groups at the bottom edge, top level first."""
        for level in range(1, len(self.dims) - 1):
            rows, self.pending[level - 1] = self.pending[level - 1], self.pending[level - 1][:0]
            if len(rows):
                self.push(level + 1, _area4(rows))
        for f, (w, h) in zip(self.files, self.dims[1:], strict=True):
            if f.tell() != w * h * 3:
                raise RuntimeError(f"pyramid spool: level {w}x{h} has {f.tell()} bytes")

    def rows(self, level: int, y: int, n: int) -> np.ndarray:
        w = self.dims[level][0]
        f = self.files[level - 1]
        f.seek(y * w * 3)
        return np.frombuffer(f.read(n * w * 3), np.uint8).reshape(n, w, 3)

    def close(self) -> None:
        for f in self.files:
            f.close()


def _level_dimensions(width: int, height: int, tile_size: int, levels: int | None) -> list[tuple[int, int]]:
    """Pyramid sizes, each level a quarter of the previous (rounded up); by default, like scanners, down to the first
    level whose next quarter would be smaller than a tile."""
    dims = [(width, height)]
    while (len(dims) < levels) if levels else max(dims[-1]) / 4 >= tile_size:
        w, h = dims[-1]
        dims.append((-(-w // 4), -(-h // 4)))
    return dims


def _level0_tiles(
    scene: _Scene, dims: Sequence[tuple[int, int]], tile: int, spool: _Spool | None
) -> Iterator[np.ndarray]:
    w, h = dims[0]
    for y in range(0, h, tile):
        th = min(tile, h - y)
        band = np.empty((-(-th // 4), dims[1][0], 3), np.uint8) if spool else None
        for x in range(0, w, tile):
            pixels = scene.render(x, y, tile, tile)
            if spool:
                block = _area4(pixels[:th, : min(tile, w - x)])
                band[:, x // 4 : x // 4 + block.shape[1]] = block
                if x + tile >= w:  # before the last yield: the writer stops pulling after the last tile
                    spool.push(1, band)
            yield pixels


def _spooled_tiles(spool: _Spool, level: int, tile: int) -> Iterator[np.ndarray]:
    w, h = spool.dims[level]
    for y in range(0, h, tile):
        band = spool.rows(level, y, min(tile, h - y))
        for x in range(0, w, tile):
            pixels = band[:, x : x + tile]
            if pixels.shape[:2] != (tile, tile):  # replicate the edge rather than pad black: no JPEG ringing
                pixels = np.pad(pixels, ((0, tile - pixels.shape[0]), (0, tile - pixels.shape[1]), (0, 0)), mode="edge")
            yield pixels


def _codec(compression: Compression, quality: int, flavour: Flavour) -> dict:
    """tifffile arguments. JPEG is RGB without chroma subsampling (as Aperio writes it): OpenSlide and tifffile decode
    it to identical pixels. JPEG 2000 in SVS uses Aperio's tag 33005 (which OpenSlide reads); elsewhere the common
    34712, which OpenSlide does not read."""
    if compression == "jpeg":
        args = {"level": quality, "outcolorspace": "RGB"}
        return {"compression": "jpeg", "compressionargs": args, "subsampling": (1, 1)}
    if compression == "jpeg2000":
        return {"compression": 33005 if flavour == "svs" else "jpeg2000", "compressionargs": {"level": quality}}
    return {"compression": "lzw" if compression == "lzw" else "zlib", "predictor": True}


def _label_image(seed: int, height: int) -> np.ndarray:
    """A square slide label with a barcode that encodes the seed."""
    label = np.full((256, 256, 3), 250, np.uint8)
    bits = np.unpackbits(np.frombuffer(seed.to_bytes(8, "little"), np.uint8))
    for i, bit in enumerate(bits):
        label[40:120, 32 + 3 * i : 33 + 3 * i + int(bit)] = 20
    rows = np.arange(height) * 256 // height
    return label[rows][:, rows]


def _write_pyramid(tmp: Path, scene: _Scene, info: SlideInfo, spool_dir: Path, workers: int) -> None:
    dims = list(info.level_dimensions)
    (w, h), tile, flavour, mpp = info.dimensions, info.tile_size, info.flavour, info.mpp
    spooled = list(dims)  # SVS also needs a thumbnail level, possibly below the pyramid
    while flavour == "svs" and (len(spooled) < 2 or max(spooled[-1]) > _THUMBNAIL_PX):
        spooled.append((-(-spooled[-1][0] // 4), -(-spooled[-1][1] // 4)))
    spool = _Spool(spooled, spool_dir) if len(spooled) > 1 else None
    tiled = {
        "dtype": np.uint8, "photometric": "rgb", "tile": (tile, tile), "maxworkers": workers,
        "buffersize": 8 * workers * tile * tile * 3, **_codec(info.compression, info.quality, flavour),
    }  # fmt: skip
    stripped = {"photometric": "rgb", "metadata": None, "rowsperstrip": 64}
    codec = {"jpeg": f"JPEG/RGB Q={info.quality}", "jpeg2000": f"J2K/RGB Q={info.quality}"}.get(
        info.compression, info.compression.upper()
    )
    aperio = f"{_APERIO} \r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile})"
    props = f"|AppMag = {round(10 / mpp)}|MPP = {mpp}|Filename = {info.path.name}|ScanScope ID = icmil-pl synthetic"

    def page(level: int) -> dict:
        lw, lh = dims[level]
        if flavour == "svs":
            return {"metadata": None, "description": f"{aperio}{f' -> {lw}x{lh}' if level else ''} {codec}{props}"}
        resolution = {"resolution": (1e4 / mpp * lw / w, 1e4 / mpp * lh / h), "resolutionunit": "CENTIMETER"}
        if level:
            return {"metadata": None, "subfiletype": 1, **resolution}
        if flavour == "tiff":
            return {"metadata": None, **resolution}
        ome = {"axes": "YXS", "Name": info.path.name, "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
               "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"}  # fmt: skip
        return {"metadata": ome, "subifds": len(dims) - 1, **resolution}

    try:
        with tifffile.TiffWriter(tmp, bigtiff=w * h * 3 > 2**31, ome=flavour == "ome") as tif:
            tif.write(_level0_tiles(scene, spooled, tile, spool), shape=(h, w, 3), **tiled, **page(0))
            if spool:
                spool.finish()
            if flavour == "svs":  # page 1 is the thumbnail, as in Aperio files
                thumb = spool.rows(len(spooled) - 1, 0, spooled[-1][1])
                desc = f"{_APERIO} \r\n{w}x{h} -> {thumb.shape[1]}x{thumb.shape[0]} - {codec}{props}"
                tif.write(thumb, description=desc, **stripped, **_codec("jpeg", 90, flavour))
            for level in range(1, len(dims)):
                lw, lh = dims[level]
                tif.write(_spooled_tiles(spool, level, tile), shape=(lh, lw, 3), **tiled, **page(level))
            if flavour == "svs":
                label = _label_image(info.seed, thumb.shape[0])
                desc = f"{_APERIO}\r\nlabel {label.shape[1]}x{label.shape[0]}"
                tif.write(label, description=desc, subfiletype=1, compression="lzw", **stripped)
                macro = np.concatenate([label, thumb], axis=1)
                desc = f"{_APERIO}\r\nmacro {macro.shape[1]}x{macro.shape[0]}"
                tif.write(macro, description=desc, subfiletype=9, **stripped, **_codec("jpeg", 90, flavour))
    finally:
        if spool:
            spool.close()


def write_slide(
    path: str | os.PathLike,
    width: int,
    height: int,
    *,
    seed: int,
    tumour: bool,
    mpp: float = 0.5,
    flavour: Flavour = "svs",
    tile_size: int = 256,
    compression: Compression = "jpeg",
    quality: int = 90,
    levels: int | None = None,
    tumour_contrast: float = 0.5,
    tumour_area: tuple[float, float] = (0.01, 0.05),
    workers: int = 1,
) -> SlideInfo:
    """Write one synthetic slide atomically (temp name, then rename) and return its ground truth.

    flavour "svs": Aperio layout (OpenSlide vendor "aperio"): level 0, a stripped thumbnail, the other levels, a label
    and a macro image. "tiff": generic pyramidal TIFF, levels as reduced-resolution pages, mpp in X/YResolution (per
    cm); OpenSlide reads it as "generic-tiff". "ome": OME-TIFF with the levels as SubIFDs and PhysicalSizeX/Y in um.
    `tumour_area`: range of the tissue fraction each tumour focus covers (1-3 foci). `workers` threads compress tiles
    (memory grows by 8 tiles per worker).
    """
    _check("width", isinstance(width, int) and width >= 64, "an int >= 64", width)
    _check("height", isinstance(height, int) and height >= 64, "an int >= 64", height)
    _check("seed", isinstance(seed, int) and 0 <= seed < 2**64, "an int in [0, 2**64)", seed)
    _check("mpp", isinstance(mpp, int | float) and 0.05 <= mpp <= 20, "microns per pixel in [0.05, 20]", mpp)
    _check("flavour", flavour in get_args(Flavour), f"one of {get_args(Flavour)}", flavour)
    _check("tile_size", isinstance(tile_size, int) and tile_size % 16 == 0 and 16 <= tile_size <= 4096,
           "a multiple of 16 in [16, 4096]", tile_size)  # fmt: skip
    _check("compression", compression in get_args(Compression), f"one of {get_args(Compression)}", compression)
    _check("quality", isinstance(quality, int) and 1 <= quality <= 100, "an int in [1, 100]", quality)
    _check("levels", levels is None or (isinstance(levels, int) and 1 <= levels <= 12), "None or 1..12", levels)
    _check("tumour_contrast", isinstance(tumour_contrast, int | float) and 0 <= tumour_contrast <= 3,
           "a float in [0, 3]", tumour_contrast)  # fmt: skip
    _check("tumour_area", len(tumour_area) == 2 and 0 < tumour_area[0] <= tumour_area[1] <= 0.5,
           "(low, high) with 0 < low <= high <= 0.5", tumour_area)  # fmt: skip
    _check("workers", isinstance(workers, int) and workers >= 1, "an int >= 1", workers)
    path = Path(path)
    dims = _level_dimensions(width, height, tile_size, levels)
    area = (float(tumour_area[0]), float(tumour_area[1]))
    scene = _scene(seed, (width, height), float(mpp), bool(tumour), float(tumour_contrast), area)
    info = SlideInfo(
        path=path,
        seed=seed,
        dimensions=(width, height),
        mpp=float(mpp),
        tumour=bool(tumour),
        tumour_contrast=float(tumour_contrast),
        tumour_area=area,
        flavour=flavour,
        compression=compression,
        quality=quality,
        tile_size=tile_size,
        level_dimensions=tuple(dims),
        tissue_fraction=scene.tissue_fraction,
        tumour_regions=scene.tumour_regions,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as spool_dir:
            _write_pyramid(tmp, scene, info, Path(spool_dir), workers)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return info


def _check(field: str, ok: bool, expected: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{field}: expected {expected}, got {value!r}")


# ---------------------------------------------------------------------------------------------------------- cohorts


def make_cohort(
    root: str | os.PathLike,
    n_slides: int,
    *,
    seed: int,
    size: tuple[int, int] = (2048, 2048),
    positive_fraction: float = 0.5,
    flavours: Sequence[Flavour] = ("svs", "tiff"),
    mpp: float = 0.5,
    patients_per_slide: float = 0.75,
    tile_size: int = 256,
    compression: Compression = "jpeg",
    quality: int = 90,
    tumour_contrast: float = 0.5,
    tumour_area: tuple[float, float] = (0.01, 0.05),
    workers: int = 1,
) -> Path:
    """Write a labelled cohort under `root` (see the module docstring) and return `root`.

    Slide i has flavour flavours[i % len(flavours)]; round(n_slides * positive_fraction) slides are tumour (at least
    one of each label when 0 < positive_fraction < 1); there are round(n_slides * patients_per_slide) patients, so some
    have several slides and grouped splits matter. A cohort already complete with the same parameters is left as is.
    """
    root = Path(root)
    _check("n_slides", isinstance(n_slides, int) and n_slides >= 1, "an int >= 1", n_slides)
    _check("size", len(size) == 2, "(width, height)", size)
    _check("positive_fraction", 0 <= positive_fraction <= 1, "a float in [0, 1]", positive_fraction)
    _check("patients_per_slide", 0 < patients_per_slide <= 1, "a float in (0, 1]", patients_per_slide)
    _check("flavours", bool(flavours) and all(f in get_args(Flavour) for f in flavours),
           f"a non-empty sequence of {get_args(Flavour)}", flavours)  # fmt: skip
    params = {
        "n_slides": n_slides, "seed": seed, "size": list(size), "positive_fraction": positive_fraction,
        "flavours": list(flavours), "mpp": mpp, "patients_per_slide": patients_per_slide, "tile_size": tile_size,
        "compression": compression, "quality": quality, "tumour_contrast": tumour_contrast,
        "tumour_area": list(tumour_area),
    }  # fmt: skip
    manifest = root / "cohort.json"
    if manifest.exists():
        previous = json.loads(manifest.read_text())
        if previous["params"] != params:
            raise ValueError(f"root: {root} holds a cohort made with other parameters; use another root or delete it")
        if all((root / s["path"]).exists() for s in previous["slides"]) and (root / "labels.csv").exists():
            return root

    rng = np.random.default_rng(np.random.SeedSequence([seed, n_slides]))
    n_positive = round(n_slides * positive_fraction)
    if 0 < positive_fraction < 1 and n_slides >= 2:
        n_positive = min(max(n_positive, 1), n_slides - 1)
    labels = rng.permutation(np.arange(n_slides) < n_positive)
    n_patients = max(1, round(n_slides * patients_per_slide))
    patients = rng.permutation(np.arange(n_slides) % n_patients)
    slide_seeds = np.random.SeedSequence(seed).generate_state(n_slides, np.uint64)

    ids = [f"slide_{i:03d}" for i in range(n_slides)]
    infos = []
    for i, slide_id in enumerate(tqdm(ids, desc=f"writing {root}", unit="slide", leave=False)):
        flavour = flavours[i % len(flavours)]
        infos.append(
            write_slide(
                root / "slides" / f"{slide_id}{EXTENSIONS[flavour]}", size[0], size[1],
                seed=int(slide_seeds[i]), tumour=bool(labels[i]), mpp=mpp, flavour=flavour, tile_size=tile_size,
                compression=compression, quality=quality, tumour_contrast=tumour_contrast, tumour_area=tumour_area,
                workers=workers,
            )  # fmt: skip
        )
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["slide_id", "label", "patient_id"])
    for slide_id, info, patient in zip(ids, infos, patients, strict=True):
        writer.writerow([slide_id, info.label, f"patient_{patient:03d}"])
    _atomic_write(root / "labels.csv", table.getvalue())
    cohort = {"params": params, "classes": list(CLASSES), "slides": [info.to_dict(root) for info in infos]}
    _atomic_write(manifest, json.dumps(cohort, indent=1))
    return root


def load_cohort(root: str | os.PathLike) -> list[SlideInfo]:
    """The ground truth of every slide of a cohort written by `make_cohort`."""
    root = Path(root)
    manifest = root / "cohort.json"
    if not manifest.exists():
        raise ValueError(f"root: no cohort.json in {root}; run make_cohort first")
    return [SlideInfo.from_dict(s, root) for s in json.loads(manifest.read_text())["slides"]]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_modules.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--n-slides", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, nargs=2, default=(2048, 2048), metavar=("W", "H"))
    parser.add_argument("--positive-fraction", type=float, default=0.5)
    parser.add_argument("--flavours", nargs="+", choices=get_args(Flavour), default=["svs", "tiff"])
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--patients-per-slide", type=float, default=0.75)
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--compression", choices=get_args(Compression), default="jpeg")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--tumour-contrast", type=float, default=0.5)
    parser.add_argument("--tumour-area", type=float, nargs=2, default=(0.01, 0.05), metavar=("LOW", "HIGH"))
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    root = make_cohort(
        args.root, args.n_slides, seed=args.seed, size=tuple(args.size), positive_fraction=args.positive_fraction,
        flavours=tuple(args.flavours), mpp=args.mpp, patients_per_slide=args.patients_per_slide,
        tile_size=args.tile_size, compression=args.compression, quality=args.quality,
        tumour_contrast=args.tumour_contrast, tumour_area=tuple(args.tumour_area), workers=args.workers,
    )  # fmt: skip
    print(f"{root}: {args.n_slides} slides in {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
