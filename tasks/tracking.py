"""The one small interface through which tasks report params, metrics, tags and artifacts.

Tasks never import MLflow: they receive a ``Tracker``. Implementations:
- ``NullTracker``: drops everything (unit tests, library use).
- ``JsonlTracker``: appends to ``DIR/metrics.jsonl`` / ``params.json`` / ``tags.json`` (the embedded default
  before the MLflow wiring; also a durable local record when a tracking server is down).
- ``MemoryTracker``: keeps everything in lists (tests assert on it).
An MLflow-backed tracker (parent run per pipeline, nested run per stage) lives with the flows.

Secrets never go through a tracker: ``redact`` masks values whose key looks like a credential
(``is_secret_key``), ``scrub`` masks ``user:password@`` in URIs and the values of credential-like environment
variables (``AWS_SECRET_ACCESS_KEY``, ``HF_TOKEN``...) wherever they appear in a param or tag. The MLflow
tracker (``tasks.tracking_mlflow``) applies the same two functions.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

# A key is a credential when it contains one of these words anywhere (``AWS_SECRET_ACCESS_KEY``,
# ``db.password``, ``openai_api_key``), or when its LAST word is "token" (``token``, ``hf_token``,
# ``HF_TOKEN``, ``AWS_SESSION_TOKEN``, ``apiToken``). "token" elsewhere is a count or a setting, not a
# secret: ``token_budget``, ``tokenizer.vocab_size``, ``max_tokens_per_doc``, ``tokens_total`` are logged.
# Names of a tokenizer's special tokens (``eos_token``, ``pad_token``) are settings too.
_SECRET_WORDS = re.compile(
    r"secret|password|passwd|credential|authorization|api[_-]?key|access[_-]?key|private[_-]?key", re.I
)
_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")
_SPECIAL_TOKEN_NAMES = frozenset(
    {"bos", "eos", "pad", "unk", "sep", "cls", "mask", "image", "video", "media", "im_start", "im_end"}
)


def is_secret_key(key: Any) -> bool:
    """Whether a param/tag/env-variable name looks like it holds a credential (see the rule above)."""
    text = str(key)
    if _SECRET_WORDS.search(text):
        return True
    words = [w.lower() for w in _WORD_SPLIT.split(text) if w]
    return bool(words) and words[-1] == "token" and "_".join(words[:-1]) not in _SPECIAL_TOKEN_NAMES


def redact(d: dict[str, Any]) -> dict[str, Any]:
    """Copy of ``d`` with the values of credential-like keys (``is_secret_key``) replaced by ``"***"``,
    recursively through nested dicts and lists."""
    return {k: "***" if is_secret_key(k) else _redact_value(v) for k, v in d.items()}


def _redact_value(v: Any) -> Any:
    if isinstance(v, dict):
        return redact(v)
    if isinstance(v, (list, tuple)):
        return type(v)(_redact_value(x) for x in v)
    return v


_USERINFO = re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+@")


def _secret_env_values() -> list[str]:
    vals = {v for k, v in os.environ.items() if len(v) >= 6 and is_secret_key(k)}
    return sorted(vals, key=len, reverse=True)


def scrub(value: str) -> str:
    """``value`` with ``user:password@`` in URIs and values of credential-like env variables masked."""
    s = _USERINFO.sub("***@", value)
    for secret in _secret_env_values():
        s = s.replace(secret, "***")
    return s


def clean(d: dict[str, Any]) -> dict[str, Any]:
    """``redact`` + ``scrub`` of every string value: what a tracker may write."""
    return {k: scrub(v) if isinstance(v, str) else v for k, v in flatten(redact(d)).items()}


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
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(cur, indent=2, sort_keys=True, default=str))
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)

    def log_params(self, params: dict[str, Any]) -> None:
        self._merge_json("params.json", clean(params))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: (float(v) if math.isfinite(float(v)) else str(v)) for k, v in metrics.items()}
        with open(self._metrics, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
            f.flush()

    def set_tags(self, tags: dict[str, str]) -> None:
        self._merge_json("tags.json", clean(tags))

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        self._merge_json("artifacts.json", {name or Path(path).name: str(path)})
