"""MLflow as the flows' ``RunTracking`` backend: a parent MLflow run around the pipeline, a nested run per
phase, evaluation metrics and reports (``tasks.tracking.mlflow_pipeline.PipelineTracking`` keeps the tree).

- ``pipeline(recipe, params)``: find-or-create the parent run (the resolved recipe as params), end it with
  the run's status, plots and one last delivery attempt; ``report`` holds what was (not) delivered;
- ``data_done(summary)``: data step counts as parent metrics, dataset versions as tags;
- ``phase(phase, phase_dir)``: yields a tracker that writes both to the phase's nested run and to the phase
  directory's ``metrics.jsonl`` (the local record stays complete when the server is down); a phase run
  found again after a crash gets the steps the local record has and MLflow lacks re-sent; MLflow's system
  metrics (CPU, memory, GPU: ``system/...``) are logged on the phase run while it trains;
- ``phase_done(phase, result)``: summary metrics, checkpoint lineage, model registry version; returns the
  run id and (for a tracking server) the run's URL for the tokens table;
- ``phase_replaced(phase, old_dir)``: a forced rerun; the phase's run is kept (tagged with where its
  directory went) and no longer found again, so the new training gets a run of its own;
- ``eval_done(point, result)``: the point's summary metrics on the parent run as ``eval.<phase>.<metric>``
  and its directory (``eval.json``, report, NIAH plots) as artifacts; ``report_done(path)``: the run report.

A tracking server that is down never stops the pipeline: what could not be delivered is spooled under
``OUT/tracking/spool`` and reported (``report["undelivered"]``). Embedded default: ``sqlite:///OUT/mlflow.db``
with artifacts under ``OUT/mlartifacts`` (no server), unless ``MLFLOW_TRACKING_URI`` names one.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks import Log
from tasks.tracking.base import RunTracking, Tracker
from tasks.tracking.local import JsonlTracker, TeeTracker
from tasks.tracking.mlflow_names import is_remote, resolve_tracking_uri
from tasks.tracking.mlflow_pipeline import PipelineTracking
from tasks.tracking.mlflow_system import system_metrics


class MlflowRunTracking(RunTracking):
    """The flows' tracking backend for MLflow (see the module docstring)."""

    def __init__(
        self,
        out_dir: Path | str,
        tracking_uri: str | None = None,
        *,
        experiment: str = "kimivl",
        registered_model: str | None = None,
        log_checkpoints: bool = True,
        log: Log = print,
    ) -> None:
        self.out = Path(out_dir).resolve()
        self.uri = resolve_tracking_uri(self.out, tracking_uri)
        self.remote = is_remote(self.uri)
        self.out.mkdir(parents=True, exist_ok=True)
        self.pt = PipelineTracking(
            self.uri,
            experiment=experiment,
            artifact_location=None if self.remote else (self.out / "mlartifacts").as_uri(),
            local_dir=self.out / "tracking",
            data_root=self.out / "data",
            out_root=self.out,
            registered_model=registered_model,
            log_checkpoints=log_checkpoints,
            log=log,
        )
        self.report: dict[str, Any] | None = None

    def run_url(self, run_id: str | None) -> str | None:
        if not (self.remote and run_id):
            return None
        exp = self.pt.conn.experiment_id() if self.pt.conn.available() else None
        return f"{self.uri.rstrip('/')}/#/experiments/{exp}/runs/{run_id}" if exp else None

    @contextlib.contextmanager
    def pipeline(self, recipe: Any, params: dict[str, Any]) -> Iterator[None]:
        self.pt.start_pipeline(
            recipe,
            run_name=f"{recipe.name}:{self.out.name}",
            tags={
                "kimivl.out_dir": str(self.out),
                "kimivl.recipe_path": str(Path(params.get("recipe_path", "")).resolve()),
            },
        )
        status = "FAILED"
        try:
            yield None
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.report = self.pt.end_pipeline(status)

    def data_done(self, summary: dict[str, Any]) -> None:
        self.pt.log_data_summary(summary)

    @contextlib.contextmanager
    def phase(self, phase: Any, phase_dir: Path) -> Iterator[Tracker]:
        tr = self.pt.phase_tracker(phase.name)
        if tr.resumed:
            self._backfill(tr, Path(phase_dir) / "metrics.jsonl")
        with system_metrics(tr.run_id, self.uri, resume=tr.resumed, log=self.pt.log):
            yield TeeTracker(tr, JsonlTracker(phase_dir), run_url=self.run_url(tr.run_id))

    def _backfill(self, tr: Any, jsonl: Path) -> int:
        """A phase run found again after a crash: re-send the steps of the durable local record that never
        reached MLflow (a SIGKILL loses the tracker's unflushed buffer; the resumed phase recomputes only
        the steps after its last checkpoint). Returns how many steps were re-sent."""
        if not jsonl.is_file() or not (tr.run_id and self.pt.conn.available()):
            return 0
        try:
            delivered = {m.step for m in self.pt.conn.client.get_metric_history(tr.run_id, "loss")}
        except Exception as e:  # tracking trouble never stops training
            self.pt.log(f"[tracking] backfill skipped: {type(e).__name__}: {e}")
            return 0
        local: dict[int, dict[str, float]] = {}
        for line in jsonl.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            step = rec.pop("step", None)
            rec.pop("time", None)
            if isinstance(step, int) and "loss" in rec:
                local[step] = {k: v for k, v in rec.items() if isinstance(v, (int, float))}
        missing = sorted(set(local) - delivered)
        for step in missing:
            tr.log_metrics(local[step], step=step)
        if missing:
            self.pt.log(f"[tracking] re-sent {len(missing)} steps of {jsonl.parent.name} from {jsonl}")
        return len(missing)

    def phase_done(self, phase: Any, result: dict[str, Any]) -> dict[str, Any]:
        self.pt.finish_phase(phase.name, result)
        run_id = self.pt.phases[phase.name].run_id
        links = {"mlflow_run_id": run_id} if run_id else {}
        if url := self.run_url(run_id):
            links["mlflow_url"] = url
        return links

    def phase_replaced(self, phase: Any, old_dir: Path) -> None:
        self.pt.retire_phase(phase.name, Path(old_dir))

    def eval_done(self, point: str, result: dict[str, Any]) -> None:
        parent = self.pt.require_parent()
        parent.log_metrics({f"eval.{point}.{k}": float(v) for k, v in result["summary"].items()}, step=0)
        if result.get("dir"):
            parent.log_artifact(Path(result["dir"]), f"eval/{point}")

    def report_done(self, path: Path) -> None:
        self.pt.require_parent().log_artifact(Path(path), "eval")

    @property
    def parent_run_id(self) -> str | None:
        return self.pt.parent.run_id if self.pt.parent else None
