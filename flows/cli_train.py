"""``kimivl stage`` and ``kimivl train``: run recipe phases through the generic stage runner.

Single process by default (in-process DeepSpeed rank, the embedded default). ``--nproc N`` relaunches the
same command under ``torchrun`` or the ``deepspeed`` launcher (``--hostfile`` for multi-node); each rank
then runs the identical command with ``--worker`` set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)


def _recipe(path: Path):
    from tasks.recipe import RecipeError, load_recipe

    try:
        return load_recipe(path)
    except RecipeError as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None


def _launch_settings(nproc: int, launcher: str, hostfile: Path | None):
    """The CLI's --nproc/--launcher/--hostfile as the flows' ``LaunchSettings`` (exit 2 if malformed)."""
    from pydantic import ValidationError

    from flows.launch_settings import LaunchSettings

    try:
        return LaunchSettings(nproc=nproc, launcher=launcher, hostfile=str(hostfile) if hostfile else None)
    except ValidationError as e:
        err = e.errors()[0]
        console.print(f"[bold red]error:[/] --{err['loc'][0]}: {err['msg']}")
        raise typer.Exit(2) from None


def _check_launch(launch, r, phases: list, recipe_path: Path) -> None:
    """Exit 2 naming the flag or the recipe field if ``phases`` cannot run on ``launch``'s processes."""
    from flows.launch_settings import LaunchError
    from tasks.train.memory import MemoryPlanError

    try:
        launch.check(r, phases)
    except LaunchError as e:
        where = f"{recipe_path}: {e}" if e.in_recipe else f"--{e.field}: {e.message}"
        console.print(f"[bold red]error:[/] {where}")
        raise typer.Exit(2) from None
    except MemoryPlanError as e:
        console.print(f"[bold red]error:[/] {recipe_path}: {e}")
        raise typer.Exit(2) from None


def _relaunch(
    argv: list[str],
    launch,
    recipe_path: Path,
    phases_sel,
    data: Path,
) -> None:
    """Check what every rank would check (recipe, init checkpoint, data, the phases' batch split over the
    world size) once here, then relaunch under the launcher: a bad setting is one exit-2 message, not a
    traceback per rank after the processes and their process group came up."""
    from flows.launch_settings import launcher_env

    r = _preflight(recipe_path, data)
    _check_launch(launch, r, phases_sel(r), recipe_path)
    cmd = launch.command(argv)
    console.print(f"launching: {' '.join(cmd)}")
    # the launcher assigns ranks and the rendezvous address: never inherit a parent's single-rank settings
    raise typer.Exit(subprocess.call(cmd, env=launcher_env()))


def _check_init(r, recipe_path: Path):
    from tasks.data.pipeline import relative_note

    init = r.model.init_checkpoint
    if init is not None and not (Path(init) / "model.safetensors").is_file():
        console.print(
            f"[bold red]error:[/] {recipe_path}: field model.init_checkpoint: {init} holds no model.safetensors"
            + relative_note(Path(init))
        )
        raise typer.Exit(2)
    return r


def _preflight(recipe_path: Path, data: Path):
    r = _check_init(_recipe(recipe_path), recipe_path)
    if not (data / "tokenized").is_dir():
        console.print(
            f"[bold red]error:[/] {data / 'tokenized'}: no tokenized data (run `kimivl data all` first)"
        )
        raise typer.Exit(2)
    return r


def _run(
    recipe_path: Path, phases_sel: list, data: Path, out: Path, tracking_dir: Path | None = None
) -> list[dict]:
    from tasks.tracking.local import JsonlTracker
    from tasks.train.checkpoint import CheckpointError, DivergenceError
    from tasks.train.memory import MemoryPlanError
    from tasks.train.phase_lock import PhaseBusyError
    from tasks.train.runner import MissingParentError, run_phase

    r = _preflight(recipe_path, data)
    # progress lines once, from rank 0 (every rank logs the same steps); errors below print on any rank
    log = console.print if int(os.environ.get("RANK", "0")) == 0 else (lambda *a, **k: None)
    results = []
    for p in phases_sel(r):
        try:
            # (a flow that launched this run relays rank 0's JSONL records from tracking_dir to its tracker)
            tracker = JsonlTracker(tracking_dir / p.name) if tracking_dir is not None else None
            results.append(run_phase(r, p, data, out, tracker=tracker, log=log))
        except (MissingParentError, FileNotFoundError, PhaseBusyError, MemoryPlanError) as e:
            console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from None
        except (DivergenceError, CheckpointError) as e:
            console.print(f"[bold red]training stopped:[/] {e}")
            raise typer.Exit(1) from None
        except OSError as e:  # a full disk, an unwritable --out
            console.print(f"[bold red]error:[/] cannot write: {e}")
            raise typer.Exit(1) from None
    return results


def _table(results: list[dict]) -> None:
    from tasks.train.stages import token_mix

    t = Table(title="phases")
    for c in ("phase", "steps", "text", "image", "video", "first loss", "final loss"):
        t.add_column(c, justify="right" if c != "phase" else "left")
    for r in results:
        tok = r["tokens"]
        t.add_row(
            r["phase"], str(r["steps"]), f"{tok['text']:,}", f"{tok['image']:,}", f"{tok['video']:,}",
            f"{r['first_loss']:.3f}", f"{r['final_loss']:.3f}",
        )  # fmt: skip
    console.print(t)
    mixed = [r for r in results if len(r.get("tokens_by_group") or {}) > 1]
    if mixed:  # its own table: an 80-column console has no room for it in the one above
        m = Table(title="token mix by mixture group")
        m.add_column("phase", no_wrap=True)
        m.add_column("share of the phase's tokens")
        for r in mixed:
            m.add_row(r["phase"], token_mix(r["tokens_by_group"]))
        console.print(m)


def stage_cmd(
    name: str = typer.Argument(..., help="stage (e.g. long_context: all its phases) or one phase (sft.2)"),
    recipe: Path = typer.Option(Path("params.yaml"), "--recipe", "-r"),
    data: Path = typer.Option(Path("data"), "--data", help="data root (output of `kimivl data all`)"),
    out: Path = typer.Option(Path("runs/tiny"), "--out", help="run directory"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="data-parallel processes per node"),
    launcher: str = typer.Option("torchrun", "--launcher", help="torchrun | deepspeed"),
    hostfile: Path | None = typer.Option(None, "--hostfile", help="multi-node (deepspeed launcher)"),
    worker: bool = typer.Option(False, "--worker", hidden=True),
    tracking_dir: Path | None = typer.Option(None, "--tracking-dir", hidden=True),
    local_rank: int | None = typer.Option(None, "--local_rank", hidden=True),
) -> None:
    """Run one stage (all its phases) or one phase; it starts from the previous phase's final checkpoint."""
    from tasks.recipe import RecipeError

    def select(r):
        try:
            return [r.phase(name)] if name in {p.name for p in r.phases} else r.stage_phases(name)
        except RecipeError as e:
            console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from None

    if (nproc > 1 or hostfile is not None) and not worker:
        _relaunch(
            ["stage", name, "--recipe", str(recipe), "--data", str(data), "--out", str(out)],
            _launch_settings(nproc, launcher, hostfile),
            recipe,
            select,
            data,
        )

    results = _run(recipe, select, data, out, tracking_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        _table(results)
        sys.stdout.write(json.dumps(results, sort_keys=True) + "\n")


def train_cmd(
    recipe: Path = typer.Option(Path("params.yaml"), "--recipe", "-r"),
    data: Path = typer.Option(Path("data"), "--data"),
    out: Path = typer.Option(Path("runs/tiny"), "--out"),
    nproc: int = typer.Option(1, "--nproc", min=1),
    launcher: str = typer.Option("torchrun", "--launcher"),
    hostfile: Path | None = typer.Option(None, "--hostfile"),
    worker: bool = typer.Option(False, "--worker", hidden=True),
    local_rank: int | None = typer.Option(None, "--local_rank", hidden=True),
) -> None:
    """Run every phase of the recipe in order; writes OUT/summary.json."""
    from tasks.io.weights import write_json_atomic

    if (nproc > 1 or hostfile is not None) and not worker:
        _relaunch(
            ["train", "--recipe", str(recipe), "--data", str(data), "--out", str(out)],
            _launch_settings(nproc, launcher, hostfile),
            recipe,
            lambda r: list(r.phases),
            data,
        )
    results = _run(recipe, lambda r: list(r.phases), data, out)
    if int(os.environ.get("RANK", "0")) == 0:
        summary = _summary(recipe, results)
        write_json_atomic(summary, out / "summary.json")
        _table(results)
        sys.stdout.write(json.dumps(summary, sort_keys=True) + "\n")


def _summary(recipe: Path, results: list[dict], extra: dict | None = None) -> dict:
    keys = (
        "stage",
        "tokens",
        "tokens_by_source",
        "tokens_by_group",
        "steps",
        "final_loss",
        "checkpoint",
        "skipped_steps",
    )
    return {
        "recipe": str(recipe),
        **(extra or {}),
        "phase_order": [r["phase"] for r in results],
        "phases": {
            r["phase"]: {
                **{k: r.get(k) for k in keys},
                "checkpoint_uri": r.get("published") or Path(r["checkpoint"]).resolve().as_uri(),
                "mlflow_run_id": r.get("mlflow_run_id"),
            }
            for r in results
        },
    }


class ConsoleProgress:
    """Wraps a flow tracking backend: one rich line per finished step (data, each phase, each evaluation
    point) with a running count and elapsed time; every other call goes to the wrapped backend."""

    def __init__(self, inner, total: int) -> None:
        import time

        self.inner, self.total, self.done, self.t0 = inner, total, 0, time.perf_counter()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _line(self, what: str) -> None:
        import time

        self.done += 1
        console.print(
            f"[bold green]✓[/] [{self.done}/{self.total}] {what} [dim]({time.perf_counter() - self.t0:.1f} s)[/]"
        )

    def data_done(self, summary: dict) -> None:
        if hasattr(self.inner, "data_done"):
            self.inner.data_done(summary)
        self._line(f"data: {summary['tokens']['total']:,} tokens")

    def phase_done(self, phase, result: dict):
        extra = self.inner.phase_done(phase, result) if hasattr(self.inner, "phase_done") else None
        tok = result["tokens"]
        self._line(
            f"phase {phase.name}: {result['steps']} steps, {tok['total']:,} tokens, loss {result['final_loss']:.3f}"
        )
        return extra

    def eval_done(self, point: str, result: dict) -> None:
        if hasattr(self.inner, "eval_done"):
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

    from pydantic import ValidationError

    from flows.pipeline import PipelineParams, run_pipeline
    from flows.prefect_common import console_logs_to_current_stderr
    from flows.stage_flow import make_tracking
    from tasks.data.io import DatasetError
    from tasks.io.manifest import ManifestError
    from tasks.io.weights import write_json_atomic
    from tasks.train.checkpoint import CheckpointError, DivergenceError
    from tasks.train.memory import MemoryPlanError
    from tasks.train.phase_lock import PhaseBusyError

    r = _check_init(_recipe(recipe), recipe)
    launch = _launch_settings(nproc, launcher, hostfile)
    try:
        params = PipelineParams(
            recipe_path=str(recipe), out_dir=str(out), tracking=tracking, tracking_uri=tracking_uri,
            evaluate=evaluate, export=export, artifact_uri=artifact_uri, launch=launch,
        )  # fmt: skip
    except ValidationError as e:
        err = e.errors()[0]
        console.print(f"[bold red]error:[/] --{err['loc'][0]}: {err['msg']}")
        raise typer.Exit(2) from None
    _check_launch(launch, r, list(r.phases), recipe)  # every phase's batch split, before any work
    n_points = sum(len(r.eval.points_after(n)) for n in ["init", *(p.name for p in r.phases)])
    progress = ConsoleProgress(make_tracking(params), 1 + len(r.phases) + (n_points if evaluate else 0))
    try:
        with console_logs_to_current_stderr():
            res = run_pipeline(params, tracking=progress)
    except (FileNotFoundError, DatasetError, ManifestError, PhaseBusyError, MemoryPlanError) as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None
    except (DivergenceError, CheckpointError) as e:
        console.print(f"[bold red]training stopped:[/] {e}")
        raise typer.Exit(1) from None
    except OSError as e:  # a full disk, an unwritable --out
        console.print(f"[bold red]error:[/] cannot write: {e}")
        raise typer.Exit(1) from None
    results = res["results"]
    for x in results:
        if x.get("up_to_date"):
            console.print(f"[{x['phase']}] already complete: {x['checkpoint']}")
    rep = res.get("tracking") or {}
    extra = {
        "data_tokens": res["data"]["tokens"],
        "eval": res["eval"],
        "eval_report": res["eval_report"],
        "export": res["export"],
        "mlflow": {
            k: rep.get(k)
            for k in (
                "parent_run_id",
                "tracking_uri",
                "experiment",
                "undelivered",
                "rejected",
                "spool_dir",
                "plots",
            )
        }
        if rep
        else None,
    }
    summary = _summary(recipe, results, extra)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(summary, out / "summary.json")
    _table(results)
    if res["eval_report"]:
        console.print(f"evaluation report: {res['eval_report']}")
    if rep:
        console.print(f"MLflow: {rep.get('tracking_uri')} (parent run {rep.get('parent_run_id')})")
    console.print(f"done in {summary['seconds']} s: {out / 'summary.json'}")
    sys.stdout.write(json.dumps(summary, sort_keys=True) + "\n")
