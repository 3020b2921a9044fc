"""TrainEngine (DeepSpeed, CPU gloo) checkpoints: bit-exact resume, incomplete and corrupted checkpoints,
optimizer state loaded without pickle, SIGKILL mid-training then resume, 2 ranks vs 1 rank.

The reference is one uninterrupted in-process run per (optimizer, ZeRO stage), trained once per module and
cached in ``_RUNS``. The tiny model, the deterministic batches and the loss live in ``_engine_worker.py`` so
the in-process runs and the subprocess runs (SIGKILL + resume, torchrun with 2 ranks) train exactly the same
thing; the one-thread fixture and the state comparison are shared with ``test_engine.py`` through
``_engine_common.py``. Every process uses ONE torch thread, so in-process and subprocess runs are
bit-comparable.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.io.weights import load_safetensors
from tasks.train import checkpoint as ckpt
from tasks.train.checkpoint import CheckpointError, checkpoint_path, latest_checkpoint
from tasks.train.engine import TrainEngine
from tasks.train.launch import build_launch_command
from tests.integration._engine_common import (
    _assert_equal_state,
    _one_thread_and_clean_process_group,  # noqa: F401  (autouse)
)
from tests.integration._engine_worker import engine_config, loss_fn, make_model, train

WORKER = Path(__file__).with_name("_engine_worker.py")
REPO = Path(__file__).resolve().parents[2]


_RUNS: dict = {}


def uninterrupted(opt: str, zero: int, tmp_root: Path) -> dict:
    """8 steps (4 micro-batches each) saving a checkpoint after step 4; cached per (opt, zero)."""
    key = (opt, zero)
    if key not in _RUNS:
        model = make_model()
        eng = TrainEngine(model, engine_config(opt, zero), loss_fn)
        root = tmp_root / f"{opt}-z{zero}"

        def on_step(s, r):
            if r.step == 4:
                eng.save_checkpoint(checkpoint_path(root, 4), {"next_step": s + 1, "tokens_seen": 123})

        steps = train(eng, model, 0, 8, on_step)
        _RUNS[key] = {"losses": [x["loss"] for x in steps], "norms": [x["grad_norm"] for x in steps]}
        _RUNS[key].update(weights=eng.full_state_dict(), ckpt4=checkpoint_path(root, 4))
    return _RUNS[key]


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


# ----------------------------------------------------------------------------------- checkpoints
@pytest.mark.integration
@pytest.mark.parametrize(("opt", "zero"), [("muon", 0), ("adamw", 2)])
def test_resume_is_bit_exact(opt, zero, run_root):
    ref = uninterrupted(opt, zero, run_root)
    model = make_model(seed=123)  # different init: everything must come from the checkpoint
    eng = TrainEngine(model, engine_config(opt, zero), loss_fn)
    extra = eng.load_checkpoint(ref["ckpt4"])
    assert extra == {"next_step": 4, "tokens_seen": 123} and eng.step == 4
    losses = [x["loss"] for x in train(eng, model, extra["next_step"], 8)]
    assert losses == ref["losses"][4:]
    _assert_equal_state(eng.full_state_dict(), ref["weights"])  # incl. the router bias buffers
    files = sorted(str(p.relative_to(ref["ckpt4"])) for p in ref["ckpt4"].rglob("*") if p.is_file())
    assert files == [
        "checksums.json",
        "model.safetensors",
        "optimizer/rank-00000.pt",
        "rng/rank-00000.pt",
        "trainer_state.json",
    ]


@pytest.mark.integration
def test_incomplete_checkpoint_is_never_loaded(tmp_path, monkeypatch):
    model = make_model()
    eng = TrainEngine(model, engine_config("muon", 0, m=2), loss_fn)
    train(eng, model, 0, 2)
    eng.save_checkpoint(checkpoint_path(tmp_path, 2))
    train(eng, model, 2, 4)

    def crash(staging, final):
        raise KeyboardInterrupt("simulated kill before the rename")

    monkeypatch.setattr(ckpt, "commit_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        eng.save_checkpoint(checkpoint_path(tmp_path, 4))
    staged = ckpt.staging_path(checkpoint_path(tmp_path, 4))
    assert (staged / "model.safetensors").is_file() and (staged / "checksums.json").is_file()
    partial = checkpoint_path(tmp_path, 6)  # e.g. a half-copied directory without its checksums
    shutil.copytree(staged, partial)
    (partial / "checksums.json").unlink()
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 2)
    monkeypatch.undo()
    eng.save_checkpoint(checkpoint_path(tmp_path, 4))  # a later save clears the stale staging dir
    assert not staged.exists() and latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 4)


@pytest.mark.integration
@pytest.mark.parametrize("victim", ["optimizer/rank-00000.pt", "model.safetensors", "rng/rank-00000.pt"])
def test_corrupted_or_missing_file_is_named(victim, run_root, tmp_path):
    src = uninterrupted("muon", 0, run_root)["ckpt4"]
    bad = tmp_path / "step-00000004"
    shutil.copytree(src, bad)
    data = bytearray((bad / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / victim).write_bytes(bytes(data))
    eng = TrainEngine(make_model(), engine_config("muon", 0), loss_fn)
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.")):
        eng.load_checkpoint(bad)
    (bad / victim).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        eng.load_checkpoint(bad)


def test_optimizer_state_is_loaded_without_pickle():
    src = (REPO / "tasks/train/checkpoint.py").read_text()
    assert "weights_only=True" in src
    for path in (REPO / "tasks/train").glob("*.py"):
        assert "weights_only=False" not in path.read_text(), path


# ----------------------------------------------------------------------------------- processes
def _losses(path: Path, key: str = "loss") -> dict[int, float]:
    import json

    return {d["step"]: d[key] for d in map(json.loads, path.read_text().splitlines())}


def run_two_ranks(runs: str, steps: int, out: Path, timeout: float = 360, *extra: str) -> None:
    """The engine worker on 2 torchrun ranks (gloo, one thread each): ``--runs RUNS --steps STEPS ...``."""
    cmd = build_launch_command(
        [str(WORKER), "--runs", runs, "--steps", str(steps), "--out", str(out), "--threads", "1", *extra],
        nproc=2,
        launcher="torchrun",
    )
    done = subprocess.run(cmd, capture_output=True, text=True, env=_worker_env(), cwd=REPO, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def _worker_env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    return {**env, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_sigkill_mid_training_then_resume(tmp_path, run_root):
    ref = uninterrupted("muon", 0, run_root)
    args = [
        sys.executable,
        str(WORKER),
        "--runs",
        "muon:0",
        "--steps",
        "8",
        "--out",
        str(tmp_path),
        "--ckpt-every",
        "2",
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(
        [*args, "--sleep", "0.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=_worker_env(),
        cwd=REPO,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "STEP 5":
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait(timeout=60) == -signal.SIGKILL
    root = tmp_path / "muon-z0" / "ckpt"
    assert latest_checkpoint(root) == checkpoint_path(root, 4)
    done = subprocess.run(
        [*args, "--resume"], capture_output=True, text=True, env=_worker_env(), cwd=REPO, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (tmp_path / "muon-z0" / "steps.jsonl").read_text().splitlines()
    assert len(lines) == 5 + 4  # steps 1-5 of the killed run, 5-8 of the resumed one
    resumed = _losses(tmp_path / "muon-z0" / "steps.jsonl")  # later lines win: steps 5-8 of the new run
    assert [resumed[s] for s in range(1, 9)] == ref["losses"]
    _assert_equal_state(load_safetensors(tmp_path / "muon-z0" / "final.safetensors"), ref["weights"])


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_two_ranks_match_one_rank(tmp_path, run_root):
    refs = {
        ("muon", 0): uninterrupted("muon", 0, run_root),
        ("adamw", 1): uninterrupted("adamw", 1, run_root),
    }
    run_two_ranks("muon:0,adamw:1", 8, tmp_path)
    for (opt, zero), ref in refs.items():
        out = tmp_path / f"{opt}-z{zero}"
        losses, norms = _losses(out / "steps.jsonl"), _losses(out / "steps.jsonl", "grad_norm")
        assert [losses[s] for s in range(1, 9)] == pytest.approx(ref["losses"], rel=1e-5)
        assert [norms[s] for s in range(1, 9)] == pytest.approx(
            ref["norms"], rel=1e-5
        )  # averaged exactly once
        _assert_equal_state(load_safetensors(out / "final.safetensors"), ref["weights"], exact=False)
    # DeepSpeed's ZeRO 1 partitions cannot be resharded: a 1-rank run refuses the 2-rank checkpoint ...
    # (muon's per-owner state can: tests/integration/test_reshard.py)
    eng = TrainEngine(make_model(), engine_config("adamw", 1), loss_fn)
    with pytest.raises(CheckpointError, match="world_size=2"):
        eng.load_checkpoint(checkpoint_path(tmp_path / "adamw-z1" / "ckpt", 8))
    # ... a weights-only resume keeps the weights and counters
    saved = checkpoint_path(tmp_path / "muon-z0" / "ckpt", 8)
    eng = TrainEngine(make_model(), engine_config("muon", 0), loss_fn)
    assert eng.load_checkpoint(saved, weights_only_resume=True) == {"next_step": 8} and eng.step == 8
    _assert_equal_state(eng.full_state_dict(), load_safetensors(tmp_path / "muon-z0" / "final.safetensors"))
    # ZeRO: a weights-only resume must also refresh the fp32 master partitions from the loaded weights
    saved = load_safetensors(tmp_path / "adamw-z1" / "final.safetensors")
    model = make_model()
    eng = TrainEngine(model, engine_config("adamw", 1), loss_fn)
    init = eng.full_state_dict()
    eng.load_checkpoint(checkpoint_path(tmp_path / "adamw-z1" / "ckpt", 8), weights_only_resume=True)
    train(eng, model, 8, 9)
    after = eng.full_state_dict()
    drift = max(float((after[k] - saved[k]).abs().max()) for k in saved)
    assert drift < 0.01 < max(float((init[k] - saved[k]).abs().max()) for k in saved)
