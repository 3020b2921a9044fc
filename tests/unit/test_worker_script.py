"""docker/prefect/worker.sh (the compose stack's worker) run with a stand-in ``prefect`` on PATH that records
its calls: the pool gets Prefect's own concurrency limit, the worker ``--limit``, and the flow runs it starts
inherit CPUs // limit threads; a bad limit stops it before any call."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAKE = """#!/bin/sh
echo "$* | OMP=${OMP_NUM_THREADS:-} MKL=${MKL_NUM_THREADS:-}" >> "$CALLS"
case "$1 $2" in "work-pool inspect") exit 1 ;; esac
exit 0
"""


def _run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "prefect").write_text(FAKE)
    (bin_dir / "prefect").chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    full = {**base, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls),
            "KIMIVL_APP_DIR": str(tmp_path), **env}  # fmt: skip
    proc = subprocess.run(
        ["sh", str(ROOT / "docker" / "prefect" / "worker.sh")], env=full, capture_output=True, text=True
    )
    return proc, calls.read_text().splitlines() if calls.is_file() else []


def test_limit_and_threads_reach_pool_worker_and_runs(tmp_path):
    cpus = len(os.sched_getaffinity(0))
    proc, calls = _run(tmp_path, KIMIVL_WORKER_LIMIT="2", PREFECT_DEPLOYMENTS="stage")
    assert proc.returncode == 0, proc.stderr
    n = max(1, cpus // 2)
    env = f"OMP={n} MKL={n}"
    assert calls[0].startswith("work-pool inspect kimivl-process |")
    assert calls[1] == f"work-pool create kimivl-process --type process | {env}"
    assert calls[2] == f"work-pool set-concurrency-limit kimivl-process 2 | {env}"
    assert calls[3] == f"--no-prompt deploy -n stage | {env}"
    assert calls[4].startswith(
        "worker start --pool kimivl-process --type process --limit 2 --with-healthcheck"
    )
    assert calls[4].endswith(f"| {env}")


def test_threads_set_by_the_user_are_kept(tmp_path):
    proc, calls = _run(tmp_path, OMP_NUM_THREADS="7")
    assert proc.returncode == 0, proc.stderr
    assert "--limit 1 " in calls[-1] and "OMP=7 MKL=" in calls[-1]


@pytest.mark.parametrize("bad", ["0", "x", "-1", ""])
def test_bad_limit_stops_before_any_call(tmp_path, bad):
    proc, calls = _run(tmp_path, KIMIVL_WORKER_LIMIT=bad)
    if bad == "":  # empty means unset in ${VAR:-1}: the default
        assert proc.returncode == 0 and "--limit 1 " in calls[-1]
        return
    assert proc.returncode == 2 and calls == []
    assert f"KIMIVL_WORKER_LIMIT={bad}: expected a whole number >= 1" in proc.stderr
