"""What ``kimivl serve`` / ``kimivl down`` rely on in ``flows/services.py``: thread counts per concurrent flow
run, stopping a whole process tree across sessions, and ``down`` stopping every recorded serve (and what it
started) before the servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

from flows.services import run_thread_env, serve_files, stop_services, stop_tree

# a process that starts a grandchild in its own session (as torchrun does with ranks, Prefect's runner
# with flow runs), prints "started" and the grandchild's pid, then runs BODY and waits
TREE = """
import subprocess, sys, time, signal
if {ignore_term}:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
print("started", flush=True)
print(child.pid, flush=True)
{body}
time.sleep(300)
"""


def _spawn(ignore_term: bool = False, body: str = "") -> tuple[subprocess.Popen, int]:
    code = TREE.format(ignore_term=ignore_term, body=body)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    return proc, int(proc.stdout.readline())


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_thread_counts_share_the_host():
    assert run_thread_env(1, {}, cpus=8) == {"OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8"}
    assert run_thread_env(3, {}, cpus=8) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    assert run_thread_env(4, {}, cpus=2) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert run_thread_env(2, {"OMP_NUM_THREADS": "5"}, cpus=8)["OMP_NUM_THREADS"] == "5"  # user's choice


def test_stop_tree_reaches_other_sessions_and_kills_what_ignores_sigterm():
    for ignore in (False, True):
        proc, child = _spawn(ignore_term=ignore)
        assert stop_tree(proc.pid, grace=2.0) is True
        proc.wait(timeout=10)
        assert _gone(child), f"grandchild {child} left behind (ignore_term={ignore})"
    assert stop_tree(proc.pid, grace=1.0) is False  # not running any more


def test_down_stops_recorded_serves_first_and_forgets_them(tmp_path):
    body = (
        "from flows.services import serve_record\n"
        f"with serve_record({str(tmp_path)!r}, 'http://127.0.0.1:9/api'):\n"
        "    print('recorded', flush=True)\n    time.sleep(300)\n"
    )
    proc, child = _spawn(body=body)
    assert proc.stdout.readline().strip() == "recorded"
    (rec,) = serve_files(tmp_path)
    assert json.loads(rec.read_text())["pid"] == proc.pid
    (tmp_path / "serve-999999999.json").write_text(json.dumps({"pid": 999999999, "marker": "serve"}))
    (tmp_path / "serve-1.json").write_text("{not json")
    stopped = stop_services(tmp_path)  # no services.json: only the serves
    assert stopped == {f"serve-{proc.pid}": True, "serve-999999999": False}
    proc.wait(timeout=10)
    assert _gone(child) and serve_files(tmp_path) == []


def test_serve_record_is_removed_when_serve_ends(tmp_path):
    from flows.services import serve_record

    with serve_record(tmp_path, "http://x/api") as rec:
        assert rec == Path(tmp_path) / f"serve-{os.getpid()}.json" and rec.is_file()
    assert not rec.exists()
