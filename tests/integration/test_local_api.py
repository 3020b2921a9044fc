"""flows.local_api: the temporary Prefect server that `kimivl run` starts before importing Prefect.

A child process (fresh ``PREFECT_HOME``, no API URL) starts it early, then runs a real flow: the flow run
must be recorded by that server (read back through Prefect's own client), the child must never have
imported Prefect's server application, and the server must be gone when the child exits, also after a
``kill -9`` of the child. The unit-level checks (profile lookup, the error message when the server dies)
need no server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flows import local_api

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import json, os, sys
    from flows.local_api import start_early, wait_ready
    api = start_early()
    assert api is not None and os.environ["PREFECT_API_URL"] == api.api_url
    print(json.dumps({"pid": api.proc.pid, "url": api.api_url}), flush=True)
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), 9)
    from prefect import flow, get_client
    url = wait_ready()

    @flow(name="local-api-probe")
    def probe(x: int) -> int:
        return x + 1

    assert probe(41) == 42
    with get_client(sync_client=True) as c:
        runs = [r for r in c.read_flow_runs() if r.state and r.state.is_completed()]
        names = {c.read_flow(r.flow_id).name for r in runs}
    print(json.dumps({"url": url, "names": sorted(names),
                      "server_app_imported": "prefect.server.api.server" in sys.modules}), flush=True)
    """
)


def _child(mode: str, tmp_path: Path, script: str = CHILD) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter: no Prefect settings inherited, its own PREFECT_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=str(ROOT), PREFECT_LOGGING_LEVEL="WARNING")
    cmd = [sys.executable, "-c", script, mode]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _gone(pid: int, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie (exited, not yet reaped by init) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ")[-1].startswith("Z"):
                return True
        time.sleep(0.2)
    return False


@pytest.mark.integration
def test_a_flow_runs_on_the_early_server_and_the_server_stops_with_the_process(tmp_path):
    p = _child("run", tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    started, done = (json.loads(line) for line in p.stdout.strip().splitlines()[-2:])
    assert done["url"] == started["url"] and done["url"].startswith("http://127.0.0.1:")
    assert done["names"] == ["local-api-probe"]  # recorded by this server (a fresh database)
    assert done["server_app_imported"] is False  # the caller never paid for the server's import
    assert _gone(started["pid"])


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_the_server_dies_with_a_killed_parent(tmp_path):
    p = _child("kill", tmp_path)
    assert p.returncode == -signal.SIGKILL
    started = json.loads(p.stdout.strip().splitlines()[0])
    assert _gone(started["pid"])


FALLBACK_CHILD = textwrap.dedent(
    """
    import json, os
    from flows import prefect_common as pc

    def servers():  # this process's children that serve Prefect's API
        out = []
        for d in os.listdir("/proc"):
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(") ", 1)[1].split()[1])
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read()
            except (OSError, ValueError, IndexError):
                continue
            if ppid == os.getpid() and b"prefect.server.api.server" in cmd:
                out.append(int(d))
        return out

    url = pc.start_local_server()
    before = servers()
    from prefect import flow, get_client

    @flow(name="fallback-probe")
    def probe(x: int) -> int:
        return x + 1

    assert probe(1) == 2 and probe(2) == 3
    with get_client(sync_client=True) as c:
        api = str(c.api_url)
        n = len([r for r in c.read_flow_runs() if r.state and r.state.is_completed()])
    print(json.dumps({"url": url, "client_url": api, "before": before, "after": servers(), "runs": n}))
    """
)


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_without_the_early_server_the_fallback_starts_the_one_server_the_flows_use(tmp_path):
    """``prefect_common.start_local_server`` (library callers of ``run_pipeline``: no ``start_early``)
    starts Prefect's own temporary server ahead of the flow; the flow runs must reuse it, not start a
    second one."""
    p = _child("run", tmp_path, FALLBACK_CHILD)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["url"] and got["url"].startswith("http://127.0.0.1:")
    assert len(got["before"]) == 1 and got["after"] == got["before"]  # one server, still the same process
    assert got["client_url"].rstrip("/") == got["url"].rstrip("/")
    assert got["runs"] == 2  # both flow runs recorded by that server's (fresh) database


def test_nothing_is_started_once_prefect_is_imported_or_a_server_is_configured(monkeypatch, tmp_path):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.delenv("PREFECT_PROFILES_PATH", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.setattr(local_api, "_current", None)
    monkeypatch.setitem(sys.modules, "prefect", sys.modules.get("prefect") or object())
    assert local_api.start_early() is None and local_api.wait_ready() is None
    assert local_api.configured_api_url() is None
    (tmp_path / "profiles.toml").write_text(
        'active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://prefect.internal:4200/api"\n'
    )
    assert local_api.configured_api_url() == "http://prefect.internal:4200/api"
    monkeypatch.setenv("PREFECT_PROFILE", "ephemeral")
    assert local_api.configured_api_url() is None
    monkeypatch.setenv("PREFECT_API_URL", "http://other:4200/api")
    assert local_api.configured_api_url() == "http://other:4200/api"


def test_a_server_that_dies_reports_its_status_and_stderr():
    api = local_api.LocalAPI()
    script = "import sys; sys.stderr.write('database is locked'); sys.exit(7)"
    api.proc = subprocess.Popen([sys.executable, "-c", script], stderr=api._stderr)
    with pytest.raises(local_api.LocalAPIError, match=r"exited with status 7: database is locked"):
        api.wait(timeout=30)
