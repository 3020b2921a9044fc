"""The pipeline flow: the whole recipe, top to bottom.

data flow -> every phase in recipe order (one training task each, named after the phase: text_pretrain ->
vit -> align -> joint_pretrain -> cooldown -> long_context.* -> sft.* -> cot_sft), each followed by the
recipe's evaluation points for it (``eval:`` in the recipe; ``tasks/eval/points.py``) -> the run's
evaluation report (``OUT/eval/report.md``, also a Prefect artifact) -> export

Tracking (``PipelineParams.tracking``): MLflow by default (a parent run per pipeline run, a nested run per
phase; the embedded default is ``sqlite:///OUT/mlflow.db`` unless ``tracking_uri`` or
``$MLFLOW_TRACKING_URI`` names a server), or ``local`` (each phase's ``metrics.jsonl`` only).

The phases are tasks of this flow rather than one stage subflow each: a Prefect flow run costs about a
second of bookkeeping, a task run a few milliseconds (the stage flow is the deployment for running one
stage on its own).

The export copies the last phase's final checkpoint to ``OUT/export/native/`` and writes the public
Kimi-VL layout (``config.json`` + sharded safetensors) to ``OUT/export/hf/``; each carries a manifest whose
parent is the final checkpoint, so an unchanged export is up to date and skipped. At the end a Markdown
artifact tabulates tokens per phase (text/image/video/total), steps, final loss, checkpoint and the
MLflow run link when the tracking backend provides one.

``kimivl run`` calls this flow in Prefect's local (ephemeral) mode; ``kimivl serve`` / ``prefect.yaml``
deploy it so runs start from the Prefect UI with ``PipelineParams`` as a validated form.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Literal

# isort: off
from flows import prefect_common as pc  # sets Prefect's environment defaults: import it first

# isort: on
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from flows.data_flow import DataParams, data_flow, load_recipe_checked
from flows.launched_phase import LaunchSettings
from flows.stage_flow import make_tracking, run_phases, tracking_backend
from tasks.eval.points import INIT_POINT, EvalPoint, RecipeEval, pipeline_report, run_point
from tasks.io.export import export_run, export_sources
from tasks.io.publish import join, publish_data, publish_dir
from tasks.recipe import RecipeError
from tasks.tracking.base import RunTracking


class PipelineParams(BaseModel):
    """The pipeline flow's parameters (a validated form in the Prefect UI)."""

    model_config = ConfigDict(extra="forbid")
    recipe_path: str = Field(default="params.yaml", description="recipe YAML (params.yaml = the tiny recipe)")
    out_dir: str = Field(default="runs/tiny", description="run directory: data/, phases/, eval/, export/")
    data_dir: str | None = Field(default=None, description="data root (default: OUT/data)")
    io_retries: int = Field(
        default=3, ge=0, le=10, description="retries of I/O steps (data, export); 0 to 10"
    )
    tracking: Literal["mlflow", "local"] = Field(
        default="mlflow", description="mlflow: parent + nested runs; local: metrics.jsonl per phase only"
    )
    tracking_uri: str | None = Field(
        default=None, description="MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite:///OUT/mlflow.db)"
    )
    experiment: str = Field(default="kimivl", min_length=1, description="MLflow experiment (not empty)")
    evaluate: bool = Field(default=True, description="run the recipe's evaluation points")
    artifact_uri: str | None = Field(
        default=None,
        description=(
            "s3://bucket/prefix (or a directory): verified copies of datasets, checkpoints, evals, export "
            "(default: $KIMIVL_ARTIFACT_URI/RUN_DIR_NAME when that variable is set)"
        ),
    )
    export: bool = Field(default=True, description="export the final model (native + public HF layout)")
    export_max_shard_gb: float = Field(default=5.0, gt=0, description="HF export shard size in GB; above 0")
    launch: LaunchSettings = Field(
        default_factory=LaunchSettings,
        description="training processes per phase: nproc > 1 launches torchrun/deepspeed ranks",
    )


@task(name="export", task_run_name="export", **pc.io_task_options())
def export_model(
    final: Path,
    export_root: Path,
    max_shard_bytes: int,
    tokenizer_dir: Path | None = None,
    assets_dir: Path | None = None,
) -> dict[str, Any]:
    """The final checkpoint -> OUT/export/{native,hf} (``tasks.io.export.export_run``)."""
    return export_run(final, export_root, max_shard_bytes, tokenizer_dir, assets_dir, log=pc.run_log())


@task(name="publish", **pc.io_task_options())
def publish_copy(local_dir: Path, uri: str) -> str:
    """A verified copy of ``local_dir`` at ``uri`` (skipped when identical; retried on I/O errors)."""
    return publish_dir(local_dir, uri, log=pc.run_log())["uri"]


@task(name="publish data", **pc.io_task_options())
def publish_datasets(data_root: Path, artifact_uri: str) -> dict[str, str]:
    return publish_data(data_root, artifact_uri, log=pc.run_log())


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_point(
    settings: RecipeEval, point: EvalPoint, checkpoint: Path, data_root: Path, out_root: Path
) -> dict[str, Any]:
    """One evaluation point (skipped when its output manifest matches the checkpoint and config)."""
    return run_point(settings, point, checkpoint, data_root, out_root, log=pc.run_log())


@flow(name="kimivl-pipeline", log_prints=True)
def pipeline_flow(params: PipelineParams = PipelineParams()) -> dict[str, Any]:
    """The whole recipe: data -> every phase in recipe order, each followed by the recipe's evaluation
    points for it -> the run's evaluation report -> export.

    Tracking: ``params.tracking`` (MLflow unless "local"), unless called inside
    ``flows.stage_flow.tracking_backend(...)``.
    Returns ``phase_order``, ``results`` (one result dict per phase), ``data`` (the data flow's summary),
    ``eval`` (per evaluation point its summary metrics and directory), ``export``, ``tracking`` (the
    tracking backend's report, e.g. MLflow run ids and undelivered records) and ``seconds``.
    """
    t0 = time.perf_counter()
    recipe = load_recipe_checked(params.recipe_path)
    try:  # before any work: every phase's global batch must split over the launched ranks
        params.launch.check(recipe, list(recipe.phases))
    except (OSError, ValueError) as e:
        raise RecipeError(f"{params.recipe_path}: {e}") from None
    run = _PipelineRun(params, recipe, make_tracking(params))
    with run.tracking.pipeline(recipe, params.model_dump(mode="json")):
        data_summary = run.data()
        if recipe.model.init_checkpoint is not None:
            run.evaluate(INIT_POINT, Path(recipe.model.init_checkpoint))
        results = [run.train(phase) for phase in recipe.phases]
        report = run.report()
        exported = run.export(Path(results[-1]["checkpoint"])) if params.export and results else None
    run.artifacts(results, data_summary, report)
    return {
        "recipe": params.recipe_path,
        "phase_order": [r["phase"] for r in results],
        "results": results,
        "data": data_summary,
        "eval": {
            n: {"dir": p["dir"], "summary": p["summary"], "published": p["published"]}
            for n, p in run.points.items()
        },
        "eval_report": None if report is None else report["report"],
        "export": exported,
        "tracking": run.tracking.report,
        "seconds": round(time.perf_counter() - t0, 1),
    }


class _PipelineRun:
    """The steps of one pipeline flow run, each a Prefect task (or the data flow), with the run's
    directories, tracking backend, evaluation results and (when set) its artifact URI."""

    def __init__(self, params: PipelineParams, recipe: Any, tracking: RunTracking) -> None:
        self.params, self.recipe, self.tracking = params, recipe, tracking
        self.out = Path(params.out_dir)
        self.data_root = Path(params.data_dir) if params.data_dir else self.out / "data"
        self.points: dict[str, dict[str, Any]] = {}
        uri = params.artifact_uri or os.environ.get("KIMIVL_ARTIFACT_URI") or None  # compose workers set it
        if uri is not None and params.artifact_uri is None:
            uri = join(uri, self.out.resolve().name)  # one prefix per run directory
        self.uri = uri

    def copy(self, local: Path, *parts: str) -> str | None:
        """A verified copy of ``local`` under the artifact URI (None without one)."""
        if self.uri is None:
            return None
        task = publish_copy.with_options(
            task_run_name=f"publish {'/'.join(parts)}", retries=self.params.io_retries
        )
        return task(local, join(self.uri, *parts))

    def data(self) -> dict[str, Any]:
        p = self.params
        summary = data_flow(
            DataParams(recipe_path=p.recipe_path, data_dir=str(self.data_root), io_retries=p.io_retries)
        )
        if self.uri is not None:
            summary["published"] = publish_datasets.with_options(retries=p.io_retries)(
                self.data_root, self.uri
            )
        self.tracking.data_done(summary)
        return summary

    def evaluate(self, after: str, checkpoint: Path) -> None:
        for point in self.recipe.eval.points_after(after) if self.params.evaluate else []:
            res = evaluate_point.with_options(task_run_name=f"eval after {after}")(
                self.recipe.eval, point, checkpoint, self.data_root, self.out
            )
            res["published"] = self.copy(Path(res["dir"]), "eval", after)
            self.points[after] = res
            self.tracking.eval_done(after, res)

    def train(self, phase: Any) -> dict[str, Any]:
        (result,) = run_phases(
            self.recipe, [phase], self.data_root, self.out, self.tracking, self.params.launch
        )
        result["published"] = self.copy(Path(result["checkpoint"]), "phases", phase.name, "final")
        self.evaluate(phase.name, Path(result["checkpoint"]))
        return result

    def report(self) -> dict[str, Any] | None:
        if not self.points:
            return None
        stage_of = {p.name: p.stage for p in self.recipe.phases} | {INIT_POINT: "text_pretrain"}
        report = pipeline_report(self.recipe.name, self.points, stage_of, self.out)
        self.tracking.report_done(Path(report["report"]))
        return report

    def export(self, last: Path) -> dict[str, Any]:
        shard = int(self.params.export_max_shard_gb * 2**30)
        task = export_model.with_options(retries=self.params.io_retries)
        exported = task(last, self.out / "export", shard, *export_sources(self.recipe, self.data_root))
        exported["published"] = self.copy(Path(exported["hf"]), "export", "hf")
        return exported

    def artifacts(self, results: list[dict], data_summary: dict, report: dict | None) -> None:
        """The run's Markdown artifacts in Prefect: tokens per phase, and the evaluation report."""
        create_markdown_artifact(
            key=pc.artifact_key("kimivl", "pipeline", "tokens"),
            markdown=(
                f"# Recipe `{self.recipe.name}` ({self.params.recipe_path}) -> `{self.out}`\n\n"
                f"{pc.tokens_table(results)}\nData tokens: {data_summary['tokens']}\n"
            ),
            description="tokens per phase, steps, final loss, checkpoints, MLflow runs",
        )
        if report is not None:
            create_markdown_artifact(
                key=pc.artifact_key("kimivl", "pipeline", "eval"),
                markdown=report["artifact_markdown"],
                description="evaluation: before/after comparisons and every metric per evaluation point",
            )


def run_pipeline(params: PipelineParams, tracking: RunTracking | None = None) -> dict[str, Any]:
    """``pipeline_flow`` as ``kimivl run`` calls it: the two fixed start-up costs of a local run overlap
    instead of adding up. The MLflow client (``import mlflow`` + creating and migrating the embedded SQLite
    store) is built in a background thread while Prefect's local server starts (a subprocess we wait
    for); each takes about 5 s on 2 cores. Nothing changes for a run against servers: MLflow's import
    still overlaps, no Prefect server is started."""
    if params.tracking == "mlflow":
        from tasks.tracking.mlflow_connection import warm_client
        from tasks.tracking.mlflow_names import resolve_tracking_uri

        warm_client(resolve_tracking_uri(Path(params.out_dir), params.tracking_uri))
    pc.start_local_server()
    if tracking is None:
        return pipeline_flow(params)
    with tracking_backend(tracking):
        return pipeline_flow(params)
