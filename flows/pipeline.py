"""The pipeline flow: the whole recipe, top to bottom.

data flow -> every phase in recipe order (one training task each, named after the phase: text_pretrain ->
vit -> align -> joint_pretrain -> cooldown -> long_context.* -> sft.* -> cot_sft) -> evaluation
(``eval_hook``) -> export

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

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# isort: off
from flows import prefect_common as pc  # sets Prefect's environment defaults: import it first

# isort: on
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from flows.data_flow import DataParams, data_flow, load_recipe_checked
from flows.stage_flow import LocalTracking, run_phases
from tasks.manifest import ManifestError, is_up_to_date, read_manifest, verify_files, write_manifest


class PipelineParams(BaseModel):
    """The pipeline flow's parameters (a validated form in the Prefect UI)."""

    model_config = ConfigDict(extra="forbid")
    recipe_path: str = Field(default="params.yaml", description="recipe YAML (params.yaml = the tiny recipe)")
    out_dir: str = Field(default="runs/tiny", description="run directory: data/, phases/, export/")
    data_dir: str | None = Field(default=None, description="data root (default: OUT/data)")
    io_retries: int = Field(default=3, ge=0, le=10, description="retries of I/O steps (data, export)")
    export: bool = Field(default=True, description="export the final model (native + public HF layout)")
    export_max_shard_gb: float = Field(default=5.0, gt=0, description="HF export shard size")


EvalHook = Callable[[dict[str, Any]], Any]


@task(name="export", task_run_name="export", **pc.io_task_options())
def export_model(final: Path, export_root: Path, max_shard_bytes: int) -> dict[str, Any]:
    """final/ -> export/native (a verified copy) and export/hf (public layout), both skipped when current."""
    from tasks.model_io import load_native, save_hf

    log = pc.run_log()
    src = read_manifest(final)
    parent = src.parent_of(final)
    native, hf = export_root / "native", export_root / "hf"
    up_to_date = []
    if _same_copy(native, src.content_hash):
        up_to_date.append("native")
        log(f"[export] {native}: up to date (skipped)")
    else:
        stage = export_root / ".native.staging"
        shutil.rmtree(stage, ignore_errors=True)
        shutil.copytree(final, stage)
        verify_files(stage)
        _replace_dir(stage, native)
        log(f"[export] native checkpoint -> {native}")
    hf_config = {"format": "kimi-vl-hf", "max_shard_bytes": max_shard_bytes}
    if is_up_to_date(hf, config=hf_config, parents=[parent]):
        up_to_date.append("hf")
        log(f"[export] {hf}: up to date (skipped)")
    else:
        stage = export_root / ".hf.staging"
        shutil.rmtree(stage, ignore_errors=True)
        cfg, sd = load_native(final)
        save_hf(sd, cfg, stage, max_shard_bytes=max_shard_bytes)
        write_manifest(stage, kind="export", step="export:hf", config=hf_config, parents=[parent])
        _replace_dir(stage, hf)
        log(f"[export] public Kimi-VL layout -> {hf}")
    return {"native": str(native), "hf": str(hf), "source": str(final), "up_to_date": up_to_date}


def _same_copy(dst: Path, content_hash: str) -> bool:
    try:
        m = read_manifest(dst)
        verify_files(dst, m)
    except ManifestError:
        return False
    return m.content_hash == content_hash


def _replace_dir(stage: Path, dst: Path) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    stage.replace(dst)


@task(name="evaluate", task_run_name="evaluate", cache_policy=NO_CACHE)
def evaluate(eval_hook: EvalHook, context: dict[str, Any]) -> Any:
    """Placeholder step: calls the evaluation hook with the run's context and returns what it returns."""
    return eval_hook(context)


@flow(name="kimivl-pipeline", log_prints=True)
def pipeline_flow(
    params: PipelineParams = PipelineParams(),
    tracking: Any = None,
    eval_hook: EvalHook | None = None,
) -> dict[str, Any]:
    """The whole recipe: data -> every phase in recipe order -> evaluation -> export.

    ``tracking``: see ``flows.stage_flow`` (default: a JSONL tracker per phase directory).
    ``eval_hook(context)``: called after the last phase with ``recipe``, ``out_dir``, ``data_dir``,
    ``results`` and ``checkpoint`` (the last final checkpoint); skipped when ``None``.
    Returns ``phase_order``, ``results`` (one result dict per phase), ``data`` (the data flow's summary),
    ``eval``, ``export`` and ``seconds``.
    """
    t0 = time.perf_counter()
    recipe = load_recipe_checked(params.recipe_path)
    out = Path(params.out_dir)
    data = Path(params.data_dir) if params.data_dir else out / "data"
    tracking = tracking or LocalTracking()
    opened = getattr(tracking, "pipeline", None)
    with opened(recipe.name, params.model_dump(mode="json")) if opened else _null():
        data_summary = data_flow(
            DataParams(recipe_path=params.recipe_path, data_dir=str(data), io_retries=params.io_retries)
        )
        if (data_hook := getattr(tracking, "data_done", None)) is not None:
            data_hook(data_summary)
        results = run_phases(recipe, list(recipe.phases), data, out, tracking)
        last = Path(results[-1]["checkpoint"]) if results else None
        evaluation = None
        if eval_hook is not None:
            context = {
                "recipe": recipe,
                "out_dir": out,
                "data_dir": data,
                "results": results,
                "checkpoint": last,
            }
            evaluation = evaluate(eval_hook, context)
        exported = None
        if params.export and last is not None:
            exported = export_model.with_options(retries=params.io_retries)(
                last, out / "export", int(params.export_max_shard_gb * 2**30)
            )
    create_markdown_artifact(
        key=pc.artifact_key("kimivl", "pipeline", "tokens"),
        markdown=(
            f"# Recipe `{recipe.name}` ({params.recipe_path}) -> `{out}`\n\n{pc.tokens_table(results)}\n"
            f"Data tokens: {data_summary['tokens']}\n"
        ),
        description="tokens per phase, steps, final loss, checkpoints, MLflow runs",
    )
    return {
        "recipe": params.recipe_path,
        "phase_order": [r["phase"] for r in results],
        "results": results,
        "data": data_summary,
        "eval": evaluation,
        "export": exported,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _null():
    import contextlib

    return contextlib.nullcontext()
