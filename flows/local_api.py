"""Prefect's local mode, started early: the temporary API server of a ``kimivl run`` without a server.

When no ``PREFECT_API_URL`` is configured, Prefect starts a temporary local API server the first time a
flow runs: it imports the server application in the calling process (~5 s on 2 cores), then spawns a
``uvicorn`` subprocess serving it and waits for it (~6 s); only then does the flow begin. ``start_early``
spawns the same server (``uvicorn`` serving ``prefect.server.api.server:create_app`` with the settings
Prefect gives its temporary server: UI off, ephemeral) before the process has imported Prefect at all,
and exports ``PREFECT_API_URL`` for it. The process's own imports, the recipe check and the MLflow store
creation then overlap with the server's start, and the calling process never imports the server
application. Same server, same database (``PREFECT_HOME``), same flow semantics: only the start moves
earlier. The server is stopped when the process exits; on Linux it also dies with its parent (a
``kill -9`` of ``kimivl run`` leaves no server behind).

``start_early`` does nothing (returns None) when Prefect is already imported (its settings are read at
import: an exported URL would not reach them; Prefect then starts its own server as usual) or when an API
URL is configured (environment or the active Prefect profile). This module must not import Prefect.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

# defaults for every Prefect process of this project (flows.prefect_common applies them before Prefect's
# import; explicit environment values win)
ENV_DEFAULTS = {
    # machines without internet: the server's telemetry call would only log errors
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # the ephemeral server takes 10-20 s to start on a busy 2-core machine; Prefect's default gives up at 20
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}
# what Prefect's SubprocessASGIServer sets for its temporary server (the UI is not served)
_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
_PORT_IN_USE = 3  # uvicorn's exit status when it cannot bind

_current: LocalAPI | None = None


class LocalAPIError(RuntimeError):
    """The temporary Prefect server did not come up (the message carries its stderr)."""


class LocalAPI:
    """One temporary Prefect API server subprocess on 127.0.0.1."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.proc: subprocess.Popen | None = None
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115  (lives as long as the server: its errors)
        self.ready = False

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def spawn(self) -> None:
        cmd = [
            sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
            "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd,
            env={**os.environ, **_SERVER_ENV},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    def wait(self, timeout: float = 120.0) -> str:
        """Block until the server answers ``/health``; returns the API URL. Raises ``LocalAPIError``."""
        if self.ready:
            return self.api_url
        assert self.proc is not None, "spawn() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code == _PORT_IN_USE:  # the port was taken between choosing and binding it: another one
                self.port = _free_port()
                os.environ["PREFECT_API_URL"] = self.api_url
                self.spawn()
                continue
            if code is not None:
                raise LocalAPIError(f"the local Prefect server exited with status {code}: {self._errors()}")
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r,
            ):
                if r.status == 200:
                    self.ready = True
                    return self.api_url
            time.sleep(0.1)
        self.stop()
        raise LocalAPIError(
            f"the local Prefect server did not answer within {timeout:.0f} s: {self._errors()}"
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.ready = False

    def _errors(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace").strip()
        return text[-3000:] or "(no output)"


def start_early() -> LocalAPI | None:
    """Spawn the temporary server now and export ``PREFECT_API_URL`` (see the module docstring); None
    when there is nothing to start. Call ``wait_ready()`` before the first flow runs."""
    global _current
    if _current is not None:
        return _current
    if "prefect" in sys.modules or configured_api_url():
        return None
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    api = LocalAPI()
    api.spawn()
    os.environ["PREFECT_API_URL"] = api.api_url
    atexit.register(api.stop)  # registered before Prefect's own exit hooks, so it runs after them
    _current = api
    return api


def wait_ready(timeout: float = 120.0) -> str | None:
    """The URL of the server ``start_early`` started, once it answers; None if none was started."""
    return None if _current is None else _current.wait(timeout)


def configured_api_url() -> str | None:
    """``PREFECT_API_URL`` from the environment or the active Prefect profile (read without Prefect)."""
    if url := os.environ.get("PREFECT_API_URL"):
        return url
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    return (profiles.get("profiles", {}).get(active) or {}).get("PREFECT_API_URL") or None


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
