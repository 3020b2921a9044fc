"""``kimivl up`` / ``kimivl down`` / ``kimivl serve``: the local team services and UI-triggered runs.

- ``up`` starts a Prefect server (UI + API) and an MLflow tracking server as background processes on
  loopback ports, waits for their health endpoints, prints URLs and PIDs and writes ``STATE/services.json``.
  Prefect's database lives under ``STATE/prefect`` and MLflow's (sqlite + artifacts) under ``STATE/mlflow``.
- ``down`` stops every ``kimivl serve`` recorded in STATE first (with the flow runs it started), then
  exactly the processes that ``up`` recorded (each started in its own session, so its whole process group
  is signalled: SIGTERM, then SIGKILL after a grace period).
- ``serve`` registers deployments of the pipeline, stage and data flows with a Prefect server and runs
  them when triggered from the UI or API (``prefect.serve``; blocks until Ctrl-C / SIGTERM / ``down``).
  At most ``--limit`` flow runs at a time (Prefect's runner limit; more wait in the queue as Late/Pending),
  each with CPUs // limit threads (``OMP_NUM_THREADS``/``MKL_NUM_THREADS``, unless already set): runs
  that share a host never oversubscribe its cores.

The team stack (Postgres, S3, MLflow, Prefect, a worker) is ``docker-compose.yml``; this is its
single-machine counterpart without Docker.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
from rich.table import Table

from flows.cli.common import console, fail
from flows.services import (
    STATE_FILE,
    alive,
    build_deployments,
    healthy,
    host_cpus,
    read_state,
    run_thread_env,
    serve_record,
    start_services,
    stop_services,
)

STATE_DIR = typer.Option(Path("runs/services"), "--state-dir", help="where up keeps databases, logs, state")


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
    if old and any(alive(int(s["pid"]), s.get("marker", n)) for n, s in old["services"].items()):
        fail(f"services already running (state in {Path(state_dir) / STATE_FILE}): run `kimivl down` first")
    try:
        state = start_services(state_dir, prefect_port, mlflow_port, artifacts, timeout)
    except OSError as e:
        fail(str(e))
    except RuntimeError as e:
        fail(str(e), code=1)
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
        console.print(f"nothing to stop (no {Path(state_dir) / STATE_FILE}, no serve-*.json)")
    for name, was_running in stopped.items():
        console.print(f"{name}: {'stopped' if was_running else 'was not running'}")
    sys.stdout.write(json.dumps({"stopped": stopped}, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------- serve


def serve_cmd(
    recipe: Path = typer.Option(Path("params.yaml"), "--recipe", "-r", help="default recipe of the forms"),
    out: Path = typer.Option(Path("runs/tiny"), "--out", help="default run directory of the forms"),
    api_url: str | None = typer.Option(
        None, "--api-url", help="Prefect API (default: $PREFECT_API_URL, else the server of `kimivl up`)"
    ),
    limit: int = typer.Option(
        1, "--limit", min=1, help="flow runs at a time; each gets CPUs // limit threads (OMP_NUM_THREADS)"
    ),
    state_dir: Path = STATE_DIR,
) -> None:
    """Serve the pipeline, stage and data flows so runs start from the Prefect UI (blocks; Ctrl-C stops)."""
    from tasks.recipe import RecipeError, load_recipe

    try:
        load_recipe(recipe)
    except RecipeError as e:
        fail(str(e))
    state = read_state(state_dir)
    url = api_url or os.environ.get("PREFECT_API_URL")
    if not url and state:
        url = state["services"]["prefect"]["api_url"]
    if not url:
        fail("no Prefect server: run `kimivl up` first or pass --api-url http://HOST:PORT/api")
    health = url.rstrip("/") + "/health"
    if not healthy(health):
        fail(f"--api-url {url}: {health} does not answer (is the Prefect server up?)")
    os.environ["PREFECT_API_URL"] = url  # flow-run subprocesses inherit it
    threads = run_thread_env(limit)
    os.environ.update(threads)
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
        console.print(f"serving {len(names)} deployments on {url} (UI: {ui}/deployments)")
        console.print(
            f"at most {limit} flow run(s) at a time, each with "
            + " ".join(f"{k}={v}" for k, v in threads.items())
            + f" ({host_cpus()} CPUs); Ctrl-C or `kimivl down --state-dir {state_dir}` stops"
        )
        with serve_record(state_dir, url) as record:
            sys.stdout.write(
                json.dumps({"deployments": names, "api_url": url, "threads": threads, "record": str(record)})
                + "\n"
            )
            sys.stdout.flush()
            serve(*deployments, limit=limit, pause_on_shutdown=False, print_starting_message=False)
