"""Slide claims: which process embeds which slide of a feature cache that several extractions fill at once (a Slurm
job array, machines sharing a filesystem), so that each slide is embedded once and nobody waits on a dead process.

A claim is a small JSON file, `<cache>/.claims/<slide>.claim`, naming the host, the pid (with the process's start
time where the OS tells it, so a reused pid is not taken for the holder) and when it was claimed; its modification
time is the holder's heartbeat. It appears whole or not at all (written aside, then hard-linked into place, which
fails if a claim is there: atomic on local filesystems and on NFS alike, unlike `O_EXCL` on old NFS clients). A claim
held by a dead process on this host is taken over at once; one from another host, whose processes this host cannot
see, once its heartbeat is older than `timeout` seconds. No lock is held across processes: a takeover renames the
stale file away first, so of two processes judging it stale only one gets it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..io import safe_name

__all__ = ["HOST", "Claim", "SlideClaims", "process_alive", "process_start"]

HOST = socket.gethostname()


def process_start(pid: int) -> str | None:
    """When process `pid` started, as the kernel counts it (Linux `/proc/<pid>/stat` field 22), or None where the OS
    does not say: with the pid it names one process, never a later one given the same pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # fields after the command name, which may hold spaces


def process_alive(pid: int, started: str | None = None) -> bool:
    """Whether process `pid` of this host runs, and is the one that started at `started` (where that is known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return started is None or process_start(pid) in (None, started)


@dataclass(frozen=True)
class Claim:
    """What a claim file says: who holds the slide, since when, and how long ago it last said it was alive."""

    host: str
    pid: int
    process_start: str | None
    claimed_at: float
    heartbeat_age: float

    @property
    def mine(self) -> bool:
        return self.host == HOST and self.pid == os.getpid()

    def stale(self, timeout: float) -> bool:
        """A holder on this host is judged by its process; one elsewhere by its heartbeat."""
        if self.host == HOST:
            return not process_alive(self.pid, self.process_start)
        return self.heartbeat_age > timeout

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} (since {time.strftime('%H:%M:%S', time.localtime(self.claimed_at))})"


class SlideClaims:
    """This process's claims on the slides of one cache folder.

    `done(slide_id)` says whether a slide's features are complete by now: a slide another process finished after this
    one looked at the cache is released at once rather than embedded again. `refresh` is the heartbeat, cheap enough
    to call after every batch (it touches the files at most every `timeout / 10` seconds)."""

    def __init__(self, folder: str | os.PathLike, timeout: float = 600.0, done: Callable[[str], bool] | None = None):
        if not timeout > 0:
            raise ValueError(f"claim_timeout: expected seconds > 0, got {timeout!r}")
        self.folder, self.timeout, self.done = Path(folder), float(timeout), done
        self.held: set[str] = set()
        self.left_to_others: set[str] = set()  # slides another process held, or had finished, when this one came
        self.taken_over: dict[str, str] = {}  # slide id -> the stale holder this process took it from
        self._refreshed = time.monotonic()

    def claim(self, slide_id: str) -> bool:
        """Whether this process should embed `slide_id` now: it holds the claim and the features are not there."""
        if slide_id in self.held:
            return True
        path = self._path(slide_id)
        for _ in range(3):  # a claim released or taken over between our looks: look again
            if self._create(path):
                self.held.add(slide_id)
                if self.done is not None and self.done(slide_id):  # finished by another since we looked
                    self.release(slide_id)
                    self.left_to_others.add(slide_id)
                    return False
                self.left_to_others.discard(slide_id)
                return True
            holder = self.holder(slide_id)
            if holder is None:
                continue
            if holder.mine:
                self.held.add(slide_id)
                return True
            if not holder.stale(self.timeout):
                self.left_to_others.add(slide_id)
                return False
            if self._set_aside(path, holder):
                self.taken_over[slide_id] = holder.describe()
        self.left_to_others.add(slide_id)
        return False

    def holder(self, slide_id: str) -> Claim | None:
        """Who holds `slide_id`, or None (no claim, or one being replaced)."""
        path = self._path(slide_id)
        try:
            text, modified = path.read_text(), path.stat().st_mtime
            record = json.loads(text)
            return Claim(
                str(record["host"]),
                int(record["pid"]),
                record.get("process_start"),
                float(record["claimed_at"]),
                max(0.0, time.time() - modified),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):  # not ours to read: a foreign file, judged by its age
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                return None
            return Claim("unknown", -1, None, time.time() - age, age)

    def refresh(self, force: bool = False) -> None:
        """Tell the others that this process's claims are alive (their files' modification time)."""
        now = time.monotonic()
        if not self.held or (not force and now - self._refreshed < self.timeout / 10):
            return
        self._refreshed = now
        for slide_id in self.held:
            try:
                os.utime(self._path(slide_id))
            except FileNotFoundError:  # taken over while this process stalled past the timeout: it goes on anyway
                pass

    def release(self, slide_id: str) -> None:
        """Give up `slide_id` (embedded, skipped or abandoned): its file goes if it is still this process's."""
        self.held.discard(slide_id)
        holder = self.holder(slide_id)
        if holder is not None and holder.mine:
            self._path(slide_id).unlink(missing_ok=True)

    def release_all(self) -> None:
        for slide_id in list(self.held):
            self.release(slide_id)

    def _path(self, slide_id: str) -> Path:
        return self.folder / f"{safe_name(slide_id)}.claim"

    def _create(self, path: Path) -> bool:
        """Put this process's claim at `path` unless one is there."""
        path.parent.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        record = {"host": HOST, "pid": pid, "process_start": process_start(pid), "claimed_at": time.time()}
        aside = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        aside.write_text(json.dumps(record))
        try:
            os.link(aside, path)
            return True
        except FileExistsError:
            return False
        finally:
            aside.unlink(missing_ok=True)

    def _set_aside(self, path: Path, stale: Claim) -> bool:
        """Move the stale claim at `path` out of the way; False if another process was quicker (then the file moved
        may be its fresh claim, which goes back)."""
        aside = path.with_name(f".{path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        try:
            record = json.loads(aside.read_text())
            same = (record.get("host"), record.get("pid"), record.get("claimed_at")) == (
                stale.host,
                stale.pid,
                stale.claimed_at,
            )
        except (OSError, ValueError):
            same = stale.host == "unknown"
        if not same:  # a claim made after we looked: put it back unless yet another is there
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)
        return same
