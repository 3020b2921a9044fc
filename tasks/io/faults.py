"""Fault injection for the crash-anywhere harness (tests/integration/test_crash_anywhere.py).

Steps call ``crash_point("name")`` at the moments where a crash is most damaging: between the files of a
checkpoint, before a manifest or marker makes an output complete, around the renames that publish a
directory, after an optimizer step, before tracking deliveries and atomic renames. Normally it does
nothing but read one cached environment variable.

With ``KIMIVL_CRASH_AT=N`` the N-th call in this process kills it with SIGKILL: no ``finally`` block, no
atexit handler, no flush runs, exactly like a machine loss. With ``KIMIVL_CRASH_NAME=NAME`` too, only calls
with exactly that name count (the N-th ``train:step:vit`` of the process, say). ``KIMIVL_CRASH_LOG=FILE`` appends one
``count name`` line per call (``... KILL`` for the fatal one): the harness counts a run's crash points
with it and shows where each kill landed.
"""

from __future__ import annotations

import os
import signal
from functools import lru_cache

AT, NAME, LOG = "KIMIVL_CRASH_AT", "KIMIVL_CRASH_NAME", "KIMIVL_CRASH_LOG"
_count = 0
_named = 0


@lru_cache(maxsize=1)
def _settings() -> tuple[int | None, str | None, str | None]:
    at = os.environ.get(AT)
    return (int(at) if at else None), os.environ.get(NAME), os.environ.get(LOG)


def crash_point(name: str) -> None:
    """Count this point; SIGKILL the process at the configured count (see the module docstring)."""
    global _count, _named
    at, only, log = _settings()
    if at is None and log is None:
        return
    _count += 1
    if only is None:
        kill = at is not None and _count == at
    else:
        _named += name == only
        kill = at is not None and name == only and _named == at
    if log is not None:
        with open(log, "a") as f:
            f.write(f"{_count} {name}{' KILL' if kill else ''}\n")
            f.flush()
            os.fsync(f.fileno())
    if kill:
        os.kill(os.getpid(), signal.SIGKILL)
