"""Trackers that need no server (``NullTracker``, from ``base``, drops everything): ``MemoryTracker`` (keeps everything in
lists: tests assert on it), ``JsonlTracker`` (``DIR/metrics.jsonl`` + ``params.json`` / ``tags.json``: the
durable local record, also written while an MLflow server is down) and ``TeeTracker`` (one call to several); ``LocalTracking``, the flows' backend for ``tracking: local``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.io.files import write_json_atomic
from tasks.tracking.base import NullTracker, RunTracking, Tracker
from tasks.tracking.secrets import clean


class MemoryTracker:
    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.tags: dict[str, str] = {}
        self.artifacts: list[tuple[Path, str | None]] = []

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(clean(params))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(clean(tags))

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        self.artifacts.append((Path(path), name))

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(s, m[key]) for s, m in self.metrics if key in m]


class JsonlTracker:
    """Durable local tracking: one JSON line per metrics call (append + flush)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._metrics = self.directory / "metrics.jsonl"

    def _merge_json(self, name: str, new: dict[str, Any]) -> None:
        path = self.directory / name
        cur = json.loads(path.read_text()) if path.is_file() else {}
        cur.update(new)
        write_json_atomic(cur, path, crash_name=None)  # a record, not a pipeline output: no crash point

    def log_params(self, params: dict[str, Any]) -> None:
        self._merge_json("params.json", clean(params))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        values = {k: (float(v) if math.isfinite(float(v)) else str(v)) for k, v in metrics.items()}
        with open(self._metrics, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
            f.flush()

    def set_tags(self, tags: dict[str, str]) -> None:
        self._merge_json("tags.json", clean(tags))

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        self._merge_json("artifacts.json", {name or Path(path).name: str(path)})


class TeeTracker:
    """Sends every call to several trackers; ``run_id`` / ``run_url`` come from the first that has them."""

    def __init__(self, *trackers: Tracker, run_url: str | None = None) -> None:
        self.trackers = trackers
        self.run_url = run_url

    @property
    def run_id(self) -> str | None:
        return next((t.run_id for t in self.trackers if getattr(t, "run_id", None)), None)

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


class LocalTracking(RunTracking):
    """``tracking: local``: each phase directory's ``metrics.jsonl`` / ``params.json`` / ``tags.json``."""

    @contextlib.contextmanager
    def phase(self, phase: Any, phase_dir: Path) -> Iterator[Tracker]:
        yield JsonlTracker(phase_dir)


__all__ = ["JsonlTracker", "LocalTracking", "MemoryTracker", "NullTracker", "TeeTracker"]
