"""Two processes on one run directory or one feature cache: the second run is refused with the holder named, a dead
holder's lock is free, and half-written slides of dead extractions are cleaned up."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_modules.datasets.feature_cache import FeatureCache
from helpers import icmil_args
from icmil_pl.cli import main
from icmil_pl.run_dir import RunDir

ROOT = Path(__file__).parents[1]
HOLD = """
import sys, time
from icmil_pl.run_dir import RunDir
with RunDir(sys.argv[1]).lock():
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """A separate process holding the run directory `tmp_path / 'out' / 'run'`."""
    run = tmp_path / "out" / "run"
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield run, process
    process.kill()
    process.wait()


def test_a_second_run_on_a_held_run_dir_is_refused_naming_the_holder(holder, icmil_cohort, tmp_path):
    run, process = holder
    pattern = rf"run_dir: {run} is in use by pid {process.pid} on {socket.gethostname()} \(since .*\); wait"
    with pytest.raises(ValueError, match=pattern):
        with RunDir(run).lock():
            pass
    with pytest.raises(ValueError, match=pattern):
        main(icmil_args(icmil_cohort, tmp_path / "out", "fit"))
    assert not (run / "config.yaml").exists() and not (run / "state.json").exists()  # refused before writing
    process.kill()
    process.wait()  # a dead holder's lock is free: no stale lock
    with RunDir(run).lock():
        assert (run / ".lock.json").is_file()
    assert not (run / ".lock.json").exists()


def test_half_written_slides_of_dead_extractions_are_removed(tmp_path):
    cache = FeatureCache(tmp_path / "key")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname().replace("-", "_")
    names = {
        "dead": f".s1.zarr.tmp-{host}-{dead.pid}",
        "live": f".s2.zarr.tmp-{host}-{os.getpid()}",
        "elsewhere": f".s3.zarr.tmp-otherhost-{dead.pid}",
    }
    for name in names.values():
        (cache.path / name).mkdir(parents=True)
    writer = cache.writer("s4", 2, 3, "float32", {})
    writer.append(np.ones((2, 3), np.float32), np.zeros((2, 2), np.int32))
    removed = cache.remove_stale_temporaries()
    assert [p.name for p in removed] == [names["dead"]]
    assert (cache.path / names["live"]).is_dir() and (cache.path / names["elsewhere"]).is_dir()
    assert writer.tmp.is_dir()  # this process's own writer is alive
    writer.commit()
    assert cache.has("s4")
