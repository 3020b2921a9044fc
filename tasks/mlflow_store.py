"""The MLflow side of tracking that every tracker shares: record limits and cleaning (secrets masked),
the in-memory batch and on-disk spool of undelivered records, and the connection to one tracking URI with
its back-off state (``tasks.tracking_mlflow`` documents the whole design).

``warm_client(uri)`` builds a URI's client in a background thread (``import mlflow`` and, for a new SQLite
store, its schema migrations: about 5 s on a 2-core machine) so that a flow can overlap it with other
start-up work (``flows.pipeline.run_pipeline`` overlaps it with Prefect's local server start); the first
``_Connection`` of that URI takes the result.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


# MLflow's rule for metric, param and tag names (mlflow.utils.validation), minus the colon that a Windows
# tracking server refuses: letters, digits, "_", "-", ".", " " and "/"; no empty, "." or ".." path segment
# and no leading "/" or ".." (names double as file paths in the file store).
_BAD_KEY_CHARS = re.compile(r"[^\w.\- /]")


def mlflow_key(name: str) -> str:
    """``name`` as a valid MLflow metric/param/tag name: every other character becomes "_" (so a data
    contract's ``expect_column_values_to_be_in_set(answer_verified)`` becomes ``..._in_set_answer_verified_``),
    empty path segments are dropped, "." / ".." segments become "_" / "__", a leading ".." gets a "_", and a
    name over 250 characters is cut, with a digest of the original appended. Names that every MLflow server
    accepts come back unchanged."""
    parts = [seg for seg in _BAD_KEY_CHARS.sub("_", str(name)).split("/") if seg]
    parts = ["_" * len(seg) if seg in (".", "..") else seg for seg in parts]
    key = "/".join(parts) or "_"
    return _clip_key("_" + key if key.startswith("..") else key, str(name))  # MLflow refuses a leading ".."


def _with_digest(key: str, original: str) -> str:
    """``key`` cut to leave room for "_" + an 8-hex digest of ``original``, plus that digest (valid and
    unique, unlike the "...[truncated]" marker of values, whose brackets MLflow refuses in names)."""
    return key[: MAX_KEY - 9] + "_" + hashlib.sha1(original.encode()).hexdigest()[:8]


def _clip_key(key: str, original: str) -> str:
    return key if len(key) <= MAX_KEY else _with_digest(key, original)


def clean_keys(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every key through ``mlflow_key``. A changed key whose clean name another key of
    ``values`` also has (cleaned or as is) gets an 8-hex digest of its original appended, so nothing is
    silently overwritten and the result does not depend on the keys' order."""
    cleaned = {k: mlflow_key(k) for k in values}
    uses: dict[str, int] = {}
    for c in cleaned.values():
        uses[c] = uses.get(c, 0) + 1
    out: dict[str, Any] = {}
    for k, v in values.items():
        c = cleaned[k]
        if c != k and uses[c] > 1:
            c = _with_digest(c, str(k))
        out[c] = v
    return out


def clean_params(params: dict[str, Any]) -> dict[str, str]:
    """Flattened, redacted, scrubbed string params with valid names, within MLflow's length limits."""
    return {k: _clip(scrub(str(v)), MAX_PARAM) for k, v in clean_keys(flatten(redact_keys(params))).items()}


def clean_tags(tags: dict[str, Any]) -> dict[str, str]:
    return {k: _clip(scrub(str(v)), MAX_TAG) for k, v in clean_keys(redact_keys(tags)).items()}


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


_WARM: dict[str, Future] = {}
_WARM_LOCK = threading.Lock()


def warm_client(tracking_uri: str) -> Future:
    """Start building the MLflow client of ``tracking_uri`` in a background thread and return its future.

    For an embedded store (``sqlite:///...``) the client's constructor creates the database and runs its
    schema migrations; for a server URI nothing is contacted (only ``import mlflow`` is paid). The first
    ``_Connection`` of the same URI takes the client; if building failed it builds its own, so the error
    surfaces where it always did. The thread is not a daemon: an interpreter exiting meanwhile waits for
    the migrations to finish instead of leaving a half-migrated store.
    """
    with _WARM_LOCK:
        fut = _WARM.get(tracking_uri)
        if fut is None:
            fut = _WARM[tracking_uri] = Future()
            threading.Thread(
                target=_build_client, args=(tracking_uri, fut), name="mlflow-warm-client"
            ).start()
    return fut


def _build_client(tracking_uri: str, fut: Future) -> None:
    try:
        from mlflow import MlflowClient

        fut.set_result(MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri))
    except BaseException as e:
        fut.set_exception(e)


def _take_warm(tracking_uri: str) -> Any:
    """The client ``warm_client`` built for this URI (waiting for it), once; None if none or it failed."""
    with _WARM_LOCK:
        fut = _WARM.pop(tracking_uri, None)
    if fut is None:
        return None
    try:
        return fut.result()
    except Exception:
        return None


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
            self._client = _take_warm(self.tracking_uri)
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


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def default_tracking_uri(out_dir: Path) -> str:
    """The embedded default: a SQLite store inside the run directory (no server)."""
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"
