"""``kimivl compare RUN_A RUN_B``: the recipe diff and the per-phase metric diff of two tracked runs."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table


def _fmt(v: float | str | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def compare_cmd(
    run_a: str = typer.Argument(..., help="MLflow run id (a pipeline's parent run, or any run)"),
    run_b: str = typer.Argument(..., help="MLflow run id to compare against"),
    tracking_uri: str = typer.Option(
        "sqlite:///mlflow.db",
        "--tracking-uri",
        envvar="MLFLOW_TRACKING_URI",
        help="MLflow tracking URI (a run directory's store: sqlite:///OUT/mlflow.db)",
    ),
) -> None:
    """Print the params that differ (the recipe diff) and each phase's final metric values (a - b)."""
    from tasks.tracking.mlflow_after import compare_runs
    from tasks.tracking.secrets import scrub

    err = Console(stderr=True)
    try:
        d = compare_runs(tracking_uri, run_a, run_b)
    except Exception as e:  # unknown run id, unreachable store
        err.print(f"[bold red]error:[/] {scrub(str(e))[:500]}")
        raise typer.Exit(2) from None
    out = Console(width=200)
    t = Table(title=f"recipe diff: a = {d['run_a']} ({run_a}), b = {d['run_b']} ({run_b})")
    for c in ("param", "a", "b"):
        t.add_column(c, overflow="fold")
    for k, a, b in d["params"]:
        t.add_row(k, _fmt(a), _fmt(b))
    out.print(t if d["params"] else "recipe diff: no param differs")
    m = Table(title="metric diff (final values)")
    for c in ("phase", "metric", "a", "b", "a - b"):
        m.add_column(c, justify="left" if c in ("phase", "metric") else "right")
    for phase, k, a, b, diff in d["metrics"]:
        m.add_row(phase, k, _fmt(a), _fmt(b), _fmt(diff))
    out.print(m)
