"""MLflow tracking: a ``Tracker`` per MLflow run, and a parent run per pipeline with a nested run per phase.

``MlflowTracker`` implements the ``tasks.tracking.Tracker`` protocol for one run. It never raises into
training: records are buffered in memory and delivered in batches (every ``flush_interval_s`` or when a
non-metric record arrives). When delivery fails (tracking server down, database locked) everything
undelivered is appended to a local spool (``tasks.tracking.JsonlTracker`` files plus ``inputs.json``,
``register.json``, ``terminal.json``, ``run.json`` in ``SPOOL/<run>/``) and retried on the next call after
an exponential back-off; the spool is delivered first, then emptied. ``replay_spool`` delivers a spool left
by a process that ended while the server was down. MLflow rejections (a bad value, a changed param) are
not retried: they are written to ``rejected.jsonl`` and reported.

``PipelineTracking`` manages the run tree: ``start_pipeline`` (parent run: the resolved recipe as params,
truncated to MLflow's limits, and in full as ``recipe.json``), ``phase_tracker`` (nested run per phase,
found again by its tags after a crash or a rerun, never duplicated; lineage tags; the phase's tokenized
datasets as run inputs with the manifest hash as digest), ``finish_phase`` (summary metrics, checkpoint
lineage, the final checkpoint registered as a model version), ``end_pipeline`` (plots, run status, and a
report of anything that could not be delivered).

Secrets: keys that look like credentials are redacted (``redact_keys``), values of credential-like
environment variables and ``user:password@`` in URIs are masked in every param, tag and artifact written.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.faults import crash_point
from tasks.manifest import ManifestError, code_version, config_hash, read_manifest
from tasks.tracking import JsonlTracker, flatten, redact, scrub

Log = Callable[[str], Any]

ROLE_TAG = "kimivl.role"  # "pipeline" | "phase"
PHASE_TAG = "kimivl.phase"
RUN_KEY_TAG = "kimivl.run_key"
PARENT_TAG = "mlflow.parentRunId"
MAX_KEY, MAX_PARAM, MAX_TAG, MAX_DIGEST = 250, 6000, 8000, 36
_TRUNC = "...[truncated]"
# MLflow error codes that retrying cannot fix: the record is rejected, not spooled for retry
_PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST"}
_SERIES_KEYS = ("loss", "tokens_total", "tokens_text", "tokens_image", "tokens_video")


# --------------------------------------------------------------------------------------------- secrets


# one rule for what counts as a credential and one scrubber, shared with the JSONL/memory trackers
# (``tasks.tracking.is_secret_key`` / ``scrub``)
redact_keys = redact


def _clip(s: str, limit: int) -> str:
    return s if len(s) <= limit else s[: limit - len(_TRUNC)] + _TRUNC


def clean_params(params: dict[str, Any]) -> dict[str, str]:
    """Flattened, redacted, scrubbed string params within MLflow's key/value length limits."""
    return {
        _clip(k, MAX_KEY): _clip(scrub(str(v)), MAX_PARAM) for k, v in flatten(redact_keys(params)).items()
    }


def clean_tags(tags: dict[str, Any]) -> dict[str, str]:
    return {_clip(k, MAX_KEY): _clip(scrub(str(v)), MAX_TAG) for k, v in redact_keys(tags).items()}


# --------------------------------------------------------------------------------------------- records


@dataclass
class _Batch:
    """Undelivered records of one run (delivery pops what it delivered, so a failure keeps the rest)."""

    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: list[tuple[int, float, dict[str, float]]] = field(default_factory=list)  # (step, time s, values)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[tuple[str, str | None]] = field(default_factory=list)
    register: list[dict[str, Any]] = field(default_factory=list)
    terminal: tuple[str, float] | None = None

    def count(self) -> int:
        n = len(self.params) + len(self.tags) + sum(len(m) for _, _, m in self.metrics)
        return n + len(self.inputs) + len(self.artifacts) + len(self.register) + (self.terminal is not None)


def _read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


class _Spool:
    """One run's undelivered records on disk (JsonlTracker files + a few JSON lists)."""

    FILES = ("metrics.jsonl", "params.json", "tags.json", "artifacts.json", "inputs.json", "register.json")

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    def append(self, b: _Batch) -> None:
        j = JsonlTracker(self.dir)  # params/tags are already clean: merged here, not re-redacted by j
        for fname, d in (("params.json", b.params), ("tags.json", b.tags)):
            if d:
                _write_json(self.dir / fname, {**_read_json(self.dir / fname, {}), **d})
        for step, t, values in b.metrics:
            j.log_metrics({**values, "time": t}, step=step)  # "time" overrides the write time
        for path, name in b.artifacts:
            j.log_artifact(Path(path), name)
        for fname, items in (("inputs.json", b.inputs), ("register.json", b.register)):
            if items:
                _write_json(self.dir / fname, _read_json(self.dir / fname, []) + items)
        if b.terminal is not None:
            _write_json(self.dir / "terminal.json", list(b.terminal))

    def read(self) -> _Batch:
        b = _Batch(
            params=_read_json(self.dir / "params.json", {}),
            tags=_read_json(self.dir / "tags.json", {}),
            inputs=_read_json(self.dir / "inputs.json", []),
            register=_read_json(self.dir / "register.json", []),
        )
        b.artifacts = [(p, n) for n, p in _read_json(self.dir / "artifacts.json", {}).items()]
        if (self.dir / "metrics.jsonl").is_file():
            for line in (self.dir / "metrics.jsonl").read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    step, t = int(rec.pop("step")), float(rec.pop("time"))
                    b.metrics.append((step, t, {k: float(v) for k, v in rec.items()}))
        term = _read_json(self.dir / "terminal.json", None)
        b.terminal = (term[0], float(term[1])) if term else None
        return b

    def has_records(self) -> bool:
        return any((self.dir / f).is_file() for f in (*self.FILES, "terminal.json"))

    def replace(self, b: _Batch) -> None:
        """Make the spool hold exactly ``b`` (what is still undelivered)."""
        for f in (*self.FILES, "terminal.json"):
            (self.dir / f).unlink(missing_ok=True)
        if b.count():
            self.append(b)

    def reject(self, what: str, payload: Any, err: Exception) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "rejected.jsonl", "a") as f:
            f.write(
                json.dumps({"what": what, "payload": payload, "error": str(err)[:500]}, default=str) + "\n"
            )


# --------------------------------------------------------------------------------------------- connection


class _Connection:
    """The MLflow client of one tracking URI plus the shared down/back-off state."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        artifact_location: str | None = None,
        backoff_s: tuple[float, float] = (5.0, 120.0),
        log: Log = print,
    ) -> None:
        self.tracking_uri, self.experiment, self.artifact_location = (
            tracking_uri,
            experiment,
            artifact_location,
        )
        self.backoff_s, self.log = backoff_s, log
        self._client = None
        self._experiment_id: str | None = None
        self.delay = 0.0
        self.next_try = 0.0
        self.down_since: float | None = None
        if tracking_uri.startswith(("http://", "https://")):
            # a down server must cost seconds, not MLflow's default of minutes of retries per call
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    def available(self) -> bool:
        return time.monotonic() >= self.next_try

    def failed(self, err: Exception) -> None:
        base, cap = self.backoff_s
        self.delay = min(cap, max(base, self.delay * 2))
        self.next_try = time.monotonic() + self.delay
        if self.down_since is None:
            self.down_since = time.time()
            self.log(
                f"[tracking] {scrub(self.tracking_uri)} unreachable ({scrub(str(err))[:200]}); "
                f"spooling locally, retry in {self.delay:.0f} s"
            )

    def ok(self) -> None:
        if self.down_since is not None:
            self.log(
                f"[tracking] {scrub(self.tracking_uri)} reachable again after {time.time() - self.down_since:.0f} s"
            )
        self.delay, self.next_try, self.down_since = 0.0, 0.0, None

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment, artifact_location=self.artifact_location
                    )
                except Exception as e:  # created concurrently
                    if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                        raise
                    self._experiment_id = self.client.get_experiment_by_name(self.experiment).experiment_id
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id


def _permanent(err: Exception) -> bool:
    return isinstance(err, FileNotFoundError) or getattr(err, "error_code", None) in _PERMANENT


@functools.cache
def _manifest_dataset_cls() -> type:
    from mlflow.data.meta_dataset import MetaDataset

    class ManifestDataset(MetaDataset):
        """A tokenized dataset known by its manifest: digest = content hash (MLflow keeps 36 chars), the
        full hash and the counts in the profile."""

        def __init__(self, source: Any, name: str, content_hash: str, counts: dict[str, Any]) -> None:
            self._profile = {"content_hash": content_hash, "counts": counts}
            super().__init__(source, name=name, digest=content_hash[:MAX_DIGEST])

        @property
        def profile(self) -> dict[str, Any]:
            return self._profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self._profile, sort_keys=True, default=str)}

    return ManifestDataset


def _manifest_dataset(source: Any, name: str, content_hash: str, counts: dict[str, Any]) -> Any:
    return _manifest_dataset_cls()(source, name, content_hash, counts)


def _q(v: str) -> str:
    return v.replace("\\", "\\\\").replace("'", "\\'")


# --------------------------------------------------------------------------------------------- tracker


@dataclass
class RunSpec:
    """How to find (or create) a run: ``lookup`` tags identify it, so a rerun reuses it."""

    key: str  # spool directory name
    run_name: str
    lookup: dict[str, str]
    run_id: str | None = None


class MlflowTracker:
    """``Tracker`` for one MLflow run; every call is non-raising (see the module docstring)."""

    def __init__(
        self,
        conn: _Connection,
        spec: RunSpec,
        spool_dir: Path,
        *,
        parent: MlflowTracker | None = None,
        flush_interval_s: float = 2.0,
        max_buffer: int = 1000,
    ) -> None:
        self._conn, self.spec, self.parent = conn, spec, parent
        self._spool = _Spool(spool_dir)
        self._mem = _Batch()
        self.flush_interval_s, self.max_buffer = flush_interval_s, max_buffer
        self._last_flush = time.monotonic()
        self._remote_params: dict[str, str] = {}
        self.resumed = False
        self.rejected = 0
        self.artifact_names: set[str] = set()
        self.series: dict[str, dict[int, float]] = {k: {} for k in _SERIES_KEYS}
        self.last: dict[str, float] = {}

    # ---- identity
    @property
    def run_id(self) -> str | None:
        return self.spec.run_id

    @property
    def spool_dir(self) -> Path:
        return self._spool.dir

    def _ensure_run(self) -> str:
        if self.spec.run_id is not None:
            return self.spec.run_id
        c = self._conn.client
        exp = self._conn.experiment_id()
        tags = dict(self.spec.lookup)
        if self.parent is not None:
            tags[PARENT_TAG] = self.parent._ensure_run()
        filt = " and ".join(f"tags.`{k}` = '{_q(v)}'" for k, v in tags.items())
        found = c.search_runs(
            [exp], filter_string=filt, max_results=1, order_by=["attributes.start_time ASC"]
        )
        if found:
            run = found[0]
            self.resumed = True
            self._remote_params = dict(run.data.params)
            if run.info.status != "RUNNING":
                c.update_run(run.info.run_id, status="RUNNING")
        else:
            run = c.create_run(exp, run_name=self.spec.run_name, tags=tags)
        self.spec.run_id = run.info.run_id
        return self.spec.run_id

    # ---- Tracker protocol
    def log_params(self, params: dict[str, Any]) -> None:
        self._guard(lambda: self._mem.params.update(clean_params(params)), urgent=True)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._guard(lambda: self._mem.tags.update(clean_tags(tags)), urgent=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        def add() -> None:
            vals = {str(k): float(v) for k, v in metrics.items()}
            self._mem.metrics.append((int(step), time.time(), vals))
            self.last.update(vals)
            for k in _SERIES_KEYS:
                if k in vals:
                    self.series[k][int(step)] = vals[k]

        self._guard(add, urgent=False)

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        """A file (stored under ``name/`` when a different ``name`` is given) or a directory (under
        ``name``, default its own name)."""

        def add() -> None:
            p = Path(path).resolve()
            self._mem.artifacts.append((str(p), name))
            self.artifact_names.add(name or p.name)

        self._guard(add, urgent=True)

    # ---- extras
    def log_datasets(self, datasets: list[dict[str, Any]]) -> None:
        """Run inputs: ``[{"name", "content_hash", "source", "counts"}]`` (a tokenized dataset's manifest)."""

        def add() -> None:
            for d in datasets:
                self._mem.inputs.append(
                    {
                        "name": d["name"],
                        "content_hash": d["content_hash"],
                        "source": scrub(str(d["source"])),
                        "counts": d.get("counts") or {},
                    }
                )

        self._guard(add, urgent=True)

    def register_model(
        self, model_name: str, artifact_path: str | None, source: str | None, tags: dict[str, str]
    ) -> None:
        """Register ``runs:/<run>/<artifact_path>`` (or ``source`` when given) as a version of ``model_name``."""
        rec = {
            "model": model_name,
            "artifact_path": artifact_path,
            "source": source,
            "tags": clean_tags(tags),
        }
        self._guard(lambda: self._mem.register.append(rec), urgent=True)

    def terminate(self, status: str = "FINISHED") -> None:
        def add() -> None:
            self._mem.terminal = (status, time.time())

        self._guard(add, urgent=True)

    def pending(self) -> int:
        """Records not delivered yet (memory + spool)."""
        try:
            return self._mem.count() + (self._spool.read().count() if self._spool.has_records() else 0)
        except Exception:
            return self._mem.count()

    def flush(self, force: bool = True) -> bool:
        """Deliver everything now (``force`` ignores the back-off); True when nothing is left undelivered."""
        try:
            return self._flush(force)
        except Exception as e:  # never raise into the caller
            self._conn.log(f"[tracking] flush failed: {e}")
            return False

    # ---- internals
    def _guard(self, add: Callable[[], None], urgent: bool) -> None:
        try:
            add()
            due = (
                urgent
                or len(self._mem.metrics) >= self.max_buffer
                or time.monotonic() - self._last_flush >= self.flush_interval_s
            )
            if due:
                self._flush(force=False)
        except Exception as e:  # a tracking problem must never stop training
            self._conn.log(f"[tracking] dropped a record: {type(e).__name__}: {e}")

    def _write_meta(self) -> None:
        self._spool.dir.mkdir(parents=True, exist_ok=True)
        meta = {
            "key": self.spec.key,
            "run_id": self.spec.run_id,
            "run_name": self.spec.run_name,
            "lookup": self.spec.lookup,
            "parent": self.parent.spec.key if self.parent else None,
            "tracking_uri": scrub(self._conn.tracking_uri),
            "experiment": self._conn.experiment,
            "artifact_location": self._conn.artifact_location,
        }
        _write_json(self._spool.dir / "run.json", meta)
        if self.parent is not None:
            self.parent._write_meta()

    def _spill(self) -> None:
        if self._mem.count():
            self._write_meta()
            self._spool.append(self._mem)
            self._mem = _Batch()

    def _flush(self, force: bool) -> bool:
        self._last_flush = time.monotonic()
        if not force and not self._conn.available():
            self._spill()
            return False
        try:
            run_id = self._ensure_run()
            if self._spool.has_records():
                b = self._spool.read()
                n = b.count()
                try:
                    self._deliver(run_id, b)
                finally:
                    self._spool.replace(b)
                self._conn.log(
                    f"[tracking] delivered {n} spooled records of {self.spec.key} ({self._spool.dir})"
                )
            self._deliver(run_id, self._mem)
        except Exception as e:
            self._conn.failed(e)
            self._spill()
            return False
        self._conn.ok()
        return True

    def _try(self, what: str, payload: Any, fn: Callable[..., Any], *args: Any) -> None:
        """Run one delivery; a permanent MLflow rejection is recorded and skipped, anything else raises."""
        try:
            fn(*args)
        except Exception as e:
            if not _permanent(e):
                raise
            self.rejected += 1
            self._spool.reject(what, payload, e)
            self._conn.log(f"[tracking] MLflow rejected {what} of {self.spec.key}: {str(e)[:200]}")

    def _deliver(self, run_id: str, b: _Batch) -> None:
        from mlflow.entities import Metric, Param, RunTag

        crash_point("mlflow:deliver")
        c = self._conn.client
        if b.params:
            new = {k: v for k, v in b.params.items() if self._remote_params.get(k) != v}
            changed = {k: v for k, v in new.items() if k in self._remote_params}
            for k in changed:  # params are immutable in MLflow: keep the first value, report the change
                self._spool.reject(
                    "param change", {k: changed[k]}, ValueError(f"already {self._remote_params[k]!r}")
                )
                self.rejected += 1
                new.pop(k)
            items = sorted(new.items())
            for i in range(0, len(items), 100):
                chunk = items[i : i + 100]
                self._try(
                    "params",
                    dict(chunk),
                    lambda ch=chunk: c.log_batch(run_id, params=[Param(k, v) for k, v in ch]),
                )
                self._remote_params.update(chunk)
            b.params = {}
        if b.tags:
            items = sorted(b.tags.items())
            for i in range(0, len(items), 100):
                chunk = items[i : i + 100]
                self._try(
                    "tags",
                    dict(chunk),
                    lambda ch=chunk: c.log_batch(run_id, tags=[RunTag(k, v) for k, v in ch]),
                )
                for k, _ in chunk:
                    b.tags.pop(k)
        while b.metrics:  # consecutive steps, at most 1000 values per request (MLflow's batch limit)
            k, n = 0, 0
            while k < len(b.metrics) and (k == 0 or n + len(b.metrics[k][2]) <= 1000):
                n += len(b.metrics[k][2])
                k += 1
            rows = b.metrics[:k]
            ms = [Metric(key, v, int(t * 1000), step) for step, t, vals in rows for key, v in vals.items()]
            self._try("metrics", rows, lambda ms=ms: c.log_batch(run_id, metrics=ms))
            del b.metrics[:k]
        if b.inputs:
            self._deliver_inputs(run_id, b)
        while b.artifacts:
            path, name = b.artifacts[0]
            self._try("artifact", [path, name], self._upload, run_id, Path(path), name)
            b.artifacts.pop(0)
        while b.register:
            rec = b.register[0]
            self._try("model version", rec, self._register, run_id, rec)
            b.register.pop(0)
        if b.terminal is not None:
            status, t = b.terminal
            self._try("status", status, lambda: c.set_terminated(run_id, status, end_time=int(t * 1000)))
            b.terminal = None

    def _deliver_inputs(self, run_id: str, b: _Batch) -> None:
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.entities import DatasetInput, InputTag

        c = self._conn.client
        have = {(d.dataset.name, d.dataset.digest) for d in c.get_run(run_id).inputs.dataset_inputs}
        todo = []
        for rec in b.inputs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                src = resolve_dataset_source(rec["source"])
            ent = _manifest_dataset(src, rec["name"], rec["content_hash"], rec["counts"])._to_mlflow_entity()
            if (ent.name, ent.digest) not in have:
                tags = [
                    InputTag("mlflow.data.context", "train"),
                    InputTag("kimivl.content_hash", rec["content_hash"]),
                ]
                todo.append(DatasetInput(ent, tags=tags))
        if todo:
            self._try("dataset inputs", b.inputs, lambda: c.log_inputs(run_id, datasets=todo))
        b.inputs = []

    def _upload(self, run_id: str, path: Path, name: str | None) -> None:
        c = self._conn.client
        if not path.exists():
            raise FileNotFoundError(f"artifact {path} no longer exists")
        if path.is_dir():
            c.log_artifacts(run_id, str(path), artifact_path=name or path.name)
        else:
            c.log_artifact(run_id, str(path), artifact_path=name if name and name != path.name else None)

    def _register(self, run_id: str, rec: dict[str, Any]) -> None:
        c = self._conn.client
        name = rec["model"]
        try:
            c.create_registered_model(name, description="Kimi-VL checkpoints: one version per finished phase")
        except Exception as e:
            if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        phase = rec["tags"].get(PHASE_TAG, "")
        for mv in c.search_model_versions(f"name = '{_q(name)}' and run_id = '{run_id}'"):
            if mv.tags.get(PHASE_TAG, "") == phase:
                return  # already registered (a rerun or a replayed spool)
        source = rec["source"] or f"runs:/{run_id}/{rec['artifact_path']}"
        c.create_model_version(name, source, run_id=run_id, tags=rec["tags"], await_creation_for=0)


# --------------------------------------------------------------------------------------------- pipeline


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


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
        if artifact_location is None and not _is_remote(tracking_uri):
            # a local store's default artifact root is ./mlruns of whatever the working directory is
            artifact_location = (self.local_dir / "mlartifacts").resolve().as_uri()
        self.conn = _Connection(tracking_uri, experiment, artifact_location, backoff_s, log)
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

    def _require_parent(self) -> MlflowTracker:
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
            scrub(json.dumps(redact_keys({**rd, "phases": list(phases.values())}), indent=2, sort_keys=True))
        )
        self.parent.log_artifact(full)
        self.parent.set_tags(
            {
                **(tags or {}),
                "kimivl.recipe": recipe.name,
                "kimivl.recipe_hash": config_hash(recipe),
                "kimivl.code_version": code_version(),
                "kimivl.phases": ",".join(phases),
            }
        )
        return self.parent.run_id

    def log_data_summary(self, summary: dict[str, Any]) -> None:
        """Data step counts (``run_data_all``'s summary) as parent metrics; dataset versions as tags."""
        parent = self._require_parent()
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
        parent = self._require_parent()
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
        parent = self._require_parent()
        self.results[phase_name] = result
        tok = result.get("tokens", {})
        summary = {
            "final_loss": result.get("final_loss"),
            "first_loss": result.get("first_loss"),
            "steps": result.get("steps"),
            "skipped_steps": result.get("skipped_steps"),
            **{f"tokens_final_{k}": v for k, v in tok.items()},
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
        parent = self._require_parent()
        for name, tr in self.phases.items():
            if name not in self._finished:
                tr.terminate(status if status != "FINISHED" else "KILLED")
        plots: list[str] = []
        try:
            plots = [str(p) for p in self._plots()]
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
                f"with tasks.tracking_mlflow.replay_spool({str(spool)!r}, TRACKING_URI)"
            )
        if rejected:
            self.log(f"[tracking] {rejected} records were rejected by MLflow: see {spool}/*/rejected.jsonl")
        return report

    # ---- plots
    def _phase_run_id(self, name: str) -> str | None:
        """This pipeline's run of a phase: tracked in this process, or found in the store (a rerun)."""
        if name in self.phases:
            return self.phases[name].run_id
        parent = self.parent.run_id if self.parent else None
        if parent is None or not self.conn.available():
            return None
        try:
            tags = {ROLE_TAG: "phase", PHASE_TAG: name, RUN_KEY_TAG: self.run_key, PARENT_TAG: parent}
            filt = " and ".join(f"tags.`{k}` = '{_q(v)}'" for k, v in tags.items())
            found = self.conn.client.search_runs(
                [self.conn.experiment_id()], filter_string=filt, max_results=1
            )
            return found[0].info.run_id if found else None
        except Exception:
            return None

    def _phase_series(self, name: str) -> dict[str, dict[int, float]] | None:
        """Loss and token series of a phase: the store's history, completed by what is still undelivered."""
        run_id, tr = self._phase_run_id(name), self.phases.get(name)
        if run_id is None and tr is None:
            return None
        series: dict[str, dict[int, float]] = {k: {} for k in _SERIES_KEYS}
        if run_id and self.conn.available():
            try:
                for k in _SERIES_KEYS:
                    for m in self.conn.client.get_metric_history(run_id, k):
                        series[k][m.step] = m.value
            except Exception:
                pass
        for k in _SERIES_KEYS:
            series[k].update(tr.series[k] if tr else {})
        return series

    def _plots(self) -> list[Path]:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        out = self.local_dir / "plots"
        out.mkdir(parents=True, exist_ok=True)
        all_series = {p.name: self._phase_series(p.name) for p in self.recipe.phases}
        order = [n for n, s in all_series.items() if s is not None]
        fig = Figure(figsize=(10, 4.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        offset, bars = 0.0, {}
        for name in order:
            s = all_series[name]
            steps = sorted(set(s["loss"]) & set(s["tokens_total"]))
            xs = [offset + s["tokens_total"][i] for i in steps]
            if xs:
                ax.plot(xs, [s["loss"][i] for i in steps], lw=1.2, label=name)
            if offset > 0:
                ax.axvline(offset, color="grey", ls="--", lw=0.8)
            ax.text(
                offset,
                0.99,
                f" {name}",
                rotation=90,
                va="top",
                fontsize=7,
                transform=ax.get_xaxis_transform(),
            )
            res_tok = self.results.get(name, {}).get("tokens", {})
            total = float(res_tok.get("total", max(s["tokens_total"].values(), default=0.0)))
            offset += total
            bars[name] = {
                m: float(res_tok.get(m, max(s[f"tokens_{m}"].values(), default=0.0)))
                for m in ("text", "image", "video")
            }
        ax.set_xlim(left=0, right=max(offset, 1.0))
        ax.set_xlabel("cumulative training tokens")
        ax.set_ylabel("loss")
        ax.set_title(f"{self.recipe.name}: loss across phases (dashed: phase boundaries)")
        if any(not str(line.get_label()).startswith("_") for line in ax.lines):
            ax.legend(fontsize=7, ncol=2)
        loss_png = out / "loss_curve.png"
        fig.savefig(loss_png, dpi=100, bbox_inches="tight")

        fig2 = Figure(figsize=(10, 4.5))
        FigureCanvasAgg(fig2)
        ax2 = fig2.add_subplot()
        bottom = [0.0] * len(order)
        for m in ("text", "image", "video"):
            vals = [bars[n][m] for n in order]
            ax2.bar(order, vals, bottom=bottom, label=m)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax2.set_ylabel("tokens")
        ax2.set_title(f"{self.recipe.name}: tokens per phase by modality")
        ax2.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax2.legend()
        bar_png = out / "tokens_by_phase.png"
        fig2.savefig(bar_png, dpi=100, bbox_inches="tight")
        return [loss_png, bar_png]


# --------------------------------------------------------------------------------------------- replay


def replay_spool(spool_root: Path | str, tracking_uri: str | None = None, log: Log = print) -> dict[str, int]:
    """Deliver the records a finished process left in ``spool_root`` (one pipeline's spool directory, as
    reported by ``end_pipeline``). Runs without an id yet are found by their tags or created.
    Returns ``{"delivered": n, "remaining": m}``."""
    root = Path(spool_root)
    metas = {p.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("*/run.json"))}
    conns: dict[tuple[str, str], _Connection] = {}
    trackers: dict[str, MlflowTracker] = {}

    def build(key: str) -> MlflowTracker:
        if key in trackers:
            return trackers[key]
        m = metas[key]
        uri = tracking_uri or m["tracking_uri"]
        loc = m.get("artifact_location")
        if loc is None and not _is_remote(
            uri
        ):  # as PipelineTracking would have chosen: LOCAL_DIR/mlartifacts
            loc = (root.parent.parent / "mlartifacts").resolve().as_uri()
        conn = conns.setdefault((uri, m["experiment"]), _Connection(uri, m["experiment"], loc, log=log))
        parent = build(m["parent"]) if m.get("parent") else None
        spec = RunSpec(key, m["run_name"], dict(m["lookup"]), None if tracking_uri else m.get("run_id"))
        trackers[key] = MlflowTracker(conn, spec, root / key, parent=parent)
        return trackers[key]

    before = 0
    for key in metas:
        before += build(key).pending()
    for tr in trackers.values():
        tr.flush(force=True)
    remaining = sum(tr.pending() for tr in trackers.values())
    return {"delivered": before - remaining, "remaining": remaining}


# --------------------------------------------------------------------------------------------- compare


def _children(client: Any, run: Any) -> dict[str, Any]:
    kids = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'",
        max_results=1000,
    )
    return {
        k.data.tags.get(PHASE_TAG, k.info.run_name): k for k in sorted(kids, key=lambda r: r.info.start_time)
    }


def compare_runs(tracking_uri: str, run_a: str, run_b: str) -> dict[str, Any]:
    """Params that differ between two (pipeline) runs, and the final value of every metric per phase.

    Returns ``{"params": [(key, a, b)], "metrics": [(phase, key, a, b, a - b or None)]}``; a run without
    nested runs is compared as one phase named ``"(run)"``; parent-level metrics appear under
    ``"(pipeline)"`` only where they differ.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    ra, rb = client.get_run(run_a), client.get_run(run_b)
    pa, pb = ra.data.params, rb.data.params
    params = [(k, pa.get(k), pb.get(k)) for k in sorted(set(pa) | set(pb)) if pa.get(k) != pb.get(k)]
    ka, kb = _children(client, ra), _children(client, rb)
    if not ka and not kb:
        ka, kb = {"(run)": ra}, {"(run)": rb}
    order = list(ka) + [n for n in kb if n not in ka]
    rows: list[tuple[str, str, float | None, float | None, float | None]] = []

    def diff(x: float | None, y: float | None) -> float | None:
        return x - y if x is not None and y is not None and math.isfinite(x) and math.isfinite(y) else None

    for phase in order:
        ma = ka[phase].data.metrics if phase in ka else {}
        mb = kb[phase].data.metrics if phase in kb else {}
        for k in sorted(set(ma) | set(mb)):
            rows.append((phase, k, ma.get(k), mb.get(k), diff(ma.get(k), mb.get(k))))
    if "(run)" not in ka:
        ma, mb = ra.data.metrics, rb.data.metrics
        for k in sorted(set(ma) | set(mb)):
            if ma.get(k) != mb.get(k):
                rows.append(("(pipeline)", k, ma.get(k), mb.get(k), diff(ma.get(k), mb.get(k))))
    return {"params": params, "metrics": rows, "run_a": ra.info.run_name, "run_b": rb.info.run_name}


def default_tracking_uri(out_dir: Path) -> str:
    """The embedded default: a SQLite store inside the run directory (no server)."""
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


__all__ = [
    "MlflowTracker",
    "PipelineTracking",
    "RunSpec",
    "clean_params",
    "compare_runs",
    "default_tracking_uri",
    "replay_spool",
    "scrub",
]
