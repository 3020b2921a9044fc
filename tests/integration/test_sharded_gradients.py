"""``train.shard_gradients`` (DistributedMuon reduces each gradient to its owner during the backward):
2 ranks (torchrun, gloo) train like 1 rank, and 1 rank sharded is the unsharded engine, clipping included.
The no-gradient-on-one-rank case is in ``tests/unit/test_sharded_gradients.py``."""

from __future__ import annotations

import pytest

from tasks.train.engine import TrainEngine
from tests.integration._engine_common import _one_thread_and_clean_process_group  # noqa: F401
from tests.integration._engine_worker import engine_config, loss_fn, make_model, train
from tests.integration.test_engine_checkpoints import _losses, run_two_ranks

pytestmark = pytest.mark.integration
STEPS = 5


def _reference(**update):
    model = make_model()
    eng = TrainEngine(model, engine_config("muon", 0).model_copy(update=update), loss_fn)
    history = train(eng, model, 0, STEPS)
    return history, eng.full_state_dict(), eng


def test_one_rank_sharded_is_the_unsharded_engine():
    """Tight clipping (0.05) so every step clips: the sharded norm and scaling match DeepSpeed's."""
    plain, plain_w, _ = _reference(grad_clip=0.05)
    sharded, sharded_w, eng = _reference(grad_clip=0.05, shard_gradients=True)
    assert eng.ds.enable_backward_allreduce is False and eng.ds_config["gradient_clipping"] == 0.0
    for a, b in zip(plain, sharded, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["grad_norm"] == pytest.approx(
            a["grad_norm"], rel=1e-5
        )
        assert a["grad_norm"] > 0.05
    for name, w in plain_w.items():
        assert float((sharded_w[name] - w).abs().max()) <= 1e-5 * max(float(w.abs().max()), 1e-3), name


@pytest.mark.timeout(300)
def test_two_sharded_ranks_train_like_one_rank(tmp_path):
    from tasks.io.weights import load_safetensors

    ref, ref_w, _ = _reference()
    run_two_ranks("muon:0:shardg", STEPS, tmp_path, timeout=240)
    out = tmp_path / "muon-z0-shardg"
    losses = _losses(out / "steps.jsonl")
    norms = _losses(out / "steps.jsonl", "grad_norm")
    for s, h in enumerate(ref, start=1):
        assert losses[s] == pytest.approx(h["loss"], rel=1e-5), s
        assert norms[s] == pytest.approx(h["grad_norm"], rel=1e-4), s
    final = load_safetensors(out / "final.safetensors")
    assert final.keys() == ref_w.keys()
    for name, w in ref_w.items():
        scale = max(float(w.abs().max()), 1e-3)
        assert float((final[name] - w).abs().max()) <= 1e-5 * scale, name


def test_sharded_gradients_with_bf16_working_weights():
    """a3b's combination: bf16 matmul weights (fp32 masters) with sharded gradients. The bf16 gradients are
    accumulated over micro-batches in the owner's fp32 main gradient (unsharded: in bf16 p.grad), so the
    runs differ by bf16 rounding only."""
    bf16 = {"precision": "bf16", "working_weights": "bf16"}
    plain, _, _ = _reference(**bf16)
    sharded, _, eng = _reference(**bf16, shard_gradients=True)
    assert eng.low_precision_params > 0 and eng._muon.sharded
    assert [h["loss"] for h in sharded] == pytest.approx([h["loss"] for h in plain], rel=2e-2)
    assert sharded[-1]["loss"] < sharded[0]["loss"]
