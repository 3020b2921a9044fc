"""``kimivl up`` / ``kimivl down`` / ``kimivl serve``: the local team services and UI-triggered runs.

- ``up`` starts a Prefect server (UI + API) and an MLflow tracking server as background processes on
  loopback ports, waits for their health endpoints, prints URLs and PIDs and writes ``STATE/services.json``.
  Prefect's database lives under ``STATE/prefect`` and MLflow's (sqlite + artifacts) under ``STATE/mlflow``.
- ``down`` stops exactly the processes that ``up`` recorded (each started in its own session, so its
  whole process group is signalled: SIGTERM, then SIGKILL after a grace period).
- ``serve`` registers deployments of the pipeline, stage and data flows with a Prefect server and runs
  them when triggered from the UI or API (``prefect.serve``; blocks until Ctrl-C / SIGTERM).

The team stack (Postgres, S3, MLflow, Prefect, a worker) is ``docker-compose.yml``; this is its
single-machine counterpart without Docker.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)
STATE_FILE = "services.json"
STATE_DIR = typer.Option(Path("runs/services"), "--state-dir", help="where up keeps databases, logs, state")
DEPLOYMENT_NAME = "serve"


def _fail(msg: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(code)


# ---------------------------------------------------------------------------------------------- helpers


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (OSError, ValueError):
        return False


def _tool(name: str) -> str:
    """A console script of this environment (next to the interpreter), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if found is None:
        _fail(f"{name}: command not found (install the project's dependencies)")
    return str(found)


def read_state(state_dir: Path) -> dict[str, Any] | None:
    p = Path(state_dir) / STATE_FILE
    return json.loads(p.read_text()) if p.is_file() else None


def _alive(pid: int, marker: str) -> bool:
    """True when ``pid`` runs and is still the process we started (its command line names ``marker``)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return marker in cmdline


def stop_process_group(pid: int, marker: str, grace: float = 15.0) -> bool:
    """SIGTERM the process group led by ``pid`` (started with a new session), SIGKILL after ``grace`` s."""
    if not _alive(pid, marker):
        return False
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid, marker):  # a zombie child has an empty command line: not alive
                _reap(pid)
                return True
            time.sleep(0.2)
    return not _alive(pid, marker)


def _reap(pid: int) -> None:
    """Collect the exit status when ``pid`` is our child (up and down in one process), so no zombie stays."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


# ---------------------------------------------------------------------------------------------- up / down


def _service_commands(state_dir: Path, prefect_port: int, mlflow_port: int, artifacts: str) -> dict:
    prefect_url = f"http://127.0.0.1:{prefect_port}"
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    prefect_env = {
        **env,
        "PREFECT_HOME": str(state_dir / "prefect"),
        "PREFECT_API_URL": f"{prefect_url}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    mlflow_env = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    s3_endpoint = env.get("KIMIVL_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL")
    if artifacts.startswith("s3://") and s3_endpoint:  # an S3-compatible store (SeaweedFS, MinIO)
        mlflow_env.setdefault("MLFLOW_S3_ENDPOINT_URL", s3_endpoint)
    (state_dir / "mlflow").mkdir(parents=True, exist_ok=True)
    mlflow_cmd = [
        _tool("mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{(state_dir / 'mlflow' / 'mlflow.db').resolve()}",
        "--artifacts-destination", artifacts,
    ]  # fmt: skip
    return {
        "prefect": {
            "cmd": [_tool("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            "env": prefect_env,
            "url": prefect_url,
            "health": f"{prefect_url}/api/health",
            "extra": {"api_url": f"{prefect_url}/api"},
            "marker": "prefect",
        },
        "mlflow": {
            "cmd": mlflow_cmd,
            "env": mlflow_env,
            "url": mlflow_url,
            "health": f"{mlflow_url}/health",
            "extra": {"tracking_uri": mlflow_url},
            "marker": "mlflow",
        },
    }


def start_services(
    state_dir: Path, prefect_port: int = 4200, mlflow_port: int = 5000, artifacts: str | None = None,
    timeout: float = 120.0,
) -> dict[str, Any]:  # fmt: skip
    """Start both servers, wait for their health endpoints, write and return the state.

    Raises ``RuntimeError`` (after stopping whatever started) when one exits or is not healthy in time.
    """
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    ports = {"prefect": prefect_port or free_port(), "mlflow": mlflow_port or free_port()}
    for name, port in ports.items():
        if port_in_use(port):
            raise OSError(f"--{name}-port {port}: 127.0.0.1:{port} is already in use")
    artifacts = artifacts or str((state_dir / "mlflow" / "artifacts").resolve())
    specs = _service_commands(state_dir, ports["prefect"], ports["mlflow"], artifacts)
    procs: dict[str, subprocess.Popen] = {}
    state: dict[str, Any] = {"state_dir": str(state_dir), "started": time.time(), "services": {}}
    for name, spec in specs.items():
        log = state_dir / f"{name}.log"
        with open(log, "ab") as f:
            procs[name] = subprocess.Popen(
                spec["cmd"], env=spec["env"], stdout=f, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, cwd=state_dir,
            )  # fmt: skip
        state["services"][name] = {
            "pid": procs[name].pid, "url": spec["url"], "health": spec["health"], "port": ports[name],
            "log": str(log), "marker": spec["marker"], **spec["extra"],
        }  # fmt: skip
    (state_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    deadline = time.monotonic() + timeout
    pending = set(specs)
    while pending:
        for name in sorted(pending):
            if procs[name].poll() is not None:
                stop_services(state_dir)
                tail = Path(state["services"][name]["log"]).read_text(errors="replace")[-1500:]
                raise RuntimeError(f"{name} server exited with code {procs[name].returncode}:\n{tail}")
            if healthy(specs[name]["health"]):
                pending.discard(name)
        if pending and time.monotonic() > deadline:
            stop_services(state_dir)
            raise RuntimeError(f"{sorted(pending)} not healthy after {timeout:.0f} s (logs in {state_dir})")
        if pending:
            time.sleep(0.3)
    return state


def stop_services(state_dir: Path) -> dict[str, bool]:
    """Stop every process recorded in the state file (only those); remove the file. name -> was running."""
    state = read_state(state_dir)
    if state is None:
        return {}
    stopped = {
        name: stop_process_group(int(s["pid"]), s.get("marker", name))
        for name, s in state["services"].items()
    }
    (Path(state_dir) / STATE_FILE).unlink(missing_ok=True)
    return stopped


def up_cmd(
    state_dir: Path = STATE_DIR,
    prefect_port: int = typer.Option(4200, "--prefect-port", min=0, help="0 picks a free port"),
    mlflow_port: int = typer.Option(5000, "--mlflow-port", min=0, help="0 picks a free port"),
    artifacts: str | None = typer.Option(
        None,
        "--artifacts-destination",
        help="MLflow artifact root (default STATE/mlflow/artifacts; or s3://...)",
    ),
    timeout: float = typer.Option(120.0, "--timeout", min=1, help="seconds to wait for health"),
) -> None:
    """Start a local Prefect server (UI + API) and an MLflow server in the background."""
    old = read_state(state_dir)
    if old and any(_alive(int(s["pid"]), s.get("marker", n)) for n, s in old["services"].items()):
        _fail(f"services already running (state in {Path(state_dir) / STATE_FILE}): run `kimivl down` first")
    try:
        state = start_services(state_dir, prefect_port, mlflow_port, artifacts, timeout)
    except OSError as e:
        _fail(str(e))
    except RuntimeError as e:
        _fail(str(e), code=1)
    t = Table(title="kimivl services")
    for c in ("service", "url", "pid", "log"):
        t.add_column(c)
    for name, s in state["services"].items():
        t.add_row(name, s["url"], str(s["pid"]), s["log"])
    console.print(t)
    svc = state["services"]
    console.print(
        f"export PREFECT_API_URL={svc['prefect']['api_url']} MLFLOW_TRACKING_URI={svc['mlflow']['tracking_uri']}"
    )
    sys.stdout.write(json.dumps(state, sort_keys=True) + "\n")


def down_cmd(state_dir: Path = STATE_DIR) -> None:
    """Stop the services that `kimivl up` started (recorded in STATE/services.json)."""
    stopped = stop_services(state_dir)
    if not stopped:
        console.print(f"nothing to stop (no {Path(state_dir) / STATE_FILE})")
    for name, was_running in stopped.items():
        console.print(f"{name}: {'stopped' if was_running else 'was not running'}")
    sys.stdout.write(json.dumps({"stopped": stopped}, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------- serve


def build_deployments(recipe: str, out: str, stage: str = "text_pretrain") -> list[Any]:
    """Deployments of the pipeline, stage and data flows, defaulting to ``recipe`` and ``out``."""
    from flows.data_flow import DataParams, data_flow
    from flows.pipeline import PipelineParams, pipeline_flow
    from flows.stage_flow import StageParams, stage_flow

    tags = ["kimivl"]
    return [
        pipeline_flow.to_deployment(
            name=DEPLOYMENT_NAME,
            parameters={"params": PipelineParams(recipe_path=recipe, out_dir=out).model_dump()},
            description="The whole recipe: data -> every phase -> evaluation -> export.",
            tags=tags,
        ),
        stage_flow.to_deployment(
            name=DEPLOYMENT_NAME,
            parameters={"params": StageParams(recipe_path=recipe, out_dir=out, stage=stage).model_dump()},
            description="One stage (all its phases) or one phase, from the previous phase's checkpoint.",
            tags=tags,
        ),
        data_flow.to_deployment(
            name=DEPLOYMENT_NAME,
            parameters={"params": DataParams(recipe_path=recipe, data_dir=f"{out}/data").model_dump()},
            description="Data steps: sources -> filter -> dedup (+QA) -> validate -> tokenizer -> tokenize.",
            tags=tags,
        ),
    ]


def serve_cmd(
    recipe: Path = typer.Option(Path("params.yaml"), "--recipe", "-r", help="default recipe of the forms"),
    out: Path = typer.Option(Path("runs/tiny"), "--out", help="default run directory of the forms"),
    api_url: str | None = typer.Option(
        None, "--api-url", help="Prefect API (default: $PREFECT_API_URL, else the server of `kimivl up`)"
    ),
    limit: int = typer.Option(1, "--limit", min=1, help="flow runs at a time"),
    state_dir: Path = STATE_DIR,
) -> None:
    """Serve the pipeline, stage and data flows so runs start from the Prefect UI (blocks; Ctrl-C stops)."""
    from tasks.recipe import RecipeError, load_recipe

    try:
        load_recipe(recipe)
    except RecipeError as e:
        _fail(str(e))
    state = read_state(state_dir)
    url = api_url or os.environ.get("PREFECT_API_URL")
    if not url and state:
        url = state["services"]["prefect"]["api_url"]
    if not url:
        _fail("no Prefect server: run `kimivl up` first or pass --api-url http://HOST:PORT/api")
    health = url.rstrip("/") + "/health"
    if not healthy(health):
        _fail(f"--api-url {url}: {health} does not answer (is the Prefect server up?)")
    os.environ["PREFECT_API_URL"] = url  # flow-run subprocesses inherit it
    if not os.environ.get("MLFLOW_TRACKING_URI") and state and "mlflow" in state["services"]:
        # flow runs track into the MLflow server that `kimivl up` started (else each run's own SQLite)
        os.environ["MLFLOW_TRACKING_URI"] = state["services"]["mlflow"]["tracking_uri"]
    # isort: off
    from flows import prefect_common  # noqa: F401  (environment defaults before Prefect reads settings)
    from prefect import serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # isort: on

    with temporary_settings(updates={PREFECT_API_URL: url}):
        deployments = build_deployments(str(recipe.resolve()), str(out.resolve()))
        names = [f"{d.flow_name}/{d.name}" for d in deployments]
        for n in names:
            console.print(f"deployment {n}")
        ui = url.rstrip("/").removesuffix("/api")
        console.print(f"serving {len(names)} deployments on {url} (UI: {ui}/deployments); Ctrl-C stops")
        sys.stdout.write(json.dumps({"deployments": names, "api_url": url}) + "\n")
        sys.stdout.flush()
        serve(*deployments, limit=limit, pause_on_shutdown=False, print_starting_message=False)
