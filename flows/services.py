"""The local team services without Docker: a Prefect server (UI + API) and an MLflow tracking server as
background processes on loopback, and the deployments ``kimivl serve`` offers (``flows/cli/services.py`` is
the command line over these functions).

- ``start_services`` starts both servers (each in its own session), waits for their health endpoints and
  writes ``STATE/services.json`` (PIDs, URLs, logs); Prefect's database lives under ``STATE/prefect`` and
  MLflow's (sqlite + artifacts) under ``STATE/mlflow``;
- ``stop_services`` stops exactly the processes recorded there (their whole process group: SIGTERM, then
  SIGKILL after a grace period);
- ``build_deployments``: the pipeline, stage and data flows as deployments with validated parameter forms.

The team stack (Postgres, S3, MLflow, Prefect, a worker) is ``docker-compose.yml``; this is its
single-machine counterpart.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STATE_FILE = "services.json"
DEPLOYMENT_NAME = "serve"


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
        raise OSError(f"{name}: command not found (install the project's dependencies)")
    return str(found)


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def host_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's or taskset's share of the host)."""
    from tasks.train.threads import usable_cpus

    return usable_cpus()


def run_thread_env(limit: int, environ: dict[str, str] | None = None, cpus: int | None = None) -> dict:
    """Thread counts for each of ``limit`` flow runs at once on this host: CPUs // limit, at least 1, so
    concurrent runs do not spin threads against each other (two runs with a thread per CPU each on 2 cores
    took 12x longer). A variable already set in ``environ`` is kept."""
    environ = os.environ if environ is None else environ
    n = str(max(1, (cpus or host_cpus()) // max(1, limit)))
    return {k: environ.get(k) or n for k in THREAD_VARS}


def read_state(state_dir: Path) -> dict[str, Any] | None:
    p = Path(state_dir) / STATE_FILE
    return json.loads(p.read_text()) if p.is_file() else None


def alive(pid: int, marker: str) -> bool:
    """True when ``pid`` runs and is still the process we started (its command line names ``marker``)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return marker in cmdline


def stop_process_group(pid: int, marker: str, grace: float = 15.0) -> bool:
    """SIGTERM the process group led by ``pid`` (started with a new session), SIGKILL after ``grace`` s."""
    if not alive(pid, marker):
        return False
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not alive(pid, marker):  # a zombie child has an empty command line: not alive
                _reap(pid)
                return True
            time.sleep(0.2)
    return not alive(pid, marker)


def stop_tree(pid: int, grace: float = 15.0) -> bool:
    """Stop a process and every process under it, wherever their sessions are (torchrun starts each rank
    in its own; Prefect's runner starts each flow run as a child): SIGTERM to the root first (it may stop
    its children cleanly), after ``grace / 2`` s SIGTERM to whatever of the tree is still alive, after
    ``grace`` s SIGKILL. Returns False when ``pid`` was not running."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    with contextlib.suppress(psutil.NoSuchProcess):
        root.terminate()
    _, alive_procs = psutil.wait_procs([root], timeout=grace / 2)
    for p in [*alive_procs, *tree[1:]]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, left = psutil.wait_procs(tree, timeout=grace / 2)
    for p in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(left, timeout=10)  # psutil reaps a child of ours, so no zombie stays
    return True


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
    """Stop what ``up`` and ``serve`` recorded (only those): every ``kimivl serve`` first (and the flow
    runs it started), while the servers it talks to are still up, then the servers; remove the state
    files. Returns name -> was running (``serve-PID`` for each serve process)."""
    stopped = stop_serves(state_dir)
    state = read_state(state_dir)
    if state is None:
        return stopped
    for name, s in state["services"].items():
        stopped[name] = stop_process_group(int(s["pid"]), s.get("marker", name))
    (Path(state_dir) / STATE_FILE).unlink(missing_ok=True)
    return stopped


# ---------------------------------------------------------------------------------------------- serve

SERVE_MARKER = "serve"


def serve_files(state_dir: Path) -> list[Path]:
    return sorted(Path(state_dir).glob("serve-*.json"))


@contextlib.contextmanager
def serve_record(state_dir: Path, api_url: str) -> Iterator[Path]:
    """``STATE/serve-PID.json`` while this ``kimivl serve`` runs, so ``down`` can stop it (and its flow
    runs) before the servers: a serve left without its server logs connection errors forever."""
    path = Path(state_dir) / f"serve-{os.getpid()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"pid": os.getpid(), "marker": SERVE_MARKER, "api_url": api_url, "started": time.time()}
    path.write_text(json.dumps(rec) + "\n")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def stop_serves(state_dir: Path, grace: float = 30.0) -> dict[str, bool]:
    """Stop every recorded ``kimivl serve`` still running (its process tree). name -> was running."""
    stopped = {}
    for f in serve_files(state_dir):
        try:
            rec = json.loads(f.read_text())
            pid = int(rec["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            f.unlink(missing_ok=True)  # unreadable: nothing we can safely signal
            continue
        running = alive(pid, rec.get("marker", SERVE_MARKER))
        stopped[f"serve-{pid}"] = stop_tree(pid, grace) if running else False
        f.unlink(missing_ok=True)
    return stopped


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
