"""The textures of synthetic tissue: periodic stroma and nuclei, value noise, and the per-slide stain palette.

Every texture is a pure function of its random stream and the mpp (nuclei and fibres have physical sizes), periodic so
that any window of a slide is a slice of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

__all__ = [
    "GLASS",
    "MIMIC",
    "NUCLEI_PERIOD",
    "STROMA_PERIOD",
    "TUMOUR",
    "TUMOUR_B",
    "Nuclei",
    "doubled",
    "histogram",
    "nuclei_alpha",
    "palette",
    "quantise",
    "radial",
    "stroma_texture",
    "value_noise",
    "window",
]

STROMA_PERIOD = 1024  # stroma texture period in px (FFT-friendly)
NUCLEI_PERIOD = 1021  # nuclei texture period: prime, so the two textures never line up again on a slide
# palette offsets: normal tissue [0, 4096), tumour [4096, 8192), glass [8192, 8448), type-b tumour [8448, 12544),
# benign mimics [12544, 16640)
TUMOUR, GLASS, TUMOUR_B, MIMIC = 4096, 8192, 8448, 12544

_LIGHT_STROMA = np.array([240.0, 186.0, 216.0])
_DARK_STROMA = np.array([214.0, 124.0, 176.0])
_NUCLEUS = np.array([78.0, 46.0, 128.0])
_GLASS_RGB = np.array([241.0, 241.0, 243.0])
_PIXEL_NOISE = 0.5  # grey levels per step of the 8-level pixel noise


@dataclass(frozen=True)
class Nuclei:
    """Nucleus population of a tissue class, in physical units so the texture follows the mpp."""

    radius_um: float = 2.6
    radius_sd_um: float = 0.3
    per_100um2: float = 0.85
    aspect_sd: float = 0.12  # elongation: axis ratio 1 + |N(0, sd)|
    lobes: float = 0.04  # boundary irregularity: relative amplitude of the 2nd and 3rd radial harmonics

    def tumour(self, contrast: float) -> Nuclei:
        """Type a: large, pleomorphic, irregular nuclei."""
        return Nuclei(
            radius_um=self.radius_um * (1 + 0.35 * contrast),
            radius_sd_um=self.radius_sd_um * (1 + 1.5 * contrast),
            per_100um2=self.per_100um2 * (1 + 0.4 * contrast),
            aspect_sd=self.aspect_sd + 0.15 * contrast,
            lobes=self.lobes + 0.10 * contrast,
        )

    def lymphocytes(self) -> Nuclei:
        """A benign mimic: a dense aggregate of lymphocytes, small round dark nuclei packed closely. Unusual tissue,
        like tumour type b in size and crowding, but regular: what a detector of "unusual" flags and a tumour
        detector must not."""
        return Nuclei(radius_um=1.9, radius_sd_um=0.12, per_100um2=self.per_100um2 * 2.6, aspect_sd=0.03, lobes=0.01)

    def reactive(self, contrast: float) -> Nuclei:
        """A benign mimic: reactive atypia, nuclei as large and crowded as type a tumour's at `contrast`, but as
        regular in size and outline as normal nuclei. Size and crowding, what any texture feature sees first, do not
        tell it from tumour; only pleomorphism does."""
        tumour = self.tumour(contrast)
        return replace(tumour, radius_sd_um=self.radius_sd_um, aspect_sd=self.aspect_sd, lobes=self.lobes)

    def tumour_b(self, contrast: float) -> Nuclei:
        """Type b: small, round, uniform nuclei, crowded (a small-cell pattern, unlike type a in every measure)."""
        return Nuclei(
            radius_um=self.radius_um * (1 - 0.25 * contrast),
            radius_sd_um=self.radius_sd_um * max(0.3, 1 - 0.5 * contrast),
            per_100um2=self.per_100um2 * (1 + 1.2 * contrast),
            aspect_sd=self.aspect_sd * max(0.3, 1 - 0.5 * contrast),
            lobes=self.lobes,
        )


def radial(c: np.ndarray, s: np.ndarray, harmonics: Sequence[tuple[int, object, object]]) -> np.ndarray:
    """1 + sum of a cos(k theta + phi) over (k, a, phi) from cos and sin of theta, by angle addition (no per-pixel
    trigonometry); a and phi may be arrays that broadcast against c."""
    out, k, ck, sk = 1.0, 1, c, s
    for kk, a, phi in sorted(harmonics, key=lambda h: h[0]):
        while k < kk:
            ck, sk, k = ck * c - sk * s, sk * c + ck * s, k + 1
        out = out + a * (ck * np.cos(phi) - sk * np.sin(phi))
    return out


def value_noise(lattice: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
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


def stroma_texture(rng: np.random.Generator, mpp: float) -> np.ndarray:
    """Periodic stroma: uint8 with 5 bits of eosin density (fine grain, fibres, patches) and 3 bits of pixel noise."""
    p = STROMA_PERIOD
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


def nuclei_alpha(rng: np.random.Generator, mpp: float, nuclei: Nuclei, share: float = 1.0) -> np.ndarray:
    """Periodic hematoxylin opacity in [0, 1] of a Poisson population of irregular elliptical nuclei; `share` of the
    population's density (the rest left to another population mixed in)."""
    p = NUCLEI_PERIOD
    n = int(rng.poisson(nuclei.per_100um2 / 100 * (p * mpp) ** 2 * share))
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
        edge = radius[s, None, None] * radial(along / d, across / d, lobes)
        a = np.clip(edge - rho + 0.5, 0, 1) * darkness[s, None, None] * rng.uniform(0.8, 1.0, rho.shape)
        index = (py % p)[:, :, None] * p + (px % p)[:, None, :]
        np.maximum.at(alpha, index.ravel(), a.ravel().astype(np.float32))
    return alpha.reshape(p, p)


def histogram(values: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(values.ravel(), minlength=n) / values.size


def quantise(alpha: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(alpha * 15), 0, 15).astype(np.uint8)


def doubled(texture: np.ndarray) -> np.ndarray:
    """Two periods in each direction, so any window up to one period is a plain slice."""
    return np.tile(texture, (2, 2))


def window(doubled: np.ndarray, period: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    x, y = x % period, y % period
    if w <= period and h <= period:
        return doubled[y : y + h, x : x + w]
    return doubled[np.ix_((y + np.arange(h)) % period, (x + np.arange(w)) % period)]


def palette(
    rng: np.random.Generator,
    p_stroma: np.ndarray,
    p_normal: np.ndarray,
    p_tumour: np.ndarray | None,
    p_tumour_b: np.ndarray | None = None,
    p_mimic: np.ndarray | None = None,
    recolour: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """RGB for every (class, stroma byte, nucleus level); tumour stroma is shifted so that tumour and normal tissue
    have the same expected colour. With `p_tumour_b`, type b's block follows glass (`TUMOUR_B`), matched the same
    way, so a one-type palette is the first part of a two-type one; `p_mimic` (benign mimics, `MIMIC`) follows it,
    matched too. `recolour` (a site's stain and light, `sites.recolour`) changes the stroma, nucleus and glass colours
    before the classes are mixed and matched."""
    stain = rng.uniform(0.96, 1.04, (3, 3))  # per-slide stain variation
    light, dark, nucleus = _LIGHT_STROMA * stain[0], _DARK_STROMA * stain[1], _NUCLEUS * stain[2]
    glass_rgb = _GLASS_RGB
    if recolour is not None:
        light, dark, nucleus, glass_rgb = recolour(np.stack([light, dark, nucleus, _GLASS_RGB]))
    sg = np.arange(256)
    stroma = light + (dark - light) * ((sg >> 3) / 31)[:, None]  # (256, 3)
    noise = ((sg & 7) - 3.5) * _PIXEL_NOISE
    alpha = np.arange(16) / 15

    def tissue(shift: np.ndarray) -> np.ndarray:  # (256, 16, 3)
        mix = (stroma + shift)[:, None, :] * (1 - alpha)[None, :, None] + nucleus * alpha[None, :, None]
        return np.clip(mix + noise[:, None, None], 0, 255)

    def mean(colours: np.ndarray, p_nuclei: np.ndarray) -> np.ndarray:
        return np.einsum("s,n,snc->c", p_stroma, p_nuclei, colours)

    def matched(p_nuclei: np.ndarray) -> np.ndarray:
        shift = np.zeros(3)
        for _ in range(4):  # linear solve, repeated for the clipping
            shift += (mean(normal, p_normal) - mean(tissue(shift), p_nuclei)) / (1 - p_nuclei @ alpha)
        return tissue(shift)

    normal = tissue(np.zeros(3))
    tumour = normal if p_tumour is None else matched(p_tumour)
    glass = np.clip(glass_rgb + noise[:, None], 0, 255)
    blocks = [normal.reshape(-1, 3), tumour.reshape(-1, 3), glass]
    if p_tumour_b is not None or p_mimic is not None:
        blocks.append((normal if p_tumour_b is None else matched(p_tumour_b)).reshape(-1, 3))
    if p_mimic is not None:
        blocks.append(matched(p_mimic).reshape(-1, 3))
    return np.rint(np.concatenate(blocks)).astype(np.uint8)
