"""`python -m icmil_pl view <run_dir>`: the run's predicted slides at full resolution in a browser, with the attention
heatmap, the tiled tissue, the ground truth (where the cohort has annotations) and every patch's scores on click.

It shows one predict folder's slides (`predict_folder`): the run's own `final/predict` unless `--predict <name>`
names another under `final/` (`predict-new_slides`), or the folder given where it is one itself.

A standard-library HTTP server, bound to localhost unless told otherwise; from a cluster, tunnel it
(`ssh -L 8000:localhost:8000 <host>`) and open http://localhost:8000. It answers only requests whose Host header is
its own (`guards.host_allowed`; 403 otherwise), on at most 32 connections at once, each closed after 20 s idle. It
serves only the slides named in that folder's `scores.zarr`, the viewer's own files and OpenSeadragon (installed by
`make install` with npm):

    /                                        the page (static/index.html)
    /static/<file>, /osd/<file>              the viewer's script and style; OpenSeadragon's build
    /api/slides                              every slide: id, split, label, call, probability, has truth
    /api/slide/<name>                        one slide: geometry, patches and their scores, outlines, scales
    /dz/<name>.dzi, /dz/<name>_files/<level>/<col>_<row>.jpeg    Deep Zoom tiles, cut on request and cached
    /overlay/<scale>/<name>.png              the heatmap, one cell per patch: `percentile` (the score's rank in
                                             its slide) or `p<k>` (the patch's own probability of class k, 0 to 1:
                                             the same scale on every slide)

A slide called negative (its first class) opens on the absolute scale of the most probable other class: percentiles
would paint half of any slide red, a negative one too.

`<name>` is the slide's safe name (`data_modules.io.safe_name`), URL-quoted. Anything else (a NUL byte, a
name the file system refuses) is a 404.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import imagecodecs
import numpy as np

from data_modules.cohort import SlideFinder, SlideFolders
from data_modules.cohort.splits import split_of
from data_modules.slides import Slide, open_slide
from data_modules.slides.outlines import cells_outline

from ...outputs.patch_scores import SCORES_STORE, PatchScores, read_scores, scored_slides
from .deepzoom import DeepZoom, TileOutOfRange
from .guards import LOOPBACK, NotFound, host_allowed, request_path, static_file
from .overlays import overlay_grid, overlay_png, scales

__all__ = ["OPENSEADRAGON", "RunViewer", "ViewerServer", "main", "predict_folder", "serve"]

_HERE = Path(__file__).parent
STATIC = _HERE / "static"
OPENSEADRAGON = _HERE / "node_modules" / "openseadragon" / "build" / "openseadragon"
_TILE = re.compile(r"/dz/(?P<name>.+)_files/(?P<level>\d{1,3})/(?P<col>\d{1,7})_(?P<row>\d{1,7})\.jpeg")
_JPEG_QUALITY = 90
_OVERLAY = re.compile(r"/overlay/(?P<scale>percentile|p\d{1,3})/(?P<name>.+)\.png")


class RunViewer:
    """What the server shows of one run: the scored slides of one predict folder (`predict_folder`), their files
    (where predict recorded them, else found in `slides`), tiles and overlays. Thread-safe: the server answers on
    many threads."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        slides: SlideFolders = None,
        predict: str | None = None,
        cache_tiles: int = 4096,
    ):
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise ValueError(f"{self.run_dir}: no such run directory")
        self.predict_dir = predict_folder(self.run_dir, predict)
        finder = None if slides is None else SlideFinder(slides)
        self._paths = {name: _slide_file(self._scores(name), finder) for name in scored_slides(self.predict_dir)}
        if not self._paths:
            raise ValueError(
                f"{self.predict_dir / SCORES_STORE}: no predicted slides in it; run `python -m icmil_pl predict -c "
                f"{self.run_dir / 'config.yaml'}` first"
            )
        self._splits = split_of(self.run_dir, self.predict_dir)
        self._lock = threading.Lock()
        self._slides: dict[str, Slide] = {}
        self.tile = functools.lru_cache(maxsize=cache_tiles)(self._tile)

    @property
    def names(self) -> list[str]:
        return list(self._paths)

    def scores(self, name: str) -> PatchScores:
        self._known(name)
        return self._scores(name)

    def slide_list(self) -> list[dict]:
        listed = []
        for name, path in self._paths.items():
            s = self.scores(name)
            listed.append(
                {
                    "name": name,
                    "slide_id": s.slide_id,
                    "split": self._splits.get(s.slide_id),
                    "label": s.label,
                    "predicted": s.predicted,
                    "probability": max(s.slide_probs),
                    "viewable": path is not None,
                    "truth": s.truth is not None,
                }
            )
        return listed

    def slide_info(self, name: str) -> dict:
        """One slide for the page: its size, patches and scores (flat lists), the heatmap's place, the outlines."""
        s, slide = self.scores(name), self._slide(name)
        x0, y0, cols, rows = overlay_grid(s)
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
            "split": self._splits.get(s.slide_id),
            **scales(s),
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
    def overlay_png(self, name: str, scale: str = "percentile") -> bytes:
        s = self.scores(name)
        if scale not in {entry["key"] for entry in scales(s)["scales"]}:
            raise NotFound(f"slide {name!r} has no {scale!r} scale")
        return overlay_png(s, scale)

    def close(self) -> None:
        with self._lock:
            for slide in self._slides.values():
                slide.close()
            self._slides.clear()

    # -- internals ---------------------------------------------------------------------------------------------------
    def _known(self, name: str) -> None:
        if name not in self._paths:
            raise NotFound(f"no slide {name!r} in {self.predict_dir}")

    @functools.lru_cache(maxsize=1024)  # noqa: B019 - see overlay_png
    def _scores(self, name: str) -> PatchScores:
        return read_scores(self.predict_dir, name)

    @functools.lru_cache(maxsize=256)  # noqa: B019 - see overlay_png
    def _tissue(self, name: str) -> dict | None:
        s = self.scores(name)
        return cells_outline(s.coords, s.patch_side)

    def _slide(self, name: str) -> Slide:
        self._known(name)
        path = self._paths[name]
        if path is None:
            raise NotFound(f"{name}: the slide file is not found (give view --slides <folder>)")
        with self._lock:
            if name not in self._slides:
                self._slides[name] = open_slide(path)
            return self._slides[name]


def predict_folder(run_dir: Path, predict: str | None = None) -> Path:
    """The one folder whose slides the viewer shows: `run_dir` itself where it holds a scores store (a two-stage
    predict folder), else `final/<predict>`, the run's own `final/predict` by default. Never a mix: a predict still
    writing shows the slides it has, not the rest filled in from another cohort's folder."""
    if predict is None and (run_dir / SCORES_STORE).is_dir():
        return run_dir
    name = "predict" if predict is None else predict
    if name in ("", ".") or ".." in name or "/" in name or "\\" in name:
        raise ValueError(f"--predict {name!r}: a folder name under {run_dir / 'final'}, not a path")
    folder = run_dir / "final" / name
    if (folder / SCORES_STORE).is_dir():
        return folder
    found = sorted(p.parent.name for p in (run_dir / "final").glob(f"*/{SCORES_STORE}") if p.is_dir())
    hint = f"run `python -m icmil_pl predict -c {run_dir / 'config.yaml'}` first"
    if found:
        hint = f"this run's predict folders: {', '.join(found)} (pick one with --predict <name>)"
    raise ValueError(f"{folder}: no predicted slides (no {SCORES_STORE}); {hint}")


def _slide_file(scores: PatchScores, finder: SlideFinder | None) -> Path | None:
    if finder is not None:
        return finder.find(scores.slide_id)
    if scores.slide_path and Path(scores.slide_path).exists():  # a file, or a DICOM WSI's folder
        return Path(scores.slide_path)
    return None


class ViewerServer(ThreadingHTTPServer):
    """A `ThreadingHTTPServer` answering for one `RunViewer`: a thread per connection, at most `max_connections`
    at once (more wait, accepted by the kernel, for one to end), each closed after `idle_timeout` seconds without a
    request, so that idle or half-open connections cannot pile up threads."""

    daemon_threads = True
    request_queue_size = 256  # a browser opens many tile requests at once

    def __init__(
        self,
        viewer: RunViewer,
        host: str = "127.0.0.1",
        port: int = 8000,
        quiet: bool = True,
        idle_timeout: float = 20.0,
        max_connections: int = 32,
    ) -> None:
        if not (OPENSEADRAGON / "openseadragon.min.js").is_file():
            raise OSError(
                f"{OPENSEADRAGON}: OpenSeadragon is not installed; `make install` installs it (npm ci --prefix {_HERE})"
            )
        self.viewer, self.quiet, self.bound_host = viewer, quiet, host
        self.idle_timeout, self.max_connections = idle_timeout, max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stopping = False
        super().__init__((host, port), _Handler)

    def process_request(self, request, client_address) -> None:
        """Start the connection's thread once a slot is free; its thread gives the slot back as it ends."""
        while not self._slots.acquire(timeout=0.5):
            if self._stopping:  # shutdown() while every slot is busy
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown(self) -> None:
        """Stop `serve_forever`, also while it waits for a slot."""
        self._stopping = True
        super().shutdown()
        self._stopping = False

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'localhost' if host in ('127.0.0.1', '::1') else host}:{port}/"


class _Handler(BaseHTTPRequestHandler):
    server: ViewerServer
    protocol_version = "HTTP/1.1"  # keep-alive: a page loads hundreds of tiles

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout  # on the socket: a connection silent this long is closed
        super().setup()

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        if not self.server.quiet:
            super().log_message(format, *args)

    def _answer(self, send_body: bool) -> None:
        if not host_allowed(self.headers.get("Host"), self.server.bound_host):
            body = b"forbidden: not a host name this viewer answers to\n"
            self._send(HTTPStatus.FORBIDDEN, body, "text/plain", False, send_body)
            return
        try:
            body, kind, cache = self._route(request_path(self.path))
            status = HTTPStatus.OK
        except NotFound:
            body, kind, cache, status = b"not found\n", "text/plain", False, HTTPStatus.NOT_FOUND
        except Exception as error:  # a slide that cannot be read: said, and the server stays up
            self.log_error("%s: %s", self.path, error)
            body, kind, cache = f"{type(error).__name__}: {error}\n".encode(), "text/plain", False
            status = HTTPStatus.INTERNAL_SERVER_ERROR
        self._send(status, body, kind, cache, send_body)

    def _send(self, status: HTTPStatus, body: bytes, kind: str, cache: bool, send_body: bool) -> None:
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
            return static_file(STATIC, "index.html")
        if path.startswith("/static/"):
            return static_file(STATIC, path.removeprefix("/static/"))
        if path.startswith("/osd/"):
            return static_file(OPENSEADRAGON, path.removeprefix("/osd/"), cache=True)
        if path == "/api/slides":
            return _json(viewer.slide_list())
        if path.startswith("/api/slide/"):
            return _json(viewer.slide_info(path.removeprefix("/api/slide/")))
        overlay = _OVERLAY.fullmatch(path)
        if overlay is not None:
            return viewer.overlay_png(overlay["name"], overlay["scale"]), "image/png", True
        tile = _TILE.fullmatch(path)
        if tile is not None:
            address = (int(tile["level"]), int(tile["col"]), int(tile["row"]))
            return viewer.tile(tile["name"], *address), "image/jpeg", True
        if path.startswith("/dz/") and path.endswith(".dzi"):
            return viewer.dzi(path.removeprefix("/dz/").removesuffix(".dzi")).encode(), "application/xml", True
        raise NotFound(path)


def _json(value) -> tuple[bytes, str, bool]:
    return json.dumps(value, separators=(",", ":")).encode(), "application/json", False


def serve(
    run_dir: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    slides: SlideFolders = None,
    quiet: bool = True,
    announce: Callable[[str], None] = print,
    predict: str | None = None,
) -> None:
    """Serve `run_dir`'s predict folder `predict` (see `predict_folder`) until interrupted."""
    viewer = RunViewer(run_dir, slides, predict)
    with ViewerServer(viewer, host, port, quiet) as server:
        announce(f"viewing {len(viewer.names)} slide(s) of {viewer.predict_dir} at {server.url} (Ctrl-C stops)")
        if host in LOOPBACK:
            announce(f"from another machine: ssh -L {port}:localhost:{port} <this host>, then open {server.url}")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            viewer.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m icmil_pl view", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run directory, or a predict folder (holding a scores.zarr) itself")
    parser.add_argument(
        "--predict", help="which predict folder under <run_dir>/final/ to show (default: predict, the run's own)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    parser.add_argument(
        "--slides", action="append", help="a folder the slide files are below, if they moved since predict (repeatable)"
    )
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    serve(args.run_dir, args.host, args.port, args.slides, quiet=not args.verbose, predict=args.predict)
