"""The stage flow: every phase of one recipe stage (or one phase), each a Prefect task calling the generic
stage runner ``tasks.train.runner.run_phase``.

Training tasks have no automatic retries: a phase checkpoints as it goes, so a manual retry of a failed
run resumes from its last complete checkpoint instead of repeating work. A phase whose ``final/`` is
complete is up to date and is not run again (logged as such, marked ``up_to_date`` in its result).

Tracking: ``tasks.tracking.base.RunTracking`` (``tracking: local`` -> ``LocalTracking``: each phase
directory's ``metrics.jsonl``; ``mlflow`` -> ``tasks.tracking.mlflow_flow.MlflowRunTracking``). The flows call
its hooks (``pipeline``, ``phase``, ``phase_done``...) directly; every backend has all of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

# isort: off
from flows import prefect_common as pc  # sets Prefect's environment defaults: import it first

# isort: on
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from flows.launched_phase import LaunchSettings, run_phase_launched
from tasks.recipe import Recipe, RecipeError
from tasks.tracking.base import RunTracking, tracking_links
from tasks.tracking.local import LocalTracking
from tasks.train.phase_lock import set_aside
from tasks.train.runner import phase_dir, read_result, run_phase
from tasks.train.stages import PhaseConfig


class StageParams(BaseModel):
    """The stage flow's parameters (a validated form in the Prefect UI)."""

    model_config = ConfigDict(extra="forbid")
    recipe_path: str = Field(default="params.yaml", description="recipe YAML")
    stage: str = Field(
        default="text_pretrain", description="a stage (runs all its phases) or one phase name, e.g. sft.2"
    )
    out_dir: str = Field(default="runs/tiny", description="run directory: phases/PHASE/ go here")
    data_dir: str | None = Field(default=None, description="data root with tokenized/ (default: OUT/data)")
    tracking: Literal["mlflow", "local"] = Field(
        default="mlflow",
        description="mlflow: the pipeline's parent run + a nested run per phase; local: JSONL",
    )
    tracking_uri: str | None = Field(
        default=None, description="MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite:///OUT/mlflow.db)"
    )
    experiment: str = Field(default="kimivl", min_length=1, description="MLflow experiment (not empty)")
    rerun: bool = Field(
        default=False,
        description=(
            "train the selected phases again from their start even when complete: each phases/PHASE/ is "
            "moved aside to phases/.PHASE.replaced-TIME (nothing deleted); later phases are left as they are"
        ),
    )
    launch: LaunchSettings = Field(
        default_factory=LaunchSettings,
        description="training processes per phase: nproc > 1 launches torchrun/deepspeed ranks",
    )


_TRACKING: ContextVar[RunTracking | None] = ContextVar("kimivl_tracking", default=None)


@contextlib.contextmanager
def tracking_backend(tracking: RunTracking) -> Iterator[RunTracking]:
    """Flows called inside this block track into ``tracking`` instead of the backend their parameters
    name (``kimivl run``'s console progress wrapper, tests' fakes). Not a flow parameter: the Prefect form
    would show it as an untyped JSON field."""
    token = _TRACKING.set(tracking)
    try:
        yield tracking
    finally:
        _TRACKING.reset(token)


def make_tracking(params: Any) -> RunTracking:
    """The tracking backend a flow's parameters ask for (``tracking``, ``tracking_uri``, ``experiment``),
    unless a ``tracking_backend`` block set one."""
    override = _TRACKING.get()
    if override is not None:
        return override
    if params.tracking == "local":
        return LocalTracking()
    from tasks.tracking.mlflow_flow import MlflowRunTracking

    return MlflowRunTracking(
        params.out_dir, params.tracking_uri, experiment=params.experiment, log=pc.run_log()
    )


@task(name="train-phase", cache_policy=NO_CACHE)
def train_phase(
    recipe: Recipe,
    phase: PhaseConfig,
    data_root: Path,
    out_root: Path,
    tracking: RunTracking | None = None,
    launch: LaunchSettings | None = None,
) -> dict[str, Any]:
    """One phase to its token budget (resumes from its last checkpoint); no automatic retries. In this
    process, or with ``launch.nproc > 1`` (or a hostfile) on launched ranks (``flows/launched_phase.py``)."""
    log = pc.run_log()
    done = read_result(out_root, phase)
    if done is not None:
        log(f"[{phase.name}] up to date: already complete ({done['checkpoint']})")
        return {**done, "up_to_date": True}
    tracking = tracking or LocalTracking()
    with tracking.phase(phase, phase_dir(out_root, phase)) as tracker:
        if launch is not None and launch.launched:
            result = run_phase_launched(recipe, phase, data_root, out_root, launch, tracker, log=log)
        else:
            result = run_phase(recipe, phase, data_root, out_root, tracker=tracker, log=log)
        result = {**result, **tracking_links(tracker)}
    return {**result, **tracking.phase_done(phase, result), "up_to_date": False}


def select_phases(recipe: Recipe, stage: str) -> list[PhaseConfig]:
    """A stage's phases, or the one phase of that name (``RecipeError`` names both lists otherwise)."""
    if stage in {p.name for p in recipe.phases}:
        return [recipe.phase(stage)]
    return recipe.stage_phases(stage)


def run_phases(
    recipe: Recipe,
    phases: list[PhaseConfig],
    data_root: Path,
    out_root: Path,
    tracking: RunTracking | None = None,
    launch: LaunchSettings | None = None,
) -> list[dict[str, Any]]:
    """The training tasks, one per phase, in order (each named after its phase)."""
    return [
        train_phase.with_options(task_run_name=f"train {p.name}")(
            recipe, p, data_root, out_root, tracking, launch
        )
        for p in phases
    ]


@flow(name="kimivl-stage", log_prints=True)
def stage_flow(params: StageParams = StageParams()) -> list[dict[str, Any]]:
    """Every phase of ``params.stage`` in recipe order; each starts from the previous phase's final
    checkpoint (which must exist: run the earlier stages first). Tracking: ``params.tracking``, unless
    called inside ``tracking_backend(...)``."""
    from flows.data_flow import load_recipe_checked

    recipe = load_recipe_checked(params.recipe_path)
    try:
        phases = select_phases(recipe, params.stage)
    except RecipeError as e:
        raise RecipeError(f"{params.recipe_path}: {e}") from None
    try:
        params.launch.check(recipe, phases)
    except (OSError, ValueError) as e:
        raise RecipeError(f"{params.recipe_path}: {e}") from None
    out = Path(params.out_dir)
    data = Path(params.data_dir) if params.data_dir else out / "data"
    log = pc.run_log()
    replaced = {}
    for p in phases if params.rerun else []:
        aside = set_aside(phase_dir(out, p))
        if aside is not None:
            replaced[p.name] = (p, aside)
            log(f"[{p.name}] rerun: the previous run directory is now {aside}")
    done = [read_result(out, p) for p in phases]
    if all(d is not None for d in done):  # nothing to train: no tracking run is opened
        for p, d in zip(phases, done, strict=True):
            log(f"[{p.name}] up to date: already complete ({d['checkpoint']}); rerun=true trains it again")
        results = [{**d, "up_to_date": True} for d in done]
    else:
        tracking = make_tracking(params)
        # MLflow: the pipeline's parent run of this recipe + run directory is found again, not duplicated
        with tracking.pipeline(recipe, params.model_dump(mode="json")):
            for p, aside in replaced.values():
                tracking.phase_replaced(p, aside)
            results = run_phases(recipe, phases, data, out, tracking, params.launch)
    create_markdown_artifact(
        key=pc.artifact_key("kimivl", "stage", params.stage, "tokens"),
        markdown=f"# Stage `{params.stage}`: tokens per phase\n\n{pc.tokens_table(results)}",
        description=f"tokens per phase of stage {params.stage}",
    )
    return results
