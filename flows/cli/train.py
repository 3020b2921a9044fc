"""``kimivl stage`` and ``kimivl train``: run recipe phases through the generic stage runner.

Single process by default (in-process DeepSpeed rank, the embedded default). ``--nproc N`` (``--hostfile``
for multi-node) checks everything every rank would check once here, then starts the ranks under
``torchrun`` or the ``deepspeed`` launcher (``tasks/train/rank_main.py``) and reports their results.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from flows.cli.common import console, emit, fail, load_recipe_or_exit, log

RECIPE_OPT = typer.Option(Path("params.yaml"), "--recipe", "-r")


def launch_settings(nproc: int, launcher: str, hostfile: Path | None):
    """The CLI's --nproc/--launcher/--hostfile as the flows' ``LaunchSettings`` (exit 2 if malformed)."""
    from pydantic import ValidationError

    from flows.launch_settings import LaunchSettings

    try:
        return LaunchSettings(nproc=nproc, launcher=launcher, hostfile=str(hostfile) if hostfile else None)
    except ValidationError as e:
        err = e.errors()[0]
        fail(f"--{err['loc'][0]}: {err['msg']}")


def check_launch(launch, r, phases: list, recipe_path: Path) -> None:
    """Exit 2 naming the flag or the recipe field if ``phases`` cannot run on ``launch``'s processes."""
    from flows.launch_settings import LaunchError
    from tasks.train.memory import MemoryPlanError

    try:
        launch.check(r, phases)
    except LaunchError as e:
        where = f"{recipe_path}: {e}" if e.in_recipe else f"--{e.field}: {e.message}"
        fail(where)
    except MemoryPlanError as e:
        fail(f"{recipe_path}: {e}")


def checked_recipe(recipe_path: Path, data: Path | None) -> Any:
    """The recipe, with its init checkpoint and (``data`` given) the tokenized data checked: exit 2 otherwise."""
    from tasks.train.phases import check_inputs

    r = load_recipe_or_exit(recipe_path)
    try:
        check_inputs(r, data)
    except FileNotFoundError as e:
        fail(f"{recipe_path}: {e}" if str(e).startswith("field ") else str(e))
    return r


def run_here(r: Any, phases: list, data: Path, out: Path) -> list[dict[str, Any]]:
    """The phases in this process (exit 2 / 1 with the failure's message, see ``phases.exit_code``)."""
    from tasks.train.phases import exit_code, run_phases

    try:
        return run_phases(r, phases, data, out, log=log)
    except Exception as e:
        code = exit_code(e)
        if code is None:
            raise
        fail_for(e, code)


def fail_for(e: BaseException, code: int) -> None:
    """Exit ``code`` (``tasks.train.phases.exit_code``) with the failure's message."""
    if code == 2:
        fail(str(e))
    if isinstance(e, OSError):  # a full disk, an unwritable --out
        fail(f"cannot write: {e}", code)
    fail(str(e), code, "training stopped")


def run_launched(argv: list[str], launch: Any, r: Any, phases: list, out: Path) -> list[dict[str, Any]]:
    """Start the ranks (``tasks/train/rank_main.py argv --worker``) and collect the phases' results."""
    from flows.launch_settings import launcher_env
    from tasks.train.runner import read_result

    check_launch(launch, r, phases, Path(argv[argv.index("--recipe") + 1]))
    cmd = launch.command(argv)
    console.print(f"launching: {' '.join(cmd)}")
    # the launcher assigns ranks and the rendezvous address: never inherit a parent's single-rank settings
    code = subprocess.call(cmd, env=launcher_env())
    if code != 0:
        raise typer.Exit(code)
    return [r for r in (read_result(out, p) for p in phases) if r is not None]


def print_table(results: list[dict]) -> None:
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
    recipe: Path = RECIPE_OPT,
    data: str = typer.Option(
        "data", "--data", help="data root (output of `kimivl data all`): a directory or s3://bucket/prefix"
    ),
    out: Path = typer.Option(Path("runs/tiny"), "--out", help="run directory"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="data-parallel processes per node"),
    launcher: str = typer.Option("torchrun", "--launcher", help="torchrun | deepspeed"),
    hostfile: Path | None = typer.Option(None, "--hostfile", help="multi-node (deepspeed launcher)"),
    rerun: bool = typer.Option(
        False, "--rerun", help="train complete phases again: phases/PHASE/ is moved aside (kept), not deleted"
    ),
) -> None:
    """Run one stage (all its phases) or one phase; it starts from the previous phase's final checkpoint."""
    from tasks.data.row_store import data_location
    from tasks.recipe import RecipeError
    from tasks.train.phase_lock import PhaseBusyError, set_aside
    from tasks.train.runner import phase_dir

    data = data_location(data)
    r = checked_recipe(recipe, data)
    try:
        phases = r.select(name)
    except RecipeError as e:
        fail(str(e))
    for p in phases if rerun else []:
        try:
            aside = set_aside(phase_dir(out, p))
        except PhaseBusyError as e:
            fail(str(e), code=1)
        if aside is not None:
            log(f"[{p.name}] rerun: the previous run directory is now {aside}")
    launch = launch_settings(nproc, launcher, hostfile)
    if launch.launched:
        argv = ["stage", name, "--recipe", str(recipe), "--data", str(data), "--out", str(out)]
        results = run_launched(argv, launch, r, phases, out)
    else:
        results = run_here(r, phases, data, out)
    print_table(results)
    emit(results)


def train_cmd(
    recipe: Path = RECIPE_OPT,
    data: str = typer.Option("data", "--data", help="data root: a directory or s3://bucket/prefix"),
    out: Path = typer.Option(Path("runs/tiny"), "--out"),
    nproc: int = typer.Option(1, "--nproc", min=1),
    launcher: str = typer.Option("torchrun", "--launcher"),
    hostfile: Path | None = typer.Option(None, "--hostfile"),
) -> None:
    """Run every phase of the recipe in order; writes OUT/summary.json."""
    from tasks.data.row_store import data_location
    from tasks.io.files import write_json_atomic

    data = data_location(data)
    r = checked_recipe(recipe, data)
    launch = launch_settings(nproc, launcher, hostfile)
    if launch.launched:
        argv = ["train", "--recipe", str(recipe), "--data", str(data), "--out", str(out)]
        results = run_launched(argv, launch, r, list(r.phases), out)
    else:
        results = run_here(r, list(r.phases), data, out)
    summary = run_summary(recipe, results)
    write_json_atomic(summary, out / "summary.json")
    print_table(results)
    emit(summary)


def run_summary(recipe: Path, results: list[dict], extra: dict | None = None) -> dict:
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
