"""Sites: where a slide was stained and scanned. Each site has its own stain (the H and E optical-density vectors and
how much of each the tissue takes up), its scanner's illumination, optical blur and JPEG quality; its slides jitter
around it. Real cohorts differ more between sites than between tumour and normal tissue in what a frozen encoder
sees; a generator without sites cannot test whether an embedder learns to look past them.

Colours are changed in optical density, as stains mix (Beer-Lambert): a colour is split into H, E and a residual
by the reference vectors (Ruifrok and Johnston's), their amounts scaled, and mixed again with the site's vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["REFERENCE_EOSIN", "REFERENCE_HEMATOXYLIN", "Site", "make_sites", "recolour"]

REFERENCE_HEMATOXYLIN = (0.650, 0.704, 0.286)  # OD per unit of stain, R G B (Ruifrok and Johnston 2001)
REFERENCE_EOSIN = (0.072, 0.990, 0.105)


@dataclass(frozen=True)
class Site:
    """One site's stain and scanner. `amounts` scale the H and E taken up; `brightness` the light (1: as the
    generator's own colours); `blur_um` the optics' Gaussian sigma in microns; `quality` the JPEG quality."""

    index: int
    hematoxylin: tuple[float, float, float]
    eosin: tuple[float, float, float]
    amounts: tuple[float, float]
    brightness: float
    blur_um: float
    quality: int

    def jittered(self, rng: np.random.Generator) -> Site:
        """One slide of this site: amounts and light vary a little from slide to slide (section thickness, bleach)."""
        h, e = (float(a * math.exp(rng.normal(0, 0.05))) for a in self.amounts)
        return Site(self.index, self.hematoxylin, self.eosin, (h, e), self.brightness, self.blur_um, self.quality)

    @classmethod
    def from_dict(cls, d: dict) -> Site:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def make_sites(n: int, seed: int, variation: float) -> list[Site]:
    """`n` sites drawn from `seed`; `variation` scales how far they lie from the reference stain and scanner (0: all
    alike; 1: vectors turned by about 8 degrees, amounts by about 25 %, light by 6 %, blur up to 0.8 um, JPEG quality
    60-95, as between labs)."""
    sites = []
    for k, rng in enumerate(np.random.default_rng(s) for s in np.random.SeedSequence([seed, 7]).spawn(n)):
        h, e = (_turned(np.array(v), rng, 0.12 * variation) for v in (REFERENCE_HEMATOXYLIN, REFERENCE_EOSIN))
        amounts = tuple(float(math.exp(rng.normal(0, 0.25 * variation))) for _ in range(2))
        brightness = float(math.exp(rng.normal(0, 0.06 * variation)))
        blur = float(rng.uniform(0, 0.8 * variation))
        quality = int(round(95 - rng.uniform(0, 35) * min(variation, 1.0)))
        sites.append(Site(k, h, e, amounts, brightness, blur, quality))
    return sites


def recolour(rgb: np.ndarray, site: Site) -> np.ndarray:
    """RGB colours (..., 3) in [0, 255] as `site` would stain and light them."""
    reference = _stains(REFERENCE_HEMATOXYLIN, REFERENCE_EOSIN)
    od = -np.log((np.asarray(rgb, np.float64) + 1) / 256)
    amounts = od @ np.linalg.inv(reference)  # (..., 3): H, E and the residual
    amounts = amounts * np.array([*site.amounts, 1.0])
    out = 256 * np.exp(-amounts @ _stains(site.hematoxylin, site.eosin)) * site.brightness - 1
    return np.clip(out, 0, 255)


def _stains(hematoxylin, eosin) -> np.ndarray:
    """Rows H, E and their complement (what neither stain absorbs), as unit OD vectors."""
    h, e = (np.asarray(v, np.float64) / np.linalg.norm(v) for v in (hematoxylin, eosin))
    residual = np.cross(h, e)
    return np.stack([h, e, np.abs(residual) / np.linalg.norm(residual)])


def _turned(vector: np.ndarray, rng: np.random.Generator, spread: float) -> tuple[float, float, float]:
    """A unit OD vector near `vector` (non-negative: stains absorb)."""
    v = np.abs(vector / np.linalg.norm(vector) + rng.normal(0, spread, 3))
    return tuple(float(x) for x in v / np.linalg.norm(v))
