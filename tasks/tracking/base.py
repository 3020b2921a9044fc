"""The two tracking interfaces: what a training phase reports to (``Tracker``) and what the flows drive
around a whole run (``RunTracking``).

``Tracker``: params, metrics per step, tags and artifacts of ONE run (a phase, or the pipeline's parent
run). Implementations: ``tasks.tracking.local`` (null, memory, JSONL, tee) and
``tasks.tracking.mlflow_run.MlflowTracker``. Tasks never import MLflow: they receive a ``Tracker``.

``RunTracking``: the flows' tracking backend. Every hook exists on the base class (a no-op there), so a
flow calls them directly and a backend overrides what it records:

- ``pipeline(recipe, params)``: a context manager around a whole pipeline run (MLflow: the parent run);
- ``data_done(summary)``: the data flow's summary;
- ``phase(phase, phase_dir)``: a context manager around one phase's training that yields its ``Tracker``;
- ``phase_done(phase, result)``: a trained phase's result; returns links merged into the result
  (``mlflow_run_id``, ``mlflow_url``);
- ``eval_done(point, result)`` / ``report_done(path)``: an evaluation point's result / the run's report;
- ``report``: what the backend delivered, for the run's summary (None for local tracking).

``tasks.tracking.local.LocalTracking`` (the ``tracking: local`` choice) gives each phase its directory's
``JsonlTracker``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifact(self, path: Path, name: str | None = None) -> None: ...


class NullTracker:
    """The ``Tracker`` that records nothing."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        pass


class RunTracking:
    """The flows' tracking backend (see the module docstring); this base records nothing."""

    report: dict[str, Any] | None = None

    @contextlib.contextmanager
    def pipeline(self, recipe: Any, params: dict[str, Any]) -> Iterator[None]:
        yield None

    def data_done(self, summary: dict[str, Any]) -> None:
        return None

    @contextlib.contextmanager
    def phase(self, phase: Any, phase_dir: Path) -> Iterator[Tracker]:
        yield NullTracker()

    def phase_done(self, phase: Any, result: dict[str, Any]) -> dict[str, Any]:
        return {}

    def phase_replaced(self, phase: Any, old_dir: Path) -> None:
        """A forced rerun moved the phase's directory to ``old_dir``: what was tracked for it is kept, and
        the phase's next run is tracked afresh instead of continuing it."""
        return None

    def eval_done(self, point: str, result: dict[str, Any]) -> None:
        return None

    def report_done(self, path: Path) -> None:
        return None


def tracking_links(tracker: Any) -> dict[str, str]:
    """``mlflow_run_id`` / ``mlflow_url`` of a phase's tracker, when it has them."""
    links = {}
    if getattr(tracker, "run_id", None):
        links["mlflow_run_id"] = str(tracker.run_id)
    if getattr(tracker, "run_url", None):
        links["mlflow_url"] = str(tracker.run_url)
    return links
