"""A training phase on N data-parallel processes from a Prefect flow (``nproc`` / ``launcher`` /
``hostfile`` parameters of the pipeline and stage flows).

The flow process stays the orchestrator: it writes the recipe it validated to the phase directory, starts
``tasks/train/rank_main.py stage <phase> --worker`` under ``torchrun`` or the ``deepspeed`` launcher (the same
command ``kimivl stage --nproc N`` runs), streams the ranks' output into the task's log, and relays what rank
0 records (``JsonlTracker`` files in ``<phase dir>/rank0/<phase>/``: ``params.json``, ``tags.json``,
``metrics.jsonl``, ``artifacts.json``) to the flow's tracker as it appears, so the MLflow nested run shows the loss curve while
the phase trains, not after. The phase's ``result.json`` (written by rank 0 when the phase completes) is
the task's result. Cancelling or failing the task stops the launched process group.
"""

from __future__ import annotations

import collections
import contextlib
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from flows.launch_settings import LaunchSettings, launcher_env
from tasks.io.files import atomic_path
from tasks.recipe import Recipe
from tasks.tracking.base import Tracker
from tasks.train.runner import phase_dir, read_result
from tasks.train.stages import PhaseConfig


class PhaseFileRelay:
    """Forwards what a ``JsonlTracker`` writes in ``pdir`` to ``tracker``: new metric lines (complete lines
    only, from the file's size at start: earlier attempts were relayed by then), and new or changed params,
    tags and artifacts."""

    def __init__(self, pdir: Path, tracker: Tracker) -> None:
        self.pdir, self.tracker = Path(pdir), tracker
        metrics = self.pdir / "metrics.jsonl"
        self.offset = metrics.stat().st_size if metrics.is_file() else 0
        self.sent: dict[str, dict[str, Any]] = {
            n: self._read(n) for n in ("params.json", "tags.json", "artifacts.json")
        }
        self.steps = 0

    def _read(self, name: str) -> dict[str, Any]:
        try:
            return json.loads((self.pdir / name).read_text())
        except (OSError, ValueError):  # not there yet, or being replaced: the next pump reads it
            return {}

    def _new(self, name: str) -> dict[str, Any]:
        cur = self._read(name)
        new = {k: v for k, v in cur.items() if self.sent[name].get(k, object()) != v}
        self.sent[name].update(new)
        return new

    def pump(self) -> None:
        if params := self._new("params.json"):
            self.tracker.log_params(params)
        if tags := self._new("tags.json"):
            self.tracker.set_tags(tags)
        metrics = self.pdir / "metrics.jsonl"
        if metrics.is_file():
            with open(metrics, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
            done = chunk[: chunk.rfind(b"\n") + 1]  # a line being written is relayed on the next pump
            self.offset += len(done)
            for line in done.decode("utf-8").splitlines():
                row = json.loads(line)
                step = int(row.pop("step"))
                row.pop("time", None)
                self.tracker.log_metrics({k: float(v) for k, v in row.items()}, step=step)
                self.steps += 1
        for name, path in self._new("artifacts.json").items():
            self.tracker.log_artifact(Path(path), name=name)


def run_phase_launched(
    recipe: Recipe,
    phase: PhaseConfig,
    data_root: Path,
    out_root: Path,
    launch: LaunchSettings,
    tracker: Tracker,
    log: Any = print,
    poll_s: float = 1.0,
) -> dict[str, Any]:
    """Train ``phase`` on ``launch``'s processes and return its result (``run_phase``'s dict)."""
    launch.check(recipe, [phase])
    pdir = phase_dir(out_root, phase)
    pdir.mkdir(parents=True, exist_ok=True)
    recipe_file = pdir / "launch-recipe.yaml"  # exactly the recipe this flow validated
    with atomic_path(recipe_file, crash_name=None) as tmp:
        tmp.write_text(yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True), sort_keys=False))
    # rank 0 records to rank0/<phase>/ and the relay forwards from there: the flow's tracker may itself
    # write the phase directory's metrics.jsonl (MLflow's local copy), which the relay must not read back
    rank0 = pdir / "rank0"
    args = [
        "stage",
        phase.name,
        "--recipe",
        str(recipe_file),
        "--data",
        str(data_root),
        "--out",
        str(out_root),
    ]
    cmd = launch.command([*args, "--tracking-dir", str(rank0)])
    log(f"[{phase.name}] launching {launch.world_size()} processes: {' '.join(cmd)}")
    relay = PhaseFileRelay(rank0 / phase.name, tracker)
    code, tail = _run_relayed(cmd, relay, log, poll_s)
    if code != 0:
        raise RuntimeError(
            f"phase {phase.name!r}: {launch.launcher} exited with code {code}; last output:\n"
            + "\n".join(tail)
        )
    result = read_result(out_root, phase)
    if result is None:
        raise RuntimeError(
            f"phase {phase.name!r}: the launched run ended without a complete final checkpoint"
        )
    log(f"[{phase.name}] {relay.steps} metric rows relayed from rank 0")
    return result


def _run_relayed(cmd: list[str], relay: PhaseFileRelay, log: Any, poll_s: float) -> tuple[int, list[str]]:
    """Run the launch command in its own session, its output streamed to ``log`` and rank 0's records
    relayed while it runs; (exit code, last lines of output). Cancelled or failed: its ranks are stopped."""
    proc = subprocess.Popen(
        cmd,
        env=launcher_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    tail: collections.deque[str] = collections.deque(maxlen=40)

    def stream() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            log(line.rstrip())

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    try:
        while proc.poll() is None:
            relay.pump()
            time.sleep(poll_s)
    except BaseException:  # cancelled or failed: do not leave ranks behind
        _stop(proc)
        raise
    finally:
        reader.join(timeout=10)
    relay.pump()
    return int(proc.returncode), list(tail)


def _stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """Stop the launcher and every rank it started. torchrun starts each rank in its own session, so a
    signal to the launcher's process group does not reach them: ``flows.services.stop_tree`` stops the
    whole process tree (SIGTERM, SIGKILL after ``grace_s``; checkpoints are atomic, so a rank killed
    mid-step loses at most the steps since the last one)."""
    from flows.services import stop_tree

    stop_tree(proc.pid, grace_s)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)  # reap the launcher
