"""Fault injection for the crash-anywhere harness (tests/integration/test_crash_anywhere.py).

Steps call ``crash_point("name")`` at the moments where a crash is most damaging: between the files of a
checkpoint, before a manifest or marker makes an output complete, after an optimizer step, around tracking
flushes and uploads. Normally it does nothing but read one cached environment variable.

With ``KIMIVL_CRASH_AT=N`` and ``KIMIVL_CRASH_COUNTER=FILE`` set, every call increments the counter in
FILE (shared by the successive processes of a crash/resume chain) and the call that reaches N kills the
process with SIGKILL: no ``finally`` block, no atexit handler, no flush runs, exactly like a machine loss.
``KIMIVL_CRASH_LOG=FILE`` additionally appends ``counter name`` lines (the harness uses it to show where
each kill landed and to count the crash points of a run).
"""

from __future__ import annotations

import fcntl
import os
import signal
from functools import lru_cache

AT, COUNTER, LOG = "KIMIVL_CRASH_AT", "KIMIVL_CRASH_COUNTER", "KIMIVL_CRASH_LOG"


@lru_cache(maxsize=1)
def _settings() -> tuple[int | None, str | None, str | None]:
    at = os.environ.get(AT)
    return (int(at) if at else None), os.environ.get(COUNTER), os.environ.get(LOG)


def crash_point(name: str) -> None:
    """Count this point; SIGKILL the process when the configured count is reached (see the module doc)."""
    at, counter, log = _settings()
    if counter is None and log is None:
        return
    n = 0
    if counter is not None:
        fd = os.open(counter, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.read(fd, 64).strip()
            n = int(raw or b"0") + 1
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, str(n).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    if log is not None:
        with open(log, "a") as f:
            f.write(f"{n} {name}{' KILL' if at is not None and n == at else ''}\n")
            f.flush()
            os.fsync(f.fileno())
    if at is not None and n == at:
        os.kill(os.getpid(), signal.SIGKILL)
