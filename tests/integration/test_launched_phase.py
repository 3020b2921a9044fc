"""A launched phase (``flows/launched_phase.py``) stopped from the flow side: when the task is cancelled or
its tracker fails mid-training, the launcher and every rank it started are gone when the error reaches
the caller (torchrun starts ranks in their own sessions, so a process-group signal alone would orphan
them), and the phase resumes from its last complete checkpoint on the next run."""

from __future__ import annotations

import subprocess

import psutil
import pytest
import yaml

from tasks.recipe import load_recipe
from tasks.tracking.local import MemoryTracker
from tests.integration.conftest import short_recipe

PHASE = "text_pretrain"


class Cancelled(BaseException):
    """Stands in for Prefect's cancellation (a BaseException raised in the flow process)."""


class CancelAtStep(MemoryTracker):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.at = step

    def log_metrics(self, metrics, step):
        super().log_metrics(metrics, step)
        if step >= self.at:
            raise Cancelled(f"cancelled at step {step}")


@pytest.mark.integration
def test_cancelled_launch_leaves_no_rank_behind_and_resumes(tiny_data, tmp_path, monkeypatch):
    from flows.launched_phase import LaunchSettings, run_phase_launched

    raw = short_recipe(checkpoint_every_steps=2).model_dump(mode="json", by_alias=True)
    raw["phases"] = [p for p in raw["phases"] if p["name"] == PHASE]
    raw["eval"]["points"] = []
    p = raw["phases"][0]
    p["micro_batches_per_step"] = 2
    p["token_budget"] = p["seq_len"] * 2 * 12  # 12 optimizer steps
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    recipe = load_recipe(tmp_path / "r.yaml")
    phase = recipe.phase(PHASE)
    out, data = tmp_path / "run", tiny_data[0]
    started: list[subprocess.Popen] = []
    popen = subprocess.Popen

    def record(*a, **kw):
        started.append(popen(*a, **kw))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", record)
    launch = LaunchSettings(nproc=2)
    with pytest.raises(Cancelled):
        run_phase_launched(recipe, phase, data, out, launch, CancelAtStep(5), log=lambda *_: None, poll_s=0.2)
    (launcher,) = started
    assert launcher.poll() is not None
    ranks = [q for q in psutil.process_iter(["cmdline"]) if str(out) in " ".join(q.info["cmdline"] or [])]
    assert ranks == [], [q.info["cmdline"] for q in ranks]
    pdir = out / "phases" / PHASE
    assert not (pdir / "final").exists() and any((pdir / "checkpoints").iterdir())

    # the next run resumes from the last complete checkpoint and finishes the phase
    sink = MemoryTracker()
    res = run_phase_launched(recipe, phase, data, out, launch, sink, log=lambda *_: None, poll_s=0.2)
    steps = [s for s, _ in sink.series("loss")]
    assert res["steps"] == steps[-1] >= 12 and steps[0] > 1, steps  # resumed, not restarted
    assert steps == list(range(steps[0], steps[-1] + 1))
