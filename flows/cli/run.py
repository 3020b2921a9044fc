"""``kimivl run``: the main job, the whole recipe through the Prefect pipeline flow (data, every phase,
the evaluation points, export), with one console line per finished step and ``OUT/summary.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from flows.cli.common import console, fail, log
from flows.cli.train import check_launch, checked_recipe, fail_for, launch_settings, print_table, run_summary
from tasks.tracking.base import RunTracking


class ConsoleProgress(RunTracking):
    """A run's tracking backend with one rich line per finished step (data, each phase, each evaluation
    point): a running count and the elapsed time; everything is also recorded by the wrapped backend."""

    def __init__(self, inner: RunTracking, total: int) -> None:
        import time

        self.inner, self.total, self.done, self.t0 = inner, total, 0, time.perf_counter()

    @property
    def report(self) -> dict[str, Any] | None:  # type: ignore[override]
        return self.inner.report

    def _line(self, what: str) -> None:
        import time

        self.done += 1
        console.print(
            f"[bold green]✓[/] [{self.done}/{self.total}] {what} [dim]({time.perf_counter() - self.t0:.1f} s)[/]"
        )

    def pipeline(self, recipe: Any, params: dict[str, Any]):  # type: ignore[override]
        return self.inner.pipeline(recipe, params)

    def phase(self, phase: Any, phase_dir: Path):  # type: ignore[override]
        return self.inner.phase(phase, phase_dir)

    def report_done(self, path: Path) -> None:
        self.inner.report_done(path)

    def phase_replaced(self, phase: Any, old_dir: Path) -> None:
        self.inner.phase_replaced(phase, old_dir)

    def data_done(self, summary: dict) -> None:
        self.inner.data_done(summary)
        self._line(f"data: {summary['tokens']['total']:,} tokens")

    def phase_done(self, phase: Any, result: dict) -> dict[str, Any]:
        extra = self.inner.phase_done(phase, result)
        tok = result["tokens"]
        self._line(
            f"phase {phase.name}: {result['steps']} steps, {tok['total']:,} tokens, loss {result['final_loss']:.3f}"
        )
        return extra

    def eval_done(self, point: str, result: dict) -> None:
        self.inner.eval_done(point, result)
        state = "up to date" if result.get("up_to_date") else f"{len(result['summary'])} metrics"
        self._line(f"eval after {point}: {state}")


def run_cmd(
    recipe: Path = typer.Option(Path("params.yaml"), "--recipe", "-r"),
    out: Path = typer.Option(Path("runs/tiny"), "--out", help="run directory (data under OUT/data)"),
    tracking: str = typer.Option("mlflow", "--tracking", help="mlflow | local (metrics.jsonl only)"),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="MLflow URI (default $MLFLOW_TRACKING_URI, else sqlite:///OUT/mlflow.db)"
    ),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="run the recipe's evaluation points"),
    export: bool = typer.Option(True, "--export/--no-export", help="export the final model"),
    artifact_uri: str | None = typer.Option(
        None,
        "--artifact-uri",
        help="s3://bucket/prefix: verified copies of datasets, checkpoints, evals, export",
    ),
    nproc: int = typer.Option(1, "--nproc", min=1, help="training processes per phase (1: in-process)"),
    launcher: str = typer.Option("torchrun", "--launcher", help="torchrun | deepspeed (with --nproc > 1)"),
    hostfile: Path | None = typer.Option(None, "--hostfile", help="multi-node (deepspeed launcher)"),
) -> None:
    """The main job: the whole recipe on this machine: data, every phase, evaluations, export.

    Runs the Prefect pipeline flow (flows/pipeline.py) in Prefect's local (ephemeral) mode, or against a
    server when PREFECT_API_URL is set (e.g. the one `kimivl up` starts: the run then shows in its UI),
    tracked in MLflow (embedded SQLite store under OUT unless a server is named). The recipe is validated
    first (exit 2). Writes OUT/summary.json: per phase tokens by modality, final loss, checkpoint URI and
    MLflow run id.
    """
    import time

    from flows.local_api import start_early

    t0 = time.perf_counter()
    if recipe.is_file():  # (a missing recipe fails below without starting anything)
        start_early()  # Prefect's local server starts while the rest is imported and the recipe checked
    # A recipe that exists but fails validation still started the server: loading the recipe imports the
    # data pipeline (~5 s), exactly the time the server needs; it is stopped when this process exits.
    r = checked_recipe(recipe, None)
    launch = launch_settings(nproc, launcher, hostfile)
    opts = {"tracking": tracking, "tracking_uri": tracking_uri, "evaluate": evaluate, "export": export}
    params = pipeline_params(recipe, out, launch, artifact_uri=artifact_uri, **opts)
    check_launch(launch, r, list(r.phases), recipe)  # every phase's batch split, before any work
    res = run_checked(params, r)
    report(recipe, out, res, time.perf_counter() - t0)


def pipeline_params(recipe: Path, out: Path, launch: Any, **opts: Any) -> Any:
    """The pipeline flow's parameters from the command line (exit 2 naming a bad option)."""
    from pydantic import ValidationError

    from flows.pipeline import PipelineParams

    try:
        return PipelineParams(recipe_path=str(recipe), out_dir=str(out), launch=launch, **opts)
    except ValidationError as e:
        err = e.errors()[0]
        fail(f"--{err['loc'][0]}: {err['msg']}")


def run_checked(params: Any, r: Any) -> dict[str, Any]:
    """The pipeline flow with one console line per finished step; failures exit 2 / 1 with their message."""
    from flows.pipeline import run_pipeline
    from flows.prefect_common import console_logs_to_current_stderr
    from flows.stage_flow import make_tracking
    from tasks.data.io import DatasetError
    from tasks.io.manifest import ManifestError
    from tasks.train.phases import exit_code

    n_points = sum(len(r.eval.points_after(n)) for n in ["init", *(p.name for p in r.phases)])
    steps = 1 + len(r.phases) + (n_points if params.evaluate else 0)
    try:
        with console_logs_to_current_stderr():
            return run_pipeline(params, tracking=ConsoleProgress(make_tracking(params), steps))
    except (DatasetError, ManifestError) as e:
        fail(str(e))
    except Exception as e:
        code = exit_code(e)
        if code is None:
            raise
        fail_for(e, code)


MLFLOW_REPORT = (
    "parent_run_id",
    "tracking_uri",
    "experiment",
    "undelivered",
    "rejected",
    "spool_dir",
    "plots",
)


def report(recipe: Path, out: Path, res: dict[str, Any], seconds: float) -> None:
    """OUT/summary.json, the phase table and where to look next; the summary as JSON on stdout."""
    from tasks.io.files import write_json_atomic

    results = res["results"]
    for x in results:
        if x.get("up_to_date"):
            log(f"[{x['phase']}] already complete: {x['checkpoint']}")
    rep = res.get("tracking") or {}
    extra = {
        "data_tokens": res["data"]["tokens"],
        "eval": res["eval"],
        "eval_report": res["eval_report"],
        "export": res["export"],
        "mlflow": {k: rep.get(k) for k in MLFLOW_REPORT} if rep else None,
    }
    summary = run_summary(recipe, results, extra)
    summary["seconds"] = round(seconds, 1)
    write_json_atomic(summary, out / "summary.json")
    print_table(results)
    if res["eval_report"]:
        console.print(f"evaluation report: {res['eval_report']}")
    if rep:
        console.print(f"MLflow: {rep.get('tracking_uri')} (parent run {rep.get('parent_run_id')})")
    console.print(f"done in {summary['seconds']} s: {out / 'summary.json'}")
    sys.stdout.write(json.dumps(summary, sort_keys=True) + "\n")
