"""The zoomable viewer: Deep Zoom tiles against `Slide.read_region`, what the server refuses (unknown slides, tiles
past the edge, paths out of its folders or not paths at all, Host headers not its own), 200 concurrent tile requests,
idle connections timed out with the threads bounded, one predict folder shown at a time, and the page itself in
headless Chromium: tiles at two zoom levels, the heatmap drawn, and a click on a patch reporting that patch's score."""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import matplotlib
import numpy as np
import pytest
from PIL import Image

from data_modules.annotations import read_annotations
from data_modules.cohort.splits import save_splits
from data_modules.slides import open_slide
from data_modules.slides.tiling import patch_grid
from data_modules.synthetic import CohortSpec, make_cohort
from icmil_pl.outputs.patch_scores import PatchScores, write_scores
from icmil_pl.outputs.plots import CMAP, percentiles
from icmil_pl.views.viewer import DeepZoom, RunViewer, TileOutOfRange, ViewerServer
from icmil_pl.views.viewer.browser import CHROMEDRIVER, CHROMIUM, chromium_driver, has_chromium
from icmil_pl.views.viewer.server import OPENSEADRAGON

needs_openseadragon = pytest.mark.skipif(
    not (OPENSEADRAGON / "openseadragon.min.js").is_file(), reason="OpenSeadragon not installed (make install)"
)


LONG_ID = "TCGA-A1-A0SB-01Z-00-DX1.ABC123"  # 30 characters, as TCGA's slide ids (23 and more) are


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run folder whose `final/predict` holds two synthetic slides' patches (the real tissue grid) with random
    scores and per-patch probabilities, and the tumour truth the cohort knows: one called tumour under a 30-character
    id (a training slide), one called normal (a test slide)."""
    root = tmp_path_factory.mktemp("viewer")
    spec = CohortSpec(n_slides=2, size=(1536, 1152), positive_fraction=1.0, tumour_area=(0.2, 0.3))
    cohort = make_cohort(root / "cohort", spec)
    rng = np.random.default_rng(0)
    ids = {}
    for negative, path in enumerate(sorted((cohort / "slides").iterdir())):
        slide_id = path.name.split(".")[0] if negative else LONG_ID
        ids["test" if negative else "train"] = [slide_id]
        grid = patch_grid(path, mpp=1.0, patch_size=32)
        n = len(grid.coords)
        probs = rng.dirichlet([1, 1], n).astype(np.float32)
        with open_slide(path) as slide:
            dimensions = slide.dimensions
        scores = PatchScores(
            slide_id=slide_id,
            coords=grid.coords.astype(np.int64),
            scores=rng.dirichlet(np.ones(n)).astype(np.float32),
            kind="attention",
            probs=probs,
            classes=["normal", "tumour"],
            label="tumour",
            predicted="normal" if negative else "tumour",
            slide_probs=[0.8, 0.2] if negative else [0.2, 0.8],
            patch_side=grid.level0_size,
            slide_path=str(path.resolve()),
            dimensions=dimensions,
            truth=read_annotations(cohort / "annotations" / f"{path.name.split('.')[0]}.geojson").outline(),
        )
        write_scores(root / "run" / "final" / "predict", scores)
    save_splits(ids, root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def server(run):
    if not (OPENSEADRAGON / "openseadragon.min.js").is_file():
        pytest.skip("OpenSeadragon not installed (make install runs npm ci)")
    viewer = RunViewer(run)
    httpd = ViewerServer(viewer, port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    viewer.close()


def _get(server: ViewerServer, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, str]:
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read(), response.getheader("Content-Type", "")
    finally:
        connection.close()


def test_tiles_equal_read_region_where_levels_coincide_and_are_resized_elsewhere(run):
    viewer = RunViewer(run)
    name = viewer.names[0]
    with open_slide(viewer.scores(name).slide_path) as slide:
        dz = DeepZoom(slide)
        assert dz.level_dimensions[-1] == slide.dimensions and dz.level_dimensions[0] == (1, 1)
        assert slide.level_downsamples[:2] == (1.0, 4.0)
        coinciding = {dz.max_level: 0, dz.max_level - 2: 1}  # Deep Zoom downsample 1 and 4: slide levels 0 and 1
        for level, source in coinciding.items():
            cols, rows = dz.tile_grid(level)
            w, h = dz.level_dimensions[level]
            assert (cols, rows) == (-(-w // 254), -(-h // 254))
            for col in range(cols):
                for row in range(rows):
                    x, y, tw, th = dz.tile_rect(level, col, row)
                    d = dz.downsample(level)
                    expected = slide.read_region((int(x * d), int(y * d)), source, (tw, th))
                    np.testing.assert_array_equal(dz.tile(level, col, row), expected)
        # overlap: a tile reaches one pixel into each neighbour, and the last one stops at the edge
        cols, rows = dz.tile_grid(dz.max_level)
        assert dz.tile_rect(dz.max_level, 1, 0)[:3] == (253, 0, 256)
        assert dz.tile_rect(dz.max_level, cols - 1, 0)[0] + dz.tile_rect(dz.max_level, cols - 1, 0)[2] == 1536
        # between slide levels: downsample 2 is level 0 resized by half, the same picture at half size
        half = dz.tile(dz.max_level - 1, 0, 0)
        full = slide.read_region((0, 0), 0, (2 * half.shape[1], 2 * half.shape[0]))
        reduced = np.asarray(Image.fromarray(full).resize(half.shape[1::-1], Image.Resampling.BOX))
        assert np.abs(half.astype(int) - reduced).mean() < 3
        with pytest.raises(TileOutOfRange):
            dz.tile(dz.max_level, cols, 0)
        with pytest.raises(TileOutOfRange):
            dz.tile(dz.max_level + 1, 0, 0)
    viewer.close()


def test_served_tiles_decode_to_the_tile_and_the_api_carries_the_scores(server, run):
    viewer = server.viewer
    name = viewer.names[0]
    scores = viewer.scores(name)
    status, body, kind = _get(server, f"/dz/{quote(name)}.dzi")
    assert status == 200 and kind == "application/xml" and b'TileSize="254"' in body and b'Width="1536"' in body
    dz = DeepZoom(viewer._slide(name))
    status, body, kind = _get(server, f"/dz/{quote(name)}_files/{dz.max_level}/1_1.jpeg")
    assert status == 200 and kind == "image/jpeg"
    served = np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype(int)
    assert np.abs(served - dz.tile(dz.max_level, 1, 1)).mean() < 4  # JPEG at quality 90
    status, body, _ = _get(server, f"/api/slide/{quote(name)}")
    info = json.loads(body)
    assert status == 200 and info["slide_id"] == scores.slide_id and info["dimensions"] == [1536, 1152]
    np.testing.assert_array_equal(np.reshape(info["coords"], (-1, 2)), scores.coords)
    np.testing.assert_allclose(info["scores"], scores.scores, rtol=1e-5)
    np.testing.assert_allclose(info["probs"], scores.probs, rtol=1e-5)
    assert info["truth"]["type"] in ("Polygon", "MultiPolygon") and info["tissue"]["type"] in (
        "Polygon",
        "MultiPolygon",
    )
    assert info["split"] == "train" and info["default_scale"] == "percentile"  # a positive call: attention ranks
    assert [s["key"] for s in info["scales"]] == ["percentile", "p0", "p1"] and len(info["colours"]) == 11
    status, body, kind = _get(server, f"/overlay/percentile/{quote(name)}.png")
    heat = np.asarray(Image.open(io.BytesIO(body)))
    x0, y0 = scores.coords.min(0)
    cols, rows = ((scores.coords.max(0) - scores.coords.min(0)) / scores.patch_side).round().astype(int) + 1
    factor = heat.shape[1] // cols
    assert heat.shape == (rows * factor, cols * factor, 4) and factor >= 1
    k = int(np.argmax(scores.scores))
    i, j = ((scores.coords[k] - (x0, y0)) / scores.patch_side).round().astype(int)
    colour = (np.asarray(matplotlib.colormaps[CMAP](percentiles(scores.scores)[k])) * 255).astype(np.uint8)
    np.testing.assert_array_equal(heat[j * factor, i * factor], colour)
    assert (heat[..., 3] > 0).sum() == len(scores.coords) * factor * factor  # transparent where no patch is
    absolute = np.asarray(Image.open(io.BytesIO(_get(server, f"/overlay/p1/{quote(name)}.png")[1])))
    colour = (np.asarray(matplotlib.colormaps[CMAP](scores.probs[k, 1])) * 255).astype(np.uint8)
    np.testing.assert_array_equal(absolute[j * factor, i * factor], colour)  # p(tumour) itself, not its rank


def test_a_slide_called_negative_opens_on_the_absolute_probability_and_the_list_has_splits(server):
    listed = json.loads(_get(server, "/api/slides")[1])
    assert {(s["slide_id"], s["split"], s["predicted"], s["truth"]) for s in listed} == {
        (LONG_ID, "train", "tumour", True),
        (server.viewer.scores(server.viewer.names[1]).slide_id, "test", "normal", True),
    }
    negative = next(s["name"] for s in listed if s["predicted"] == "normal")
    info = json.loads(_get(server, f"/api/slide/{quote(negative)}")[1])
    assert info["split"] == "test" and info["default_scale"] == "p1"  # p(tumour), on the same scale as any slide


@pytest.mark.parametrize(
    "path",
    [
        "/dz/no_such_slide.dzi",
        "/dz/no_such_slide_files/10/0_0.jpeg",
        "/dz/{name}_files/{past_level}/0_0.jpeg",
        "/dz/{name}_files/{max_level}/{past_col}_0.jpeg",
        "/dz/{name}_files/{max_level}/0_99.jpeg",
        "/api/slide/no_such_slide",
        "/overlay/no_such_slide.png",
        "/overlay/percentile/no_such_slide.png",
        "/overlay/{name}.png",  # no scale
        "/overlay/p7/{name}.png",  # no class 7
        "/overlay/attention/{name}.png",
        "/static/../server.py",
        "/static/%2e%2e/server.py",
        "/static/..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/osd/../../../../../../etc/passwd",
        "/osd/%2e%2e%2f%2e%2e%2fpackage.json",
        "/osd/../../../../static/viewer.js",  # a file the server has, of a type it serves, but not in that folder
        "/static/../node_modules/openseadragon/build/openseadragon/openseadragon.min.js",
        "/dz/..%2f..%2f..%2f..%2fetc%2fpasswd.dzi",
        "/api/slide/..%2f..%2fconfig.yaml",
        "/etc/passwd",
        "/static/",
        "/static/viewer.js%00.html",  # a NUL byte: not a path
        "/static/%00",
        "/osd/openseadragon.min.js%00",
        "/api/slide/{name}%00",
        "/dz/{name}%00.dzi",
        "/overlay/%00.png",
        "/static/" + "a" * 5000 + ".js",  # longer than any file name
    ],
)
def test_the_server_answers_404_for_what_it_does_not_serve(server, path):
    name = server.viewer.names[0]
    dz = DeepZoom(server.viewer._slide(name))
    cols, _ = dz.tile_grid(dz.max_level)
    path = path.format(name=quote(name), past_level=dz.max_level + 1, max_level=dz.max_level, past_col=cols)
    status, body, _ = _get(server, path)
    assert status == 404, (path, body[:80])
    assert b"root:" not in body


def test_the_server_stays_up_under_200_concurrent_tile_requests(server):
    name = server.viewer.names[1]
    dz = DeepZoom(server.viewer._slide(name))
    server.viewer.tile.cache_clear()  # cut every tile, none from the cache
    addresses = [
        (level, col, row)
        for level in range(dz.max_level - 3, dz.max_level + 1)
        for col in range(dz.tile_grid(level)[0])
        for row in range(dz.tile_grid(level)[1])
    ]
    requests = [addresses[k % len(addresses)] for k in range(200)]
    with ThreadPoolExecutor(max_workers=64) as pool:
        answers = list(pool.map(lambda a: _get(server, f"/dz/{quote(name)}_files/{a[0]}/{a[1]}_{a[2]}.jpeg"), requests))
    assert [status for status, _, _ in answers] == [200] * 200
    assert all(body[:2] == b"\xff\xd8" for _, body, _ in answers)  # every one a JPEG
    assert _get(server, "/api/slides")[0] == 200


@pytest.mark.parametrize(
    "host", ["evil.example:{port}", "evil.example", "localhost.evil.example", "127.0.0.1.nip.io:{port}"]
)
def test_a_host_header_not_the_servers_own_is_refused_against_dns_rebinding(server, host):
    port = server.server_address[1]
    status, body, _ = _get(server, "/api/slides", {"Host": host.format(port=port)})
    assert status == 403 and b"slide" not in body
    for own in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost", f"[::1]:{port}"):
        assert _get(server, "/api/slides", {"Host": own})[0] == 200, own


def test_bound_to_every_interface_ip_literals_and_this_machines_names_pass_and_other_names_do_not():
    from icmil_pl.views.viewer.guards import host_allowed

    for host in ("10.1.2.3:8000", "[fe80::1]:8000", "localhost", f"{socket.gethostname()}:8000", socket.getfqdn()):
        assert host_allowed(host, "0.0.0.0"), host
    for host in ("evil.example:8000", "10.1.2.3.nip.io", "[evil]:8000", "localhost:http", ""):
        assert not host_allowed(host, "0.0.0.0"), host
    assert not host_allowed("10.1.2.3:8000", "127.0.0.1") and host_allowed("10.1.2.3:8000", "10.1.2.3")
    assert host_allowed(None, "127.0.0.1")  # HTTP/1.0 sends none


@needs_openseadragon
def test_idle_connections_time_out_and_the_connection_threads_are_bounded(run):
    viewer = RunViewer(run)
    httpd = ViewerServer(viewer, port=0, idle_timeout=0.5)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    before = threading.active_count()
    idle = []
    try:
        idle = [socket.create_connection(httpd.server_address[:2], timeout=20) for _ in range(100)]  # send nothing
        peak = 0
        for _ in range(10):
            peak = max(peak, threading.active_count())
            time.sleep(0.03)
        assert httpd.max_connections <= 32 and peak <= before + httpd.max_connections + 2, peak
        start = time.monotonic()
        assert _get(httpd, "/api/slides")[0] == 200
        assert time.monotonic() - start < 10  # once the idle ones time out, 32 at a time
        assert all(s.recv(1) == b"" for s in idle)  # the server closed every one
        end = time.monotonic() + 10
        while threading.active_count() > before + 1 and time.monotonic() < end:
            time.sleep(0.05)
        assert threading.active_count() <= before + 1  # their threads are gone
    finally:
        for s in idle:
            s.close()
        httpd.shutdown()
        httpd.server_close()
        viewer.close()


def _write(root: Path, slide_id: str) -> None:
    """A two-patch slide's scores (no slide file) in `<root>/scores.zarr`."""
    scores = PatchScores(
        slide_id=slide_id,
        coords=np.array([[0, 0], [32, 0]], np.int64),
        scores=np.array([0.25, 0.75], np.float32),
        kind="attention",
        probs=None,
        classes=["normal", "tumour"],
        label=None,
        predicted="tumour",
        slide_probs=[0.3, 0.7],
        patch_side=32.0,
    )
    write_scores(root, scores)


def test_one_predict_folder_is_shown_the_runs_own_unless_another_is_named(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _write(run / "final" / "predict", "A")  # a predict half written: B not yet
    for slide_id in ("A", "B"):
        _write(run / "final" / "predict-other", slide_id)
    (run / "final" / "figures").mkdir()  # a folder without scores is not a predict folder
    viewer = RunViewer(run)
    assert viewer.names == ["A"] and [s["name"] for s in viewer.slide_list()] == ["A"]
    assert viewer.predict_dir == run / "final" / "predict"
    other = RunViewer(run, predict="predict-other")
    assert other.names == ["A", "B"] and other.predict_dir == run / "final" / "predict-other"
    assert RunViewer(run / "final" / "predict-other").names == ["A", "B"]  # a predict folder given itself
    with pytest.raises(ValueError, match=r"predict-nope: .*predict, predict-other.*--predict <name>") as error:
        RunViewer(run, predict="predict-nope")
    assert "\n" not in str(error.value)
    for bad in ("../run/final/predict", "predict/..", "..", f"{run}/final/predict"):
        with pytest.raises(ValueError, match="a folder name"):
            RunViewer(run, predict=bad)
    (run / "final" / "predict" / "scores.zarr").rename(run / "final" / "predict" / "moved.zarr")
    with pytest.raises(ValueError, match=r"final/predict: no predicted slides.*predict-other.*--predict <name>"):
        RunViewer(run)

    from icmil_pl.__main__ import main

    monkeypatch.setattr("sys.argv", ["python -m icmil_pl", "view", str(run), "--predict", "predict-nope"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert str(exit_info.value.code).startswith(f"error: {run / 'final' / 'predict-nope'}: no predicted slides")


def test_an_unknown_run_and_a_run_without_predictions_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no such run directory"):
        RunViewer(tmp_path / "missing")
    with pytest.raises(ValueError, match="no predicted slides"):
        RunViewer(tmp_path)


# -- the page in a real browser -----------------------------------------------------------------------------------
def _chromium(tmp_path: Path):
    """Debian's chromium through its chromedriver (`.ci/run` installs both; ICMIL_PL_REQUIRE_BROWSER=1 there makes
    their absence a failure rather than a skip)."""
    if not has_chromium():
        if os.environ.get("ICMIL_PL_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are required (apt-get install chromium chromium-driver)")
        pytest.skip("chromium and chromium-driver are not installed")
    return chromium_driver(tmp_path / "chromium")


def _wait(driver, script: str, timeout: float = 60.0):
    """Poll `script` (a JS expression) until it is truthy; its value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = driver.execute_script(f"return {script};")
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {script}")


_LOADED = (
    "(() => { const s = window.icmilViewer; const w = s && s.viewer && s.viewer.world;"
    " return s && s.heatmap && w.getItemCount() === 2 && w.getItemAt(0).getFullyLoaded()"
    " && s.heatmap.getFullyLoaded(); })()"
)


def _screen_point(driver, x: float, y: float) -> tuple[float, float]:
    """Level-0 slide pixel (x, y) on the page, in CSS pixels from the viewport's top-left."""
    return tuple(
        driver.execute_script(
            "const s = window.icmilViewer; const p = s.viewer.world.getItemAt(0).imageToViewerElementCoordinates("
            "new OpenSeadragon.Point(arguments[0], arguments[1])); const r = document.getElementById('view')"
            ".getBoundingClientRect(); return [r.left + p.x, r.top + p.y];",
            x,
            y,
        )
    )


def _pixel(driver, point: tuple[float, float]) -> np.ndarray:
    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    return np.asarray(shot)[int(point[1]), int(point[0])].astype(int)


@needs_openseadragon
def test_the_page_shows_tiles_at_two_levels_the_heatmap_and_a_clicked_patch(server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    name = server.viewer.names[0]
    scores = server.viewer.scores(name)
    driver = _chromium(tmp_path)
    try:
        driver.get(f"{server.url}#slide={quote(name)}")
        _wait(driver, _LOADED)
        assert driver.execute_script("return window.icmilViewer.slide.name;") == name

        def levels() -> set[int]:
            script = "return window.icmilViewer.tiles.filter(t => t.image === 0).map(t => t.level);"
            return set(driver.execute_script(script))

        overview = levels()
        assert overview, "no slide tile loaded"

        # zoom on the most attended patch: the finest level loads there, beside the overview's level
        k = int(np.argmax(scores.scores))
        x, y = scores.coords[k] + scores.patch_side / 2
        driver.execute_script(
            "const s = window.icmilViewer, v = s.viewer.viewport;"
            "const p = s.viewer.world.getItemAt(0).imageToViewportCoordinates(arguments[0], arguments[1]);"
            "v.panTo(p, true); v.zoomTo(v.getMaxZoom(), p, true);",
            float(x),
            float(y),
        )
        _wait(driver, _LOADED)
        dz = DeepZoom(server.viewer._slide(name))
        assert dz.max_level in levels() and len(levels()) >= 2, levels()
        point = _screen_point(driver, x, y)

        # the heatmap at opacity 1 is the patch's colour; at 0 the slide shows through
        slider = (
            "const o = document.getElementById('opacity'); o.value = arguments[0];"
            "o.dispatchEvent(new Event('input')); window.icmilViewer.viewer.forceRedraw();"
        )
        driver.execute_script(slider, 1)
        time.sleep(0.5)
        expected = np.asarray(matplotlib.colormaps[CMAP](percentiles(scores.scores)[k]))[:3] * 255
        assert np.abs(_pixel(driver, point) - expected).max() <= 12
        driver.execute_script(slider, 0)
        time.sleep(0.5)
        assert np.abs(_pixel(driver, point) - expected).max() > 40

        # a click on the patch reports its own score and coordinates
        view = driver.find_element(By.ID, "view")
        rect = view.rect
        ActionChains(driver).move_to_element_with_offset(
            view, point[0] - rect["x"] - rect["width"] / 2, point[1] - rect["y"] - rect["height"] / 2
        ).click().perform()
        info = driver.find_element(By.ID, "info")
        _wait(driver, f"document.getElementById('info').dataset.index === '{k}'", timeout=20)
        assert float(info.get_attribute("data-score")) == pytest.approx(float(scores.scores[k]), rel=1e-5)
        assert f"({scores.coords[k][0]}, {scores.coords[k][1]})" in info.text
        assert f"p(tumour) = {scores.probs[k][1]:.4f}" in info.text
        assert driver.execute_script("return window.icmilViewer.selected;") == k
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium", ignore_errors=True)


def test_the_view_command_ends_with_one_line_on_a_bad_run(tmp_path, monkeypatch):
    from icmil_pl.__main__ import main

    monkeypatch.setattr("sys.argv", ["python -m icmil_pl", "view", str(tmp_path / "missing")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == f"error: {tmp_path / 'missing'}: no such run directory"


@needs_openseadragon
def test_the_sidebar_shows_split_and_p_without_scrolling_and_a_negative_slide_its_absolute_scale(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    listed = json.loads(_get(server, "/api/slides")[1])
    negative = next(s["name"] for s in listed if s["predicted"] == "normal")
    scores = server.viewer.scores(negative)
    driver = _chromium(tmp_path)
    try:
        driver.set_window_size(1280, 800)
        driver.get(f"{server.url}#slide={quote(negative)}")
        _wait(driver, _LOADED)
        sidebar = driver.find_element(By.ID, "sidebar")
        scroll, width = driver.execute_script("return [arguments[0].scrollWidth, arguments[0].clientWidth];", sidebar)
        assert scroll <= width  # no horizontal scrollbar, with a 30-character id
        long_row = driver.find_element(By.CSS_SELECTOR, f'#slides tr[data-name="{listed[0]["name"]}"]')
        cells = long_row.find_elements(By.TAG_NAME, "td")
        assert [c.text for c in cells] == [LONG_ID, "train", "tumour", "tumour", "0.800"]
        assert cells[-1].rect["x"] + cells[-1].rect["width"] <= sidebar.rect["x"] + sidebar.rect["width"]
        Select(driver.find_element(By.ID, "split-filter")).select_by_value("test")
        assert not long_row.is_displayed() and driver.find_element(By.CSS_SELECTOR, "#slides tr.current").is_displayed()

        # called normal: p(tumour) of each patch on 0-1, said by the colour bar
        assert driver.execute_script("return window.icmilViewer.scale;") == "p1"
        assert driver.find_element(By.ID, "bar-title").text == (
            "p(tumour) of the patch alone, 0 to 1: the same scale on every slide"
        )
        assert driver.find_element(By.ID, "truth-control").is_displayed()
        k = int(np.argmax(scores.probs[:, 1]))
        x, y = scores.coords[k] + scores.patch_side / 2
        driver.execute_script(
            "const s = window.icmilViewer, v = s.viewer.viewport;"
            "const p = s.viewer.world.getItemAt(0).imageToViewportCoordinates(arguments[0], arguments[1]);"
            "v.panTo(p, true); v.zoomTo(v.getMaxZoom(), p, true);"
            "const o = document.getElementById('opacity'); o.value = 1; o.dispatchEvent(new Event('input'));",
            float(x),
            float(y),
        )
        _wait(driver, _LOADED)
        time.sleep(0.5)
        expected = np.asarray(matplotlib.colormaps[CMAP](scores.probs[k, 1]))[:3] * 255
        assert np.abs(_pixel(driver, _screen_point(driver, x, y)) - expected).max() <= 12

        Select(driver.find_element(By.ID, "scale")).select_by_value("percentile")  # back to the ranks in the slide
        _wait(driver, _LOADED)
        assert driver.find_element(By.ID, "bar-title").text == "attention, percentile in slide"
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium", ignore_errors=True)
