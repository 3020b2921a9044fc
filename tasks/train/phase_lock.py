"""One trainer per phase directory: an exclusive, non-blocking ``flock`` on ``<phase dir>/.lock`` held by
rank 0 (the writer of checkpoints and ``final/``) for the whole phase.

Two runs of the same phase into the same run directory (a deployment triggered twice from the Prefect UI,
``kimivl stage`` started again in another terminal, ranks of a killed flow still finishing) would both
train and race each other's checkpoint renames. The second one now stops before any work with a
``PhaseBusyError`` naming the holder (pid, host, start time). The kernel drops the lock when its process
dies, SIGKILL included, so a crashed run never leaves a stale lock. ``flock`` is per host: on a shared
file system across nodes it protects only as far as that file system implements it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".lock"


class PhaseBusyError(RuntimeError):
    """Another process is training this phase into the same directory."""


@contextlib.contextmanager
def phase_lock(pdir: Path, what: str = "phase") -> Iterator[None]:
    pdir = Path(pdir)
    pdir.mkdir(parents=True, exist_ok=True)
    path = pdir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            try:
                h = json.loads(holder)
                who = f"pid {h['pid']} on {h['host']} since {h['since']}"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise PhaseBusyError(
                f"{pdir}: this {what} is being trained by {who}; wait for it to finish or stop it "
                f"(the lock is {path}, released when that process exits)"
            ) from None
        os.ftruncate(fd, 0)
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        os.pwrite(
            fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode(), 0
        )
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def set_aside(pdir: Path, what: str = "phase") -> Path | None:
    """Move a phase directory out of the way so the phase trains again from its start (a forced rerun):
    ``<parent>/.<name>.replaced-<UTC time>``, nothing deleted. Taken under the phase's lock, so a phase
    being trained right now is refused (``PhaseBusyError``) instead of moved under its trainer.
    Returns the new location, or None when there was nothing to move."""
    pdir = Path(pdir)
    if not pdir.is_dir():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = pdir.parent / f".{pdir.name}.replaced-{stamp}"
    n = 1
    while aside.exists():
        n += 1
        aside = pdir.parent / f".{pdir.name}.replaced-{stamp}-{n}"
    with phase_lock(pdir, what):
        pdir.rename(aside)  # the held lock file moves with it; the next trainer locks a fresh directory
    return aside
