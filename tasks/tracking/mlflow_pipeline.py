"""The MLflow run tree of one pipeline run: a parent run per pipeline run, a nested run per phase.

``PipelineTracking``: ``start_pipeline`` (the parent run: the resolved recipe as params, truncated to
MLflow's limits, and in full as ``recipe.json``), ``phase_tracker`` (the nested run of a phase, found again by
its tags after a crash or a rerun, never duplicated; lineage tags; the phase's tokenized datasets as run
inputs with their manifest hash as digest), ``finish_phase`` (summary metrics, checkpoint lineage, the final
checkpoint registered as a model version), ``end_pipeline`` (loss and token plots, run statuses, and a report
of anything that could not be delivered: spooled for ``tasks.tracking.mlflow_after.replay_spool``).

Secrets: keys that look like credentials are redacted, values of credential-like environment variables and
``user:password@`` in URIs are masked in every param, tag and artifact written (``tasks.tracking.secrets``).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from tasks import Log
from tasks.io.manifest import ManifestError, code_version, config_hash, read_manifest
from tasks.tracking.mlflow_connection import Connection
from tasks.tracking.mlflow_names import (
    PARENT_TAG,
    PHASE_TAG,
    ROLE_TAG,
    RUN_KEY_TAG,
    SERIES_KEYS,
    is_remote,
    q,
)
from tasks.tracking.mlflow_plots import plot_loss_and_tokens
from tasks.tracking.mlflow_run import MlflowTracker, RunSpec
from tasks.tracking.secrets import flatten, redact, scrub

NOTE_TAG = "mlflow.note.content"  # the run's Description in the MLflow UI (Markdown)


def phase_note(phase: Any, recipe_name: str) -> str:
    """What a phase run's metrics mean, shown as its description in the MLflow UI."""
    return (
        f"Phase `{phase.name}` of stage `{phase.stage}` (objective `{phase.objective}`), recipe "
        f"`{recipe_name}`: {phase.token_budget:,} tokens at sequence length {phase.seq_len}.\n\n"
        "Metrics per optimizer step (x axis: step):\n"
        "- `loss`: that step's training loss, the mean per-token loss over its whole global batch (all "
        "ranks and micro-batches); the UI's single value is the **last** step's.\n"
        "- `lr`, `grad_norm` (-1: not finite), `skipped_steps` (non-finite steps so far), the objective's "
        "loss terms, `expert_load_max_over_mean` (MoE balance), `model_tflops_per_s` and `mfu_est` "
        "(estimated), `tokens_per_s`.\n"
        "- `tokens_total`, `tokens_text|image|video`, `tokens_source.NAME`: tokens consumed so far "
        "(padding excluded); the phase stops at its token budget.\n\n"
        "Logged once, at the last step:\n"
        "- `final_loss` / `first_loss`: the mean of the **last / first k** step losses, "
        "k = max(1, min(5, steps // 4)): steadier than one step's `loss`, so the two can differ.\n"
        "- `steps`, `tokens_final_*`, `share_final.GROUP` (the mixture's token shares).\n\n"
        "Lineage: tags `kimivl.parent_checkpoint.*` (where this phase started), `kimivl.checkpoint.*` "
        "(its final checkpoint, also a registered model version), `kimivl.dataset.*` (dataset versions). "
        "System metrics (`system/...`): CPU, memory, GPU of the training host while the phase ran."
    )


def pipeline_note(recipe: Any, out_root: Path | None) -> str:
    """The parent run's description in the MLflow UI."""
    where = f" into `{out_root}`" if out_root is not None else ""
    return (
        f"Pipeline run of recipe `{recipe.name}`{where}. Each phase is a nested run (expand this run in "
        "the runs table); its description says what its metrics mean. Here: `PHASE.final_loss`, "
        "`PHASE.steps`, `PHASE.tokens_final_*` per phase, `data.*` (data step counts), "
        "`eval.POINT.TASK/METRIC` (evaluation points); the resolved recipe as params and `recipe.json`; "
        "loss and token plots as artifacts."
    )


# --------------------------------------------------------------------------------------------- pipeline


class PipelineTracking:
    """A parent MLflow run per pipeline run and a nested run per phase (see the module docstring)."""

    def __init__(
        self,
        tracking_uri: str,
        *,
        experiment: str = "kimivl",
        artifact_location: str | None = None,
        local_dir: Path | None = None,
        data_root: Path | None = None,
        out_root: Path | None = None,
        registered_model: str | None = None,
        log_checkpoints: bool = True,
        flush_interval_s: float = 2.0,
        backoff_s: tuple[float, float] = (5.0, 120.0),
        log: Log = print,
    ) -> None:
        self.local_dir = Path(local_dir) if local_dir else Path.cwd() / "tracking"
        if artifact_location is None and not is_remote(tracking_uri):
            # a local store's default artifact root is ./mlruns of whatever the working directory is
            artifact_location = (self.local_dir / "mlartifacts").resolve().as_uri()
        self.conn = Connection(tracking_uri, experiment, artifact_location, backoff_s, log)
        self.data_root = Path(data_root) if data_root else None
        self.out_root = Path(out_root) if out_root else None
        self.registered_model = registered_model
        self.log_checkpoints = log_checkpoints
        self.flush_interval_s = flush_interval_s
        self.log = log
        self.recipe = None
        self.run_key = ""
        self.parent: MlflowTracker | None = None
        self.phases: dict[str, MlflowTracker] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self._finished: set[str] = set()

    # ---- helpers
    def _tracker(self, spec: RunSpec, parent: MlflowTracker | None) -> MlflowTracker:
        spool = self.local_dir / "spool" / self.run_key[:16] / spec.key
        return MlflowTracker(self.conn, spec, spool, parent=parent, flush_interval_s=self.flush_interval_s)

    def require_parent(self) -> MlflowTracker:
        if self.parent is None:
            raise RuntimeError("PipelineTracking: call start_pipeline(recipe, ...) before phase_tracker()")
        return self.parent

    def _dataset_versions(self, names: list[str]) -> dict[str, tuple[str, Path, dict]]:
        out: dict[str, tuple[str, Path, dict]] = {}
        if self.data_root is None:
            return out
        for n in names:
            d = self.data_root / "tokenized" / n
            try:
                m = read_manifest(d)
            except ManifestError:
                continue
            out[n] = (m.content_hash, d.resolve(), m.counts)
        return out

    # ---- API
    def start_pipeline(
        self,
        recipe: Any,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        *,
        run_key: str | None = None,
    ) -> str | None:
        """Find or create the parent run; log the recipe. Returns its run id (None while unreachable)."""
        self.recipe = recipe
        if run_key is None:
            where = str(self.out_root.resolve()) if self.out_root else uuid.uuid4().hex
            run_key = config_hash({"recipe": config_hash(recipe), "out": where})
        self.run_key = run_key
        self.registered_model = self.registered_model or f"kimivl-{recipe.name}"
        spec = RunSpec(
            "pipeline",
            run_name or f"{recipe.name}-{run_key[:8]}",
            {ROLE_TAG: "pipeline", RUN_KEY_TAG: run_key},
        )
        self.parent = self._tracker(spec, None)
        rd = recipe.model_dump(mode="json", by_alias=True)
        phases = {p["name"]: p for p in rd.pop("phases", [])}
        self.parent.log_params({**rd, "phases": phases})
        full = self.local_dir / "recipe.json"
        full.parent.mkdir(parents=True, exist_ok=True)
        full.write_text(
            scrub(json.dumps(redact({**rd, "phases": list(phases.values())}), indent=2, sort_keys=True))
        )
        self.parent.log_artifact(full)
        self.parent.set_tags(
            {
                **(tags or {}),
                "kimivl.recipe": recipe.name,
                "kimivl.recipe_hash": config_hash(recipe),
                "kimivl.code_version": code_version(),
                "kimivl.phases": ",".join(phases),
                NOTE_TAG: pipeline_note(recipe, self.out_root),
            }
        )
        return self.parent.run_id

    def log_data_summary(self, summary: dict[str, Any]) -> None:
        """Data step counts (``run_data_all``'s summary) as parent metrics; dataset versions as tags."""
        parent = self.require_parent()
        flat = flatten(summary)
        metrics = {
            f"data.{k}": float(v)
            for k, v in flat.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        parent.log_metrics(metrics, step=0)
        versions = self._dataset_versions(sorted(summary.get("tokenized", {})))
        parent.set_tags({f"kimivl.dataset.{n}": h for n, (h, _, _) in versions.items()})

    def phase_tracker(self, phase_name: str) -> MlflowTracker:
        """The nested run of a phase: created once, found again (by tags) after a crash or a rerun."""
        if phase_name in self.phases:
            return self.phases[phase_name]
        parent = self.require_parent()
        phase = self.recipe.phase(phase_name)
        spec = RunSpec(
            f"phase-{phase_name}",
            phase_name,
            {ROLE_TAG: "phase", PHASE_TAG: phase_name, RUN_KEY_TAG: self.run_key},
        )
        tr = self._tracker(spec, parent)
        self.phases[phase_name] = tr
        versions = self._dataset_versions([s.name for s in phase.sources])
        tags = {
            "kimivl.stage": phase.stage,
            "kimivl.objective": phase.objective,
            "kimivl.recipe": self.recipe.name,
            "kimivl.code_version": code_version(),
            "kimivl.datasets": json.dumps({n: h for n, (h, _, _) in versions.items()}, sort_keys=True),
            **{f"kimivl.dataset.{n}": h for n, (h, _, _) in versions.items()},
            **self._parent_checkpoint(phase_name),
            NOTE_TAG: phase_note(phase, self.recipe.name),
        }
        tr.set_tags(tags)
        tr.log_datasets(
            [
                {"name": n, "content_hash": h, "source": str(p), "counts": c}
                for n, (h, p, c) in versions.items()
            ]
        )
        if tr.run_id and parent.run_id:
            parent.set_tags({f"kimivl.phase_run.{phase_name}": tr.run_id})
        return tr

    def _parent_checkpoint(self, phase_name: str) -> dict[str, str]:
        names = [p.name for p in self.recipe.phases]
        i = names.index(phase_name)
        phase = self.recipe.phases[i]
        init = self.recipe.model.init_checkpoint
        if phase.init_from == "scratch" or i == 0:
            uri = str(init) if init else "scratch"
            return {
                "kimivl.parent_checkpoint.uri": uri,
                "kimivl.parent_checkpoint.hash": "init" if init else "none",
            }
        if self.out_root is not None:
            prev = self.out_root / "phases" / names[i - 1] / "final"
            try:
                m = read_manifest(prev)
                return {
                    "kimivl.parent_checkpoint.uri": str(prev.resolve()),
                    "kimivl.parent_checkpoint.hash": m.content_hash,
                }
            except ManifestError:
                pass
        return {
            "kimivl.parent_checkpoint.uri": f"phase:{names[i - 1]}",
            "kimivl.parent_checkpoint.hash": "unknown",
        }

    def finish_phase(self, phase_name: str, result: dict[str, Any]) -> None:
        """Summary metrics, checkpoint lineage from the final manifest, model version; ends the phase run."""
        tr = self.phase_tracker(phase_name)
        parent = self.require_parent()
        self.results[phase_name] = result
        tok = result.get("tokens", {})
        summary = {
            "final_loss": result.get("final_loss"),
            "first_loss": result.get("first_loss"),
            "steps": result.get("steps"),
            "skipped_steps": result.get("skipped_steps"),
            **{f"tokens_final_{k}": v for k, v in tok.items()},
            **{f"tokens_final_source.{k}": v for k, v in result.get("tokens_by_source", {}).items()},
            **{
                f"share_final.{g}": v / max(tok.get("total", 0), 1)
                for g, v in result.get("tokens_by_group", {}).items()
            },
        }
        summary = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float))}
        tr.log_metrics(summary, step=int(result.get("steps", 0)))
        parent.log_metrics({f"{phase_name}.{k}": v for k, v in summary.items()}, step=0)
        if "checkpoint" not in result:  # an interrupted phase (``stop_after_steps``): nothing to register
            return
        fdir = Path(result["checkpoint"])
        tags = {"kimivl.checkpoint.uri": str(fdir)}
        try:
            m = read_manifest(fdir)
            ds_names = {s.name for s in self.recipe.phase(phase_name).sources}
            ckpt_parents = [
                p for p in m.parents if Path(p.uri).name not in ds_names or "tokenized" not in p.uri
            ]
            tags["kimivl.checkpoint.hash"] = m.content_hash
            if ckpt_parents:
                tags["kimivl.parent_checkpoint.uri"] = ckpt_parents[0].uri
                tags["kimivl.parent_checkpoint.hash"] = ckpt_parents[0].content_hash
            ds = {Path(p.uri).name: p.content_hash for p in m.parents if p not in ckpt_parents}
            tags["kimivl.datasets"] = json.dumps(ds, sort_keys=True)
            tags.update({f"kimivl.dataset.{n}": h for n, h in ds.items()})
        except ManifestError as e:
            self.log(f"[tracking] {phase_name}: no checkpoint manifest ({e})")
        tr.set_tags(tags)
        lineage = {
            PHASE_TAG: phase_name,
            "kimivl.stage": str(result.get("stage", "")),
            "kimivl.recipe": self.recipe.name,
            "kimivl.code_version": code_version(),
            **self._parent_checkpoint(phase_name),
            **tags,
        }
        art = f"{phase_name}-final"
        if self.log_checkpoints:
            if art not in tr.artifact_names:  # the runner logs it when it trains; a rerun does not
                tr.log_artifact(fdir, art)
            tr.register_model(self.registered_model, art, None, lineage)
        else:
            tr.register_model(self.registered_model, None, fdir.resolve().as_uri(), lineage)
        tr.terminate("FINISHED")
        self._finished.add(phase_name)
        if tr.run_id:
            parent.set_tags({f"kimivl.phase_run.{phase_name}": tr.run_id})

    def end_pipeline(self, status: str = "FINISHED") -> dict[str, Any]:
        """Plots, final statuses, one last delivery attempt; reports what could not be delivered."""
        parent = self.require_parent()
        for name, tr in self.phases.items():
            if name not in self._finished:
                tr.terminate(status if status != "FINISHED" else "KILLED")
        plots: list[str] = []
        try:
            plots = [str(p) for p in plot_loss_and_tokens(self)]
            for p in plots:
                parent.log_artifact(Path(p), "plots")
        except Exception as e:  # plots are a convenience: never fail the pipeline for them
            self.log(f"[tracking] plots skipped: {type(e).__name__}: {e}")
        parent.terminate(status)
        for tr in [*self.phases.values(), parent]:
            tr.flush(force=True)
        undelivered = {tr.spec.key: tr.pending() for tr in [parent, *self.phases.values()]}
        undelivered = {k: v for k, v in undelivered.items() if v}
        rejected = sum(tr.rejected for tr in [parent, *self.phases.values()])
        spool = self.local_dir / "spool" / self.run_key[:16]
        report = {
            "parent_run_id": parent.run_id,
            "phase_run_ids": {n: t.run_id for n, t in self.phases.items()},
            "status": status,
            "tracking_uri": scrub(self.conn.tracking_uri),
            "experiment": self.conn.experiment,
            "undelivered": sum(undelivered.values()),
            "undelivered_by_run": undelivered,
            "rejected": rejected,
            "spool_dir": str(spool),
            "plots": plots,
        }
        if undelivered:
            self.log(
                f"[tracking] WARNING: {report['undelivered']} records were NOT delivered to "
                f"{report['tracking_uri']} ({undelivered}); they are spooled in {spool}: deliver them later "
                f"with tasks.tracking.mlflow_after.replay_spool({str(spool)!r}, TRACKING_URI)"
            )
        if rejected:
            self.log(f"[tracking] {rejected} records were rejected by MLflow: see {spool}/*/rejected.jsonl")
        return report

    def retire_phase(self, name: str, old_dir: Path) -> str | None:
        """A forced rerun: this pipeline's run of phase ``name`` stops being the one found again (its run
        key gets a ``:replaced:`` suffix, ``kimivl.replaced_dir`` says where its directory went); it keeps
        everything it recorded. Returns its run id (None when there was none or the store is down)."""
        run_id = self.phase_run_id(name)
        if run_id is None:
            return None
        try:
            c = self.conn.client
            c.set_tag(run_id, RUN_KEY_TAG, f"{self.run_key}:replaced:{old_dir.name}")
            c.set_tag(run_id, "kimivl.replaced_dir", str(old_dir))
            if c.get_run(run_id).info.status == "RUNNING":  # a crashed attempt never finished
                c.set_terminated(run_id, "KILLED")
        except Exception as e:  # tracking trouble never stops training; the new run then continues it
            self.log(f"[tracking] {name}: could not retire the replaced run {run_id}: {e}")
            return None
        self.phases.pop(name, None)
        self._finished.discard(name)
        self.log(f"[tracking] {name}: the replaced training stays in MLflow run {run_id}")
        return run_id

    # ---- series (for the plots)
    def phase_run_id(self, name: str) -> str | None:
        """This pipeline's run of a phase: tracked in this process, or found in the store (a rerun)."""
        if name in self.phases:
            return self.phases[name].run_id
        parent = self.parent.run_id if self.parent else None
        if parent is None or not self.conn.available():
            return None
        try:
            tags = {ROLE_TAG: "phase", PHASE_TAG: name, RUN_KEY_TAG: self.run_key, PARENT_TAG: parent}
            filt = " and ".join(f"tags.`{k}` = '{q(v)}'" for k, v in tags.items())
            found = self.conn.client.search_runs(
                [self.conn.experiment_id()], filter_string=filt, max_results=1
            )
            return found[0].info.run_id if found else None
        except Exception:
            return None

    def phase_series(self, name: str) -> dict[str, dict[int, float]] | None:
        """Loss and token series of a phase: the store's history, completed by what is still undelivered."""
        run_id, tr = self.phase_run_id(name), self.phases.get(name)
        if run_id is None and tr is None:
            return None
        series: dict[str, dict[int, float]] = {k: {} for k in SERIES_KEYS}
        if run_id and self.conn.available():
            try:
                for k in SERIES_KEYS:
                    for m in self.conn.client.get_metric_history(run_id, k):
                        series[k][m.step] = m.value
            except Exception:
                pass
        for k in SERIES_KEYS:
            series[k].update(tr.series[k] if tr else {})
        return series
