"""Extraction as a job array: the same extraction run several times at once on one cache embeds each slide once (the
manifest says which process did which) and leaves the cache a single process would write, bit for bit; a process
killed mid-slide leaves its slide to the next run; claims of other hosts are judged by their heartbeat; `shard=i/n`
splits the slides without claims."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_modules.datasets.claims import SlideClaims
from data_modules.datasets.feature_cache import FeatureCache
from data_modules.datasets.patches import SlidePatchDataModule
from data_modules.slides.tiling import TilingConfig
from extract_worker import extract

ROOT = Path(__file__).parents[1]
WORKER = Path(__file__).with_name("extract_worker.py")


@pytest.fixture(scope="module")
def reference(icmil_cohort, tmp_path_factory) -> tuple[Path, Path]:
    """One process's cache of the cohort, and the grid cache every run here shares."""
    out = tmp_path_factory.mktemp("reference")
    return extract(icmil_cohort, out / "features", out / "grids"), out / "grids"


def _workers(cohort: Path, cache_root: Path, grids: Path, runs: list[tuple[float, int]]) -> list[subprocess.Popen]:
    """Start one worker per (delay per batch, batch to die at), all released at once past their imports."""
    go = cache_root.parent / f"go-{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(cohort), str(cache_root), str(grids), str(go), str(delay), str(die)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for delay, die in runs
    ]
    for process in processes:
        assert process.stdout.readline().strip() == "ready", process.stderr.read()
    go.touch()
    return processes


def _finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return out


def _same_features(cache: Path, reference: Path) -> None:
    ours, theirs = sorted(p.name for p in cache.glob("*.zarr")), sorted(p.name for p in reference.glob("*.zarr"))
    assert ours == theirs and ours
    for name in ours:
        slide = name.removesuffix(".zarr")
        a, b = FeatureCache(cache).read(slide), FeatureCache(reference).read(slide)
        assert a.features.tobytes() == b.features.tobytes() and np.array_equal(a.coords, b.coords), slide


def test_three_extractions_at_once_embed_each_slide_once(icmil_cohort, reference, tmp_path):
    cache_root = tmp_path / "features"
    reference_cache, grids = reference
    processes = _workers(icmil_cohort, cache_root, grids, [(0.05, 0)] * 3)
    outputs = [_finish(process) for process in processes]

    cache = cache_root / reference_cache.name
    _same_features(cache, reference_cache)
    records = json.loads((cache / "manifest.json").read_text())["extractions"]
    assert sorted(r["pid"] for r in records) == sorted(p.pid for p in processes)
    embedded = [slide for record in records for slide in record["embedded"]]
    slides = sorted(p.name.removesuffix(".zarr") for p in cache.glob("*.zarr"))
    assert sorted(embedded) == slides  # every slide by exactly one process
    assert sum(1 for record in records if record["embedded"]) >= 2  # they shared the work
    for record in records:  # each accounts for every slide: its own, and those the others held or had finished
        total = record["slides_embedded"] + record["slides_cached"] + record["slides_left_to_others"]
        assert total == len(slides) and record["slides_skipped"] == 0
    for record in records:
        attrs = [FeatureCache(cache).read(slide).attrs["embedded_by"] for slide in record["embedded"]]
        assert all(a == {"host": socket.gethostname(), "pid": record["pid"]} for a in attrs)
    assert any("left to other processes" in out for out in outputs)
    assert not list((cache / ".claims").iterdir())  # every claim released
    assert not list(cache.glob(".*.zarr.tmp-*"))


def test_a_process_killed_mid_slide_leaves_its_slide_to_the_next_run(icmil_cohort, reference, tmp_path):
    cache_root = tmp_path / "features"
    reference_cache, grids = reference
    (killed,) = _workers(icmil_cohort, cache_root, grids, [(0.0, 2)])
    killed.communicate(timeout=300)
    assert killed.returncode == -9
    cache = cache_root / reference_cache.name
    (claim,) = (cache / ".claims").glob("*.claim")  # its first slide, half written
    assert json.loads(claim.read_text())["pid"] == killed.pid
    assert list(cache.glob(f".*.zarr.tmp-*-{killed.pid}"))

    extract(icmil_cohort, cache_root, grids)
    _same_features(cache, reference_cache)
    record = json.loads((cache / "manifest.json").read_text())["last_extraction"]
    slide = claim.name.removesuffix(".claim")
    assert list(record["taken_over"]) == [slide] and f"pid {killed.pid}" in record["taken_over"][slide]
    assert slide in record["embedded"]
    assert not list((cache / ".claims").iterdir()) and not list(cache.glob(".*.zarr.tmp-*"))


def _foreign_claim(claims: SlideClaims, slide: str, host: str, pid: int, age: float) -> None:
    path = claims.folder / f"{slide}.claim"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "process_start": None, "claimed_at": time.time() - age}))
    os.utime(path, (time.time() - age, time.time() - age))


def test_claims_of_other_hosts_expire_by_heartbeat_and_dead_local_holders_at_once(tmp_path):
    claims = SlideClaims(tmp_path / ".claims", timeout=60)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _foreign_claim(claims, "fresh", "otherhost", 1, age=5)
    _foreign_claim(claims, "silent", "otherhost", 1, age=120)
    _foreign_claim(claims, "dead", socket.gethostname(), dead.pid, age=5)
    _foreign_claim(claims, "parent", socket.gethostname(), os.getppid(), age=3600)  # alive, however old

    assert not claims.claim("fresh") and claims.holder("fresh").host == "otherhost"
    assert claims.claim("silent") and claims.claim("dead") and not claims.claim("parent")
    assert sorted(claims.taken_over) == ["dead", "silent"] and claims.left_to_others == {"fresh", "parent"}
    assert claims.holder("dead").mine and claims.held == {"silent", "dead"}

    other = SlideClaims(tmp_path / ".claims", timeout=60)  # another process's view: ours are live
    other_pid = claims.holder("dead")
    assert other_pid.pid == os.getpid() and not other_pid.stale(60)
    before = (tmp_path / ".claims" / "dead.claim").stat().st_mtime
    os.utime(tmp_path / ".claims" / "dead.claim", (before - 30, before - 30))
    claims.refresh(force=True)  # the heartbeat
    assert (tmp_path / ".claims" / "dead.claim").stat().st_mtime >= before
    claims.release_all()
    assert sorted(p.name for p in (tmp_path / ".claims").glob("*.claim")) == ["fresh.claim", "parent.claim"]
    assert other.claim("dead")


def test_a_slide_finished_by_another_is_released_not_embedded(tmp_path):
    claims = SlideClaims(tmp_path, done=lambda slide: slide == "finished")
    assert not claims.claim("finished") and claims.left_to_others == {"finished"}
    assert not (tmp_path / "finished.claim").exists() and claims.claim("todo")


@pytest.mark.parametrize("timeout", [0, -1])
def test_a_claim_timeout_must_be_positive(tmp_path, timeout):
    with pytest.raises(ValueError, match="claim_timeout: expected seconds > 0"):
        SlideClaims(tmp_path, timeout=timeout)


def test_static_shards_split_the_slides_in_fixed_balanced_shares(icmil_cohort, reference):
    _, grids = reference

    def share(shard: str | None) -> list[str]:
        tiling = TilingConfig(mpp=0.5, patch_size=64, tissue_threshold=0.5)
        slides = str(icmil_cohort / "slides")
        data = SlidePatchDataModule(str(icmil_cohort / "labels.csv"), slides, tiling, str(grids), shard=shard)
        return [s.slide_id for s in data.dataset().slides]

    everything = share(None)
    parts = [share(f"{i}/3") for i in range(3)]
    assert sorted(s for part in parts for s in part) == sorted(everything)
    assert all(parts) and max(map(len, parts)) - min(map(len, parts)) <= 2


@pytest.mark.parametrize("shard", ["3/3", "-1/2", "a/b", "1", "1/0"])
def test_a_bad_shard_names_the_setting(icmil_cohort, shard):
    with pytest.raises(ValueError, match=r"data.shard: expected i/n with 0 <= i < n"):
        SlidePatchDataModule(str(icmil_cohort / "labels.csv"), shard=shard)
