"""The MLflow client of one tracking URI with its shared down/back-off state (``Connection``), and
``warm_client(uri)``, which builds a URI's client in a background thread (``import mlflow`` and, for a new
SQLite store, its schema migrations: about 5 s on a 2-core machine) so that a flow can overlap it with other
start-up work (``flows.pipeline.run_pipeline`` overlaps it with Prefect's local server start); the first
``Connection`` of that URI takes the result.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future
from typing import Any

from tasks import Log
from tasks.tracking.mlflow_names import PERMANENT_ERRORS
from tasks.tracking.secrets import scrub

_WARM: dict[str, Future] = {}
_WARM_LOCK = threading.Lock()


def warm_client(tracking_uri: str) -> Future:
    """Start building the MLflow client of ``tracking_uri`` in a background thread and return its future.

    For an embedded store (``sqlite:///...``) the client's constructor creates the database and runs its
    schema migrations; for a server URI nothing is contacted (only ``import mlflow`` is paid). The first
    ``Connection`` of the same URI takes the client; if building failed it builds its own, so the error
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


class Connection:
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


def is_permanent(err: Exception) -> bool:
    return isinstance(err, FileNotFoundError) or getattr(err, "error_code", None) in PERMANENT_ERRORS
