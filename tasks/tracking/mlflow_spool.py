"""Records not delivered yet: ``Batch`` (in memory, per run) and ``Spool`` (on disk, per run: the
``JsonlTracker`` files plus ``inputs.json``, ``register.json``, ``terminal.json``, ``rejected.jsonl``), which
a later flush, or ``tasks.tracking.mlflow_after.replay_spool``, delivers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.io.files import write_json_atomic
from tasks.tracking.local import JsonlTracker


@dataclass
class Batch:
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


def read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


def write_json(path: Path, obj: Any) -> None:
    write_json_atomic(obj, path, crash_name=None)  # a record, not a pipeline output: no crash point


class Spool:
    """One run's undelivered records on disk (JsonlTracker files + a few JSON lists)."""

    FILES = ("metrics.jsonl", "params.json", "tags.json", "artifacts.json", "inputs.json", "register.json")

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    def append(self, b: Batch) -> None:
        j = JsonlTracker(self.dir)  # params/tags are already clean: merged here, not re-redacted by j
        for fname, d in (("params.json", b.params), ("tags.json", b.tags)):
            if d:
                write_json(self.dir / fname, {**read_json(self.dir / fname, {}), **d})
        for step, t, values in b.metrics:
            j.log_metrics({**values, "time": t}, step=step)  # "time" overrides the write time
        for path, name in b.artifacts:
            j.log_artifact(Path(path), name)
        for fname, items in (("inputs.json", b.inputs), ("register.json", b.register)):
            if items:
                write_json(self.dir / fname, read_json(self.dir / fname, []) + items)
        if b.terminal is not None:
            write_json(self.dir / "terminal.json", list(b.terminal))

    def read(self) -> Batch:
        b = Batch(
            params=read_json(self.dir / "params.json", {}),
            tags=read_json(self.dir / "tags.json", {}),
            inputs=read_json(self.dir / "inputs.json", []),
            register=read_json(self.dir / "register.json", []),
        )
        b.artifacts = [(p, n) for n, p in read_json(self.dir / "artifacts.json", {}).items()]
        if (self.dir / "metrics.jsonl").is_file():
            for line in (self.dir / "metrics.jsonl").read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    step, t = int(rec.pop("step")), float(rec.pop("time"))
                    b.metrics.append((step, t, {k: float(v) for k, v in rec.items()}))
        term = read_json(self.dir / "terminal.json", None)
        b.terminal = (term[0], float(term[1])) if term else None
        return b

    def has_records(self) -> bool:
        return any((self.dir / f).is_file() for f in (*self.FILES, "terminal.json"))

    def replace(self, b: Batch) -> None:
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
