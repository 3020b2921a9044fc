"""The whole recipe (every data step, then every phase) tracked in MLflow: ``kimivl run`` with tracking.

Same sequence as ``flows/cli_train.py:run_cmd``; around it a parent MLflow run (the recipe as params, the
data step counts as metrics) and a nested run per phase, passed to ``run_phase`` as its tracker (mirrored
into the phase directory's ``metrics.jsonl`` as without MLflow). A tracking server that is down never stops
the pipeline: what could not be delivered is spooled under ``OUT/tracking/spool`` and reported in the
summary (``summary["mlflow"]["undelivered"]``).

Embedded default: ``sqlite:///OUT/mlflow.db`` with artifacts under ``OUT/mlartifacts`` (no server).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.tracking import JsonlTracker, Tracker
from tasks.tracking_mlflow import PipelineTracking, default_tracking_uri

Log = Callable[[str], Any]


class TeeTracker:
    """Sends every call to several trackers."""

    def __init__(self, *trackers: Tracker) -> None:
        self.trackers = trackers

    def log_params(self, params: dict[str, Any]) -> None:
        for t in self.trackers:
            t.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def set_tags(self, tags: dict[str, str]) -> None:
        for t in self.trackers:
            t.set_tags(tags)

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        for t in self.trackers:
            t.log_artifact(path, name)


def run_pipeline_tracked(
    recipe_path: Path | str,
    out_dir: Path | str,
    tracking_uri: str | None = None,
    log: Log = print,
    *,
    experiment: str = "kimivl",
    registered_model: str | None = None,
    log_checkpoints: bool = True,
) -> dict[str, Any]:
    """Run data + every phase of the recipe under ``out_dir`` with MLflow tracking; returns the summary
    (also written to ``OUT/summary.json``): per phase its stage, tokens, steps, final loss, checkpoint and
    ``mlflow_run_id``; ``mlflow``: parent run id, URI, experiment, undelivered records, spool, plots."""
    from tasks.data.pipeline import run_data_all
    from tasks.model_io import write_json_atomic
    from tasks.recipe import load_recipe
    from tasks.train.runner import phase_dir, run_phase

    t0 = time.perf_counter()
    recipe = load_recipe(recipe_path)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or default_tracking_uri(out)
    local_store = not uri.startswith(("http://", "https://", "databricks"))
    pt = PipelineTracking(
        uri,
        experiment=experiment,
        artifact_location=(out / "mlartifacts").as_uri() if local_store else None,
        local_dir=out / "tracking",
        data_root=out / "data",
        out_root=out,
        registered_model=registered_model,
        log_checkpoints=log_checkpoints,
        log=log,
    )
    pt.start_pipeline(
        recipe,
        run_name=f"{recipe.name}:{out.name}",
        tags={"kimivl.out_dir": str(out), "kimivl.recipe_path": str(Path(recipe_path).resolve())},
    )
    status = "FAILED"
    results: list[dict[str, Any]] = []
    try:
        data_summary = run_data_all(recipe.data, out / "data", log=log)
        pt.log_data_summary(data_summary)
        for phase in recipe.phases:
            tracker = pt.phase_tracker(phase.name)
            local = JsonlTracker(phase_dir(out, phase))
            res = run_phase(recipe, phase, out / "data", out, tracker=TeeTracker(tracker, local), log=log)
            pt.finish_phase(phase.name, res)
            results.append(res)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        report = pt.end_pipeline(status)
    keys = ("stage", "tokens", "steps", "final_loss", "checkpoint", "skipped_steps")
    summary = {
        "recipe": str(recipe_path),
        "data_tokens": data_summary["tokens"],
        "phase_order": [r["phase"] for r in results],
        "phases": {
            r["phase"]: {**{k: r[k] for k in keys}, "mlflow_run_id": report["phase_run_ids"].get(r["phase"])}
            for r in results
        },
        "mlflow": {
            k: report[k]
            for k in (
                "parent_run_id",
                "tracking_uri",
                "experiment",
                "undelivered",
                "rejected",
                "spool_dir",
                "plots",
            )
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json_atomic(summary, out / "summary.json")
    return summary
