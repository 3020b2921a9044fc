"""One trainer per phase directory (``tasks/train/phase_lock.py``): a second holder is refused naming the
first (pid, host); the lock is free again after release and after its process is SIGKILLed; a forced
rerun sets the directory aside (nothing deleted) and refuses to while the phase trains."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tasks.train.phase_lock import LOCK_NAME, PhaseBusyError, phase_lock, set_aside


def test_second_holder_is_refused_naming_the_first(tmp_path):
    busy = rf"being trained by pid {os.getpid()} on .* since 20"
    with phase_lock(tmp_path / "p"), pytest.raises(PhaseBusyError, match=busy), phase_lock(tmp_path / "p"):
        pass
    with phase_lock(tmp_path / "p"):  # released: free again
        pass
    assert (tmp_path / "p" / LOCK_NAME).read_text() == ""  # no holder recorded once released


def test_lock_of_a_killed_process_is_free(tmp_path):
    code = (
        "import sys, time\nfrom tasks.train.phase_lock import phase_lock\n"
        f"with phase_lock({str(tmp_path / 'p')!r}):\n    print('held', flush=True)\n    time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(PhaseBusyError, match=f"pid {child.pid}"), phase_lock(tmp_path / "p"):
            pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            with phase_lock(tmp_path / "p"):
                break
        except PhaseBusyError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_set_aside_keeps_everything_and_refuses_a_busy_phase(tmp_path):
    pdir = tmp_path / "phases" / "sft.1"
    assert set_aside(pdir) is None  # nothing there yet
    (pdir / "final").mkdir(parents=True)
    (pdir / "final" / "result.json").write_text("{}")
    with phase_lock(pdir), pytest.raises(PhaseBusyError, match="being trained by"):
        set_aside(pdir)
    assert (pdir / "final" / "result.json").is_file()  # untouched while busy
    first = set_aside(pdir)
    assert not pdir.exists() and first.parent == pdir.parent
    assert first.name.startswith(".sft.1.replaced-") and (first / "final" / "result.json").read_text() == "{}"
    (pdir / "final").mkdir(parents=True)
    second = set_aside(pdir)  # same second: a distinct name, the first one kept
    assert second != first and first.is_dir() and second.is_dir()
