"""``working_weights: bf16``: matmul weights held in bf16, fp32 masters in DistributedMuon (owner rank).

Checked on CPU (bf16 autocast works there; the same code runs on CUDA, ``tests/unit/test_gpu_path.py``):
which weights are chosen, the optimizer math against an fp32 reference, training, full-precision exports,
bit-exact checkpoint resume, weights-only resume, the refusal of mismatched checkpoints, the memory plan,
and config validation; two ranks (torchrun, gloo) in ``test_two_ranks_shard_the_masters``.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from kimivl_model.muon import apply_param_update_, build_param_groups
from kimivl_model.precision import low_precision_weights
from tasks.io.weights import load_safetensors
from tasks.train.checkpoint import CheckpointError, checkpoint_path
from tasks.train.distributed_muon import DistributedMuon
from tasks.train.engine import TrainEngine
from tasks.train.engine_config import EngineConfig
from tests.integration._engine_common import _assert_equal_state, _one_thread_and_clean_process_group  # noqa: F401
from tests.integration._engine_worker import engine_config, loss_fn, make_model, train

pytestmark = pytest.mark.integration


def _cfg(**kw) -> EngineConfig:
    return engine_config("muon", 0, m=2).model_copy(
        update={"precision": "bf16", "working_weights": "bf16", **kw}
    )


def test_chosen_weights_are_the_trainable_matmul_weights():
    model = make_model()
    model.model.layers[0].self_attn.o_proj.weight.requires_grad_(False)
    chosen = dict(low_precision_weights(model))
    assert (
        "model.layers.1.mlp.experts.gate_proj" in chosen and "model.layers.0.mlp.down_proj.weight" in chosen
    )
    assert "model.layers.0.self_attn.o_proj.weight" not in chosen  # frozen
    for name in chosen:  # no embedding, norm, router or bias
        assert not any(s in name for s in ("embed", "norm", "gate.weight", "bias")), name
    assert all(p.dim() >= 2 and p.requires_grad for p in chosen.values())
    tied = [p for p in chosen.values() if p is model.model.embed_tokens.weight]
    assert not tied  # a head tied to the embedding table stays fp32


def test_master_update_is_the_fp32_update_rounded():
    """One DistributedMuon step on a bf16 param == the fp32 rule applied to its master, then rounded."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(32, 16))
    ref = w.detach().clone()
    groups = [{"params": [w], "use_muon": True, "lr": 0.02, "weight_decay": 0.1}]
    opt = DistributedMuon(groups)
    opt.hold_in_low_precision([w])
    assert w.dtype == torch.bfloat16 and torch.equal(opt.state[w]["master"], ref)
    grad = torch.randn(32, 16)
    ref_state: dict = {}
    for _ in range(3):
        w.grad = grad.to(torch.bfloat16)
        opt.step()
        apply_param_update_(ref, w.grad.float(), ref_state, opt.param_groups[0])
    assert torch.equal(opt.state[w]["master"], ref)
    assert torch.equal(w, ref.to(torch.bfloat16))
    assert opt.state[w]["momentum_buffer"].dtype == torch.float32
    with pytest.raises(RuntimeError, match="already called"):
        opt.hold_in_low_precision([w])


def test_trains_exports_masters_and_resumes_bit_exactly(tmp_path):
    model = make_model()
    fp32_init = {k: v.clone() for k, v in model.state_dict().items()}
    eng = TrainEngine(model, _cfg(), loss_fn)
    chosen = dict(low_precision_weights(model))
    assert chosen and eng.low_precision_params == sum(p.numel() for p in chosen.values())
    assert all(p.dtype == torch.bfloat16 for p in chosen.values())
    assert model.model.embed_tokens.weight.dtype == torch.float32
    # the export before any step is the fp32 init itself, not its bf16 rounding
    _assert_equal_state(eng.full_state_dict(), fp32_init)

    hist = train(eng, model, 0, 4)
    eng.save_checkpoint(checkpoint_path(tmp_path, 4))
    hist += train(eng, model, 4, 12)
    losses = [h["loss"] for h in hist]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    final = eng.full_state_dict()
    exported = load_safetensors(eng.export_weights(tmp_path / "w.safetensors"))
    _assert_equal_state(exported, final)
    for name, p in chosen.items():  # the export holds the fp32 masters; the model holds their rounding
        assert exported[name].dtype == torch.float32 and torch.equal(exported[name].to(torch.bfloat16), p)
        assert not torch.equal(exported[name], p.float()), name

    again = make_model()
    eng2 = TrainEngine(again, _cfg(), loss_fn)
    eng2.load_checkpoint(checkpoint_path(tmp_path, 4))
    hist2 = train(eng2, again, 4, 12)
    assert [h["loss"] for h in hist2] == losses[4:]
    _assert_equal_state(eng2.full_state_dict(), final)

    # weights-only resume: the masters come from the fp32 file, not from the rounded params
    third = make_model()
    eng3 = TrainEngine(third, _cfg(), loss_fn)
    eng3.load_checkpoint(checkpoint_path(tmp_path, 4), weights_only_resume=True)
    ckpt_weights = load_safetensors(checkpoint_path(tmp_path, 4) / "model.safetensors")
    _assert_equal_state(eng3.full_state_dict(), ckpt_weights)


def test_checkpoint_of_the_other_working_weights_is_refused(tmp_path):
    model = make_model()
    eng = TrainEngine(model, engine_config("muon", 0, m=2).model_copy(update={"precision": "bf16"}), loss_fn)
    train(eng, model, 0, 1)
    eng.save_checkpoint(checkpoint_path(tmp_path, 1))
    other = make_model()
    eng2 = TrainEngine(other, _cfg(), loss_fn)
    with pytest.raises(CheckpointError, match="working_weights"):
        eng2.load_checkpoint(checkpoint_path(tmp_path, 1))


def test_config_validation():
    with pytest.raises(ValidationError, match="working_weights"):
        EngineConfig(optimizer="adamw", precision="bf16", working_weights="bf16")
    with pytest.raises(ValidationError, match="working_weights"):
        EngineConfig(optimizer="muon", precision="fp32", working_weights="bf16")
    # auto resolves to fp32 on CPU: refused when the engine is built, before any cast
    model = make_model()
    with pytest.raises(ValueError, match="resolved to 'fp32'"):
        TrainEngine(model, _cfg(precision="auto"), loss_fn)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_param_groups_see_the_same_tensors():
    """The engine casts the params in place: Muon's groups, the model and DeepSpeed share the tensors."""
    model = make_model()
    eng = TrainEngine(model, _cfg(muon_ns_dtype="bf16"), loss_fn)
    assert {g["ns_dtype"] for g in eng.optimizer.param_groups} == {"bf16"}  # train.muon_ns_dtype reaches Muon
    ids = {id(p) for g in eng.optimizer.param_groups for p in g["params"]}
    assert ids == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(build_param_groups(model, lr=1.0)) == len(eng.optimizer.param_groups)


@pytest.mark.timeout(300)
def test_two_ranks_shard_the_masters(tmp_path):
    """2 ranks (gloo, torchrun): each rank keeps the masters of the matrices it owns, and no more; the
    export gathers every master in fp32; training matches one rank within bf16 rounding (the bf16 gradients
    are summed in a different order)."""
    from tasks.train.checkpoint import rank_file, torch_load_plain
    from tests.integration.test_engine_checkpoints import _losses, run_two_ranks

    model = make_model()
    init = {k: v.float().clone() for k, v in model.state_dict().items()}
    eng = TrainEngine(
        model,
        engine_config("muon", 0).model_copy(update={"precision": "bf16", "working_weights": "bf16"}),
        loss_fn,
    )
    ref = [h["loss"] for h in train(eng, model, 0, 6)]
    ref_weights = eng.full_state_dict()
    low = dict(low_precision_weights(model))

    run_two_ranks("muon:0:bf16w", 6, tmp_path, timeout=240)
    out = tmp_path / "muon-z0-bf16w"
    losses = _losses(out / "steps.jsonl")
    assert [losses[s] for s in range(1, 7)] == pytest.approx(ref, rel=2e-2)
    exported = load_safetensors(out / "final.safetensors")
    assert all(exported[n].dtype == torch.float32 for n in low)
    assert exported.keys() == ref_weights.keys()
    # the bf16 gradients are summed in another order (2 + all-reduce vs 4 in a row): per bf16 matrix, the
    # two runs' weights differ by a small fraction of how far training moved them
    for n in low:
        moved = float((ref_weights[n] - init[n]).norm())
        apart = float((exported[n] - ref_weights[n]).norm())
        print(f"{n}: moved {moved:.3e}, 2 ranks vs 1 rank {apart:.3e}")
        assert apart < 0.1 * moved, (n, apart, moved)
    ckpt = checkpoint_path(out / "ckpt", 6)
    masters = []
    for rank in range(2):
        state = torch_load_plain(ckpt / rank_file("optimizer", rank))["state_dict"]["state"]
        masters.append(sum(st["master"].numel() for st in state.values() if "master" in st))
    assert all(m > 0 for m in masters) and sum(masters) == sum(p.numel() for p in low.values()), masters
