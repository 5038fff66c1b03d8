"""`python -m icmil_pl view <run_dir>`: the run's predicted slides at full resolution in a browser, with the attention
heatmap, the tiled tissue, the tumour ground truth (synthetic cohorts) and every patch's scores on click.

A standard-library HTTP server, bound to localhost unless told otherwise; from a cluster, tunnel it
(`ssh -L 8000:localhost:8000 <host>`) and open http://localhost:8000. It serves only the slides named in the run's
`scores.zarr` stores, the viewer's own files and OpenSeadragon (installed by `make install` with npm):

    /                                        the page (static/index.html)
    /static/<file>, /osd/<file>              the viewer's script and style; OpenSeadragon's build
    /api/slides                              every slide: id, label, call, probabilities
    /api/slide/<name>                        one slide: geometry, patches and their scores, outlines
    /dz/<name>.dzi, /dz/<name>_files/<level>/<col>_<row>.jpeg    Deep Zoom tiles, cut on request and cached
    /overlay/<name>.png                      the attention heatmap, one cell per patch

`<name>` is the slide's safe name (`data_modules.file_names.safe_name`), URL-quoted. Anything else is a 404.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import imagecodecs
import matplotlib
import numpy as np
from PIL import Image

from data_modules.cohort import SlideFinder, SlideFolders
from data_modules.outlines import cells_outline
from data_modules.slides import Slide, open_slide

from ..patch_scores import SCORES_STORE, PatchScores, read_scores, scored_slides
from ..plots import CMAP, percentiles
from .deepzoom import DeepZoom, TileOutOfRange

__all__ = ["OPENSEADRAGON", "RunViewer", "ViewerServer", "main", "serve"]

_HERE = Path(__file__).parent
STATIC = _HERE / "static"
OPENSEADRAGON = _HERE / "node_modules" / "openseadragon" / "build" / "openseadragon"
_TILE = re.compile(r"/dz/(?P<name>.+)_files/(?P<level>\d{1,3})/(?P<col>\d{1,7})_(?P<row>\d{1,7})\.jpeg")
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".map": "application/json",
}
_JPEG_QUALITY = 90
_OVERLAY_PX = 2048  # the heatmap image's longest side at most: cells stay sharp-edged under the browser's smoothing


class NotFound(LookupError):
    """What the server answers with 404."""


@dataclass(frozen=True)
class _Entry:
    scores_root: Path  # the predict folder holding this slide's scores.zarr
    path: Path | None  # the slide file, None where it cannot be found


class RunViewer:
    """What the server shows of one run: its scored slides (from every `scores.zarr` under the run, `final/predict`
    first), their files (where predict recorded them, else found in `slides`), tiles and overlays. Thread-safe:
    the server answers on many threads."""

    def __init__(self, run_dir: str | os.PathLike, slides: SlideFolders = None, cache_tiles: int = 4096):
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise ValueError(f"{self.run_dir}: no such run directory")
        self._entries: dict[str, _Entry] = {}
        finder = None if slides is None else SlideFinder(slides)
        for root in _scores_roots(self.run_dir):
            for name in scored_slides(root):
                if name not in self._entries:
                    self._entries[name] = _Entry(root, _slide_file(self._scores(root, name), finder))
        if not self._entries:
            raise ValueError(
                f"{self.run_dir}: no predicted slides ({SCORES_STORE} under it); run `python -m icmil_pl predict -c "
                f"{self.run_dir / 'config.yaml'}` first"
            )
        self._lock = threading.Lock()
        self._slides: dict[str, Slide] = {}
        self.tile = functools.lru_cache(maxsize=cache_tiles)(self._tile)

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def scores(self, name: str) -> PatchScores:
        return self._scores(self._entry(name).scores_root, name)

    def slide_list(self) -> list[dict]:
        listed = []
        for name, entry in self._entries.items():
            s = self.scores(name)
            listed.append(
                {
                    "name": name,
                    "slide_id": s.slide_id,
                    "label": s.label,
                    "predicted": s.predicted,
                    "probability": max(s.slide_probs),
                    "viewable": entry.path is not None,
                    "source": str(entry.scores_root.relative_to(self.run_dir)),
                }
            )
        return listed

    def slide_info(self, name: str) -> dict:
        """One slide for the page: its size, patches and scores (flat lists), the heatmap's place, the outlines."""
        s, slide = self.scores(name), self._slide(name)
        x0, y0, cols, rows = _overlay_grid(s)
        return {
            "name": name,
            "slide_id": s.slide_id,
            "dimensions": list(slide.dimensions),
            "mpp": slide.mpp,
            "classes": s.classes,
            "label": s.label,
            "predicted": s.predicted,
            "slide_probs": s.slide_probs,
            "kind": s.kind,
            "patch_side": s.patch_side,
            "coords": np.asarray(s.coords).reshape(-1).tolist(),
            "scores": [float(f"{v:.6g}") for v in s.scores.tolist()],
            "probs": None if s.probs is None else [[float(f"{p:.6g}") for p in row] for row in s.probs.tolist()],
            "overlay": {"x": x0, "y": y0, "width": cols * s.patch_side, "height": rows * s.patch_side},
            "tissue": self._tissue(name),
            "truth": s.truth,
        }

    def dzi(self, name: str) -> str:
        return DeepZoom(self._slide(name)).dzi()

    def _tile(self, name: str, level: int, col: int, row: int) -> bytes:
        try:
            pixels = DeepZoom(self._slide(name)).tile(level, col, row)
        except TileOutOfRange as error:
            raise NotFound(str(error)) from None
        return bytes(imagecodecs.jpeg8_encode(np.ascontiguousarray(pixels), level=_JPEG_QUALITY))

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one viewer per server process; the cache lives as long
    def overlay_png(self, name: str) -> bytes:
        """The heatmap: each patch's attention percentile in the slide through the heatmaps' colour map, transparent
        where no patch is; enlarged by whole pixels so cells keep their edges."""
        s = self.scores(name)
        x0, y0, cols, rows = _overlay_grid(s)
        i = np.round((s.coords[:, 0] - x0) / s.patch_side).astype(int)
        j = np.round((s.coords[:, 1] - y0) / s.patch_side).astype(int)
        rgba = np.zeros((rows, cols, 4), np.uint8)
        rgba[j, i] = (matplotlib.colormaps[CMAP](percentiles(s.scores)) * 255).astype(np.uint8)
        factor = max(1, _OVERLAY_PX // max(rows, cols))
        image = Image.fromarray(rgba).resize((cols * factor, rows * factor), Image.Resampling.NEAREST)
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()

    def close(self) -> None:
        with self._lock:
            for slide in self._slides.values():
                slide.close()
            self._slides.clear()

    # -- internals ---------------------------------------------------------------------------------------------------
    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise NotFound(f"no slide {name!r} in {self.run_dir}")
        return entry

    @functools.lru_cache(maxsize=1024)  # noqa: B019 - see overlay_png
    def _scores(self, root: Path, name: str) -> PatchScores:
        return read_scores(root, name)

    @functools.lru_cache(maxsize=256)  # noqa: B019 - see overlay_png
    def _tissue(self, name: str) -> dict | None:
        s = self.scores(name)
        return cells_outline(s.coords, s.patch_side)

    def _slide(self, name: str) -> Slide:
        entry = self._entry(name)
        if entry.path is None:
            raise NotFound(f"{name}: the slide file is not found (give view --slides <folder>)")
        with self._lock:
            if name not in self._slides:
                self._slides[name] = open_slide(entry.path)
            return self._slides[name]


def _scores_roots(run_dir: Path) -> list[Path]:
    """Every folder under the run holding a scores store: `final/predict` first, then the others by name; smoke
    tests (`fast_dev_run`) left out."""
    roots = sorted(p.parent for p in run_dir.rglob(SCORES_STORE) if "fast_dev_run" not in p.parts)
    first = run_dir / "final" / "predict"
    return sorted(roots, key=lambda root: root != first)


def _slide_file(scores: PatchScores, finder: SlideFinder | None) -> Path | None:
    if finder is not None:
        return finder.find(scores.slide_id)
    if scores.slide_path and Path(scores.slide_path).exists():  # a file, or a DICOM WSI's folder
        return Path(scores.slide_path)
    return None


def _overlay_grid(s: PatchScores) -> tuple[float, float, int, int]:
    """Level-0 top-left of the patch grid and its columns and rows."""
    x0, y0 = (float(v) for v in s.coords.min(0))
    cols, rows = (int(round(float(v))) + 1 for v in (s.coords.max(0) - s.coords.min(0)) / s.patch_side)
    return x0, y0, cols, rows


class ViewerServer(ThreadingHTTPServer):
    """A `ThreadingHTTPServer` answering for one `RunViewer`."""

    daemon_threads = True
    request_queue_size = 256  # a browser opens many tile requests at once

    def __init__(self, viewer: RunViewer, host: str = "127.0.0.1", port: int = 8000, quiet: bool = True) -> None:
        if not (OPENSEADRAGON / "openseadragon.min.js").is_file():
            raise OSError(
                f"{OPENSEADRAGON}: OpenSeadragon is not installed; `make install` installs it (npm ci --prefix {_HERE})"
            )
        self.viewer, self.quiet = viewer, quiet
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'localhost' if host in ('127.0.0.1', '::1') else host}:{port}/"


class _Handler(BaseHTTPRequestHandler):
    server: ViewerServer
    protocol_version = "HTTP/1.1"  # keep-alive: a page loads hundreds of tiles

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        if not self.server.quiet:
            super().log_message(format, *args)

    def _answer(self, send_body: bool) -> None:
        try:
            body, kind, cache = self._route(unquote(urlsplit(self.path).path))
            status = HTTPStatus.OK
        except NotFound:
            body, kind, cache, status = b"not found\n", "text/plain", False, HTTPStatus.NOT_FOUND
        except Exception as error:  # a slide that cannot be read: said, and the server stays up
            self.log_error("%s: %s", self.path, error)
            body, kind, cache = f"{type(error).__name__}: {error}\n".encode(), "text/plain", False
            status = HTTPStatus.INTERNAL_SERVER_ERROR
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _route(self, path: str) -> tuple[bytes, str, bool]:
        """(body, content type, cacheable) for `path`; NotFound for anything not served."""
        viewer = self.server.viewer
        if path in ("/", "/index.html"):
            return _file(STATIC, "index.html")
        if path.startswith("/static/"):
            return _file(STATIC, path.removeprefix("/static/"))
        if path.startswith("/osd/"):
            return _file(OPENSEADRAGON, path.removeprefix("/osd/"), cache=True)
        if path == "/api/slides":
            return _json(viewer.slide_list())
        if path.startswith("/api/slide/"):
            return _json(viewer.slide_info(path.removeprefix("/api/slide/")))
        if path.startswith("/overlay/") and path.endswith(".png"):
            return viewer.overlay_png(path.removeprefix("/overlay/").removesuffix(".png")), "image/png", True
        tile = _TILE.fullmatch(path)
        if tile is not None:
            address = (int(tile["level"]), int(tile["col"]), int(tile["row"]))
            return viewer.tile(tile["name"], *address), "image/jpeg", True
        if path.startswith("/dz/") and path.endswith(".dzi"):
            return viewer.dzi(path.removeprefix("/dz/").removesuffix(".dzi")).encode(), "application/xml", True
        raise NotFound(path)


def _file(folder: Path, relative: str, cache: bool = False) -> tuple[bytes, str, bool]:
    """A file strictly inside `folder` (no `..`, links or absolute paths out of it) of a type the viewer uses."""
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder.resolve()) or not path.is_file() or path.suffix not in _TYPES:
        raise NotFound(relative)
    return path.read_bytes(), _TYPES[path.suffix], cache


def _json(value) -> tuple[bytes, str, bool]:
    return json.dumps(value, separators=(",", ":")).encode(), "application/json", False


def serve(
    run_dir: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    slides: SlideFolders = None,
    quiet: bool = True,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve `run_dir` until interrupted."""
    viewer = RunViewer(run_dir, slides)
    with ViewerServer(viewer, host, port, quiet) as server:
        announce(f"viewing {len(viewer.names)} slide(s) of {viewer.run_dir} at {server.url} (Ctrl-C stops)")
        if host in ("127.0.0.1", "localhost", "::1"):
            announce(f"from another machine: ssh -L {port}:localhost:{port} <this host>, then open {server.url}")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            viewer.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m icmil_pl view", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run directory (or any folder) holding predict outputs (scores.zarr)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    parser.add_argument(
        "--slides", action="append", help="a folder the slide files are below, if they moved since predict (repeatable)"
    )
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    serve(args.run_dir, args.host, args.port, args.slides, quiet=not args.verbose)
