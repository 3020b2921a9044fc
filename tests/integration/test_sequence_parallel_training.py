"""``sequence_parallel: 2`` (each packed sequence split over 2 torchrun ranks, Ulysses all-to-all over heads)
trains like 1 rank holding whole sequences: losses and final weights within 1e-5 relative (each tensor's
Frobenius norm; elementwise within 1e-4 of its largest entry: Adam's g / sqrt(v) amplifies the summation-order
differences of near-zero gradients), gradient norms within 1e-4, with Muon
and with AdamW under ZeRO 2; composed with expert parallelism and sharded checkpoints, resumed mid-run. The
model-level equality (every gradient, with images cut by the split): ``tests/unit/test_sequence_parallel.py``;
a launched recipe phase: ``tests/integration/test_launch_sequence_parallel.py``."""

from __future__ import annotations

import pytest

from tasks.io.weights import load_safetensors
from tasks.train.engine import TrainEngine
from tests.integration._engine_common import _one_thread_and_clean_process_group  # noqa: F401
from tests.integration._engine_worker import engine_config, loss_fn, make_model, train
from tests.integration.test_engine_checkpoints import _losses, run_two_ranks

pytestmark = pytest.mark.integration
SAVE, END = 3, 6
_REF: dict = {}


def reference(opt: str, zero: int) -> dict:
    """1 rank, whole sequences: losses, grad norms and weights after END steps (cached per optimizer)."""
    if (opt, zero) not in _REF:
        model = make_model()
        eng = TrainEngine(model, engine_config(opt, zero), loss_fn)
        history = train(eng, model, 0, END)
        _REF[opt, zero] = {
            "losses": [h["loss"] for h in history],
            "norms": [h["grad_norm"] for h in history],
            "weights": eng.full_state_dict(),
        }
    return _REF[opt, zero]


def _check(out, ref: dict) -> None:
    losses, norms = _losses(out / "steps.jsonl"), _losses(out / "steps.jsonl", "grad_norm")
    assert sorted(losses) == list(range(1, END + 1))
    assert [losses[s] for s in range(1, END + 1)] == pytest.approx(ref["losses"], rel=1e-5)
    assert [norms[s] for s in range(1, END + 1)] == pytest.approx(ref["norms"], rel=1e-4)
    weights = load_safetensors(out / "final.safetensors")
    assert weights.keys() == ref["weights"].keys()
    for name, w in ref["weights"].items():  # relative error of each tensor (Frobenius), and elementwise
        diff = weights[name] - w
        assert float(diff.norm()) <= 1e-5 * max(float(w.norm()), 1e-3), name
        assert float(diff.abs().max()) <= 1e-4 * max(float(w.abs().max()), 1e-3), name


@pytest.mark.timeout(600)
def test_two_sp_ranks_train_like_one_rank(tmp_path):
    run_two_ranks("muon:0:sp2,adamw:2:sp2", END, tmp_path, 480)
    _check(tmp_path / "muon-z0-sp2", reference("muon", 0))
    _check(tmp_path / "adamw-z2-sp2", reference("adamw", 2))


@pytest.mark.timeout(600)
def test_sp_with_expert_parallel_and_sharded_checkpoints_resumes_exactly(tmp_path):
    """SP 2 and EP 2 on the same 2 ranks, sharded checkpoints: stopped after step SAVE, resumed to END."""
    run_two_ranks("muon:0:sp2:ep2:dcp", SAVE, tmp_path, 300, "--ckpt-every", str(SAVE))
    run_two_ranks("muon:0:sp2:ep2:dcp", END, tmp_path, 300, "--ckpt-every", str(SAVE), "--resume")
    _check(tmp_path / "muon-z0-sp2-ep2-dcp", reference("muon", 0))
