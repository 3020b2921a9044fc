"""The one small interface through which tasks report params, metrics, tags and artifacts.

Tasks never import MLflow: they receive a ``Tracker``. Implementations:
- ``NullTracker``: drops everything (unit tests, library use).
- ``JsonlTracker``: appends to ``DIR/metrics.jsonl`` / ``params.json`` / ``tags.json`` (the embedded default
  before the MLflow wiring; also a durable local record when a tracking server is down).
- ``MemoryTracker``: keeps everything in lists (tests assert on it).
An MLflow-backed tracker (parent run per pipeline, nested run per stage) lives with the flows.

Secrets never go through a tracker: ``redact`` drops values whose key looks like a credential.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

_SECRET_KEY = re.compile(r"(secret|password|passwd|token|api[_-]?key|access[_-]?key|credential)", re.I)


def redact(d: dict[str, Any]) -> dict[str, Any]:
    """Copy of ``d`` with credential-like keys replaced by ``"***"`` (recursively)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if _SECRET_KEY.search(str(k)):
            out[k] = "***"
        elif isinstance(v, dict):
            out[k] = redact(v)
        else:
            out[k] = v
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (lists are JSON-encoded)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v, default=str)
        else:
            out[key] = v
    return out


@runtime_checkable
class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifact(self, path: Path, name: str | None = None) -> None: ...


class NullTracker:
    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        pass


class MemoryTracker:
    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.tags: dict[str, str] = {}
        self.artifacts: list[tuple[Path, str | None]] = []

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(flatten(redact(params)))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(redact(tags))

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
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cur, indent=2, sort_keys=True, default=str))
        tmp.replace(path)

    def log_params(self, params: dict[str, Any]) -> None:
        self._merge_json("params.json", flatten(redact(params)))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: (float(v) if math.isfinite(float(v)) else str(v)) for k, v in metrics.items()}
        with open(self._metrics, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
            f.flush()

    def set_tags(self, tags: dict[str, str]) -> None:
        self._merge_json("tags.json", redact(tags))

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        self._merge_json("artifacts.json", {name or Path(path).name: str(path)})
