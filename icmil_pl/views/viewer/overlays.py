"""The heatmaps the viewer lays over a slide: one cell per patch, coloured on a scale the page chooses, and the scales a
slide offers (with the colour map's stops, for the page's colour bar)."""

from __future__ import annotations

import io

import matplotlib
import numpy as np
from PIL import Image

from ...outputs.patch_scores import PatchScores
from ...outputs.plots import CMAP, percentiles

__all__ = ["overlay_grid", "overlay_png", "scales"]

_OVERLAY_PX = 2048  # the heatmap image's longest side at most: cells stay sharp-edged under the browser's smoothing


def overlay_png(s: PatchScores, scale: str) -> bytes:
    """The heatmap on `scale` (`percentile`: each score's rank in its slide; `p<k>`: the patch's own probability of
    class k) through the heatmaps' colour map, transparent where no patch is; enlarged by whole pixels so cells keep
    their edges."""
    values = percentiles(s.scores) if scale == "percentile" else s.probs[:, int(scale[1:])]
    x0, y0, cols, rows = overlay_grid(s)
    i = np.round((s.coords[:, 0] - x0) / s.patch_side).astype(int)
    j = np.round((s.coords[:, 1] - y0) / s.patch_side).astype(int)
    rgba = np.zeros((rows, cols, 4), np.uint8)
    rgba[j, i] = (matplotlib.colormaps[CMAP](values) * 255).astype(np.uint8)
    factor = max(1, _OVERLAY_PX // max(rows, cols))
    image = Image.fromarray(rgba).resize((cols * factor, rows * factor), Image.Resampling.NEAREST)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def scales(s: PatchScores) -> dict:
    """The heatmap scales a slide offers, the one it opens on, and the colour map's stops for the page's colour bar."""
    offered = [{"key": "percentile", "label": f"{s.kind}, percentile in slide", "absolute": False}]
    if s.probs is not None and s.probabilities:
        offered += [
            {"key": f"p{k}", "label": f"p({c}) of the patch alone, 0 to 1", "absolute": True}
            for k, c in enumerate(s.classes)
        ]
    default = "percentile"
    if s.one_class and len(s.classes) >= 2 and s.predicted == s.classes[0] and s.probs is not None:
        default = f"p{1 + int(np.argmax(s.slide_probs[1:]))}"  # a negative call: the likeliest other class's scale
    stops = matplotlib.colormaps[CMAP](np.linspace(0, 1, 11))
    colours = ["#" + "".join(f"{int(round(255 * v)):02x}" for v in rgba[:3]) for rgba in stops]
    return {"scales": offered, "default_scale": default, "colours": colours}


def overlay_grid(s: PatchScores) -> tuple[float, float, int, int]:
    """Level-0 top-left of the patch grid and its columns and rows."""
    x0, y0 = (float(v) for v in s.coords.min(0))
    cols, rows = (int(round(float(v))) + 1 for v in (s.coords.max(0) - s.coords.min(0)) / s.patch_side)
    return x0, y0, cols, rows
