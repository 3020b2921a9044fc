"""``MlflowTracker``: the ``Tracker`` of one MLflow run, never raising into training.

Records are buffered in memory and delivered in batches (every ``flush_interval_s``, or at once for a
non-metric record). When delivery fails (tracking server down, database locked) everything undelivered is
appended to the run's on-disk spool (``tasks.tracking.mlflow_spool``) and retried on a later call after the
connection's exponential back-off (``tasks.tracking.mlflow_connection``); the spool is delivered first, then
emptied. MLflow rejections (a bad value, a changed param) are not retried: a refused batch is split down to
the refused records, which are written to ``rejected.jsonl`` and reported. Names MLflow would refuse are
made valid first (``tasks.tracking.mlflow_names.mlflow_key``). Datasets are logged as run inputs whose
digest is their manifest's content hash.
"""

from __future__ import annotations

import functools
import json
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.io.faults import crash_point
from tasks.tracking.mlflow_connection import Connection, is_permanent
from tasks.tracking.mlflow_names import (
    MAX_DIGEST,
    PARENT_TAG,
    PHASE_TAG,
    SERIES_KEYS,
    clean_keys,
    clean_params,
    clean_tags,
    q,
)
from tasks.tracking.mlflow_spool import Batch, Spool, write_json
from tasks.tracking.secrets import scrub

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
        conn: Connection,
        spec: RunSpec,
        spool_dir: Path,
        *,
        parent: MlflowTracker | None = None,
        flush_interval_s: float = 2.0,
        max_buffer: int = 1000,
    ) -> None:
        self._conn, self.spec, self.parent = conn, spec, parent
        self._spool = Spool(spool_dir)
        self._mem = Batch()
        self.flush_interval_s, self.max_buffer = flush_interval_s, max_buffer
        self._last_flush = time.monotonic()
        self._remote_params: dict[str, str] = {}
        self.resumed = False
        self.rejected = 0
        self.artifact_names: set[str] = set()
        self.series: dict[str, dict[int, float]] = {k: {} for k in SERIES_KEYS}
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
        filt = " and ".join(f"tags.`{k}` = '{q(v)}'" for k, v in tags.items())
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
            vals = {k: float(v) for k, v in clean_keys({str(k): v for k, v in metrics.items()}).items()}
            self._mem.metrics.append((int(step), time.time(), vals))
            self.last.update(vals)
            for k in SERIES_KEYS:
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
        write_json(self._spool.dir / "run.json", meta)
        if self.parent is not None:
            self.parent._write_meta()

    def _spill(self) -> None:
        if self._mem.count():
            self._write_meta()
            self._spool.append(self._mem)
            self._mem = Batch()

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
            if not is_permanent(e):
                raise
            self.rejected += 1
            self._spool.reject(what, payload, e)
            self._conn.log(f"[tracking] MLflow rejected {what} of {self.spec.key}: {str(e)[:200]}")

    def _try_split(
        self, what: str, items: list, send: Callable[[list], Any], payload: Callable[[list], Any]
    ) -> None:
        """Deliver ``items`` in one ``send``; when MLflow refuses the batch for good, deliver each half on its
        own, down to single records, so that only the records MLflow refuses are rejected (``log_batch``
        validates a whole batch before it writes any of it; one bad name used to cost up to 1000 metrics).
        ``payload(items)`` is what ``rejected.jsonl`` records. Other errors raise (the batch is spooled);
        re-sending the halves already delivered is harmless: MLflow keeps one copy of an identical metric
        (key, value, step, timestamp) or param."""
        try:
            send(items)
        except Exception as e:
            if not is_permanent(e):
                raise
            if len(items) > 1:
                mid = len(items) // 2
                self._try_split(what, items[:mid], send, payload)
                self._try_split(what, items[mid:], send, payload)
                return
            self.rejected += 1
            self._spool.reject(what, payload(items), e)
            self._conn.log(f"[tracking] MLflow rejected {what} of {self.spec.key}: {str(e)[:200]}")

    def _chunks(
        self, what: str, values: dict[str, str], send: Callable[[list], Any], entity: type
    ) -> Iterator[dict[str, str]]:
        """Deliver ``values`` (sorted by key) in requests of at most 100 (MLflow's batch limit for params
        and tags), yielding each chunk once it is delivered or (record by record) permanently rejected."""
        items = sorted(values.items())
        for i in range(0, len(items), 100):
            chunk = items[i : i + 100]
            self._try_split(what, chunk, lambda its: send([entity(k, v) for k, v in its]), dict)
            yield dict(chunk)

    def _deliver(self, run_id: str, b: Batch) -> None:
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
            for chunk in self._chunks("params", new, lambda ch: c.log_batch(run_id, params=ch), Param):
                self._remote_params.update(chunk)
            b.params = {}
        if b.tags:
            for chunk in self._chunks("tags", b.tags, lambda ch: c.log_batch(run_id, tags=ch), RunTag):
                for k in chunk:
                    b.tags.pop(k)
        while b.metrics:  # consecutive steps, at most 1000 values per request (MLflow's batch limit)
            k, n = 0, 0
            while k < len(b.metrics) and (k == 0 or n + len(b.metrics[k][2]) <= 1000):
                n += len(b.metrics[k][2])
                k += 1
            flat = [(step, t, key, v) for step, t, vals in b.metrics[:k] for key, v in vals.items()]
            self._try_split(
                "metrics",
                flat,
                lambda ms: c.log_batch(
                    run_id, metrics=[Metric(key, v, int(t * 1000), st) for st, t, key, v in ms]
                ),
                lambda ms: [[st, t, {key: v}] for st, t, key, v in ms],  # as the spool's (step, time, values)
            )
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

    def _deliver_inputs(self, run_id: str, b: Batch) -> None:
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.entities import DatasetInput, InputTag

        c = self._conn.client
        have = {(d.dataset.name, d.dataset.digest) for d in c.get_run(run_id).inputs.dataset_inputs}
        todo = []
        for rec in b.inputs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                src = resolve_dataset_source(rec["source"])
            ent = manifest_dataset(src, rec["name"], rec["content_hash"], rec["counts"])._to_mlflow_entity()
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
        for mv in c.search_model_versions(f"name = '{q(name)}' and run_id = '{run_id}'"):
            if mv.tags.get(PHASE_TAG, "") == phase:
                return  # already registered (a rerun or a replayed spool)
        source = rec["source"] or f"runs:/{run_id}/{rec['artifact_path']}"
        c.create_model_version(name, source, run_id=run_id, tags=rec["tags"], await_creation_for=0)


@functools.cache
def manifest_dataset_cls() -> type:
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


def manifest_dataset(source: Any, name: str, content_hash: str, counts: dict[str, Any]) -> Any:
    return manifest_dataset_cls()(source, name, content_hash, counts)
