"""``train.expert_parallel``: the routed experts split over 2 ranks (torchrun, gloo; all-to-all token exchange,
expert shards owned and reduced within their expert-data-parallel group) train like 1 rank holding every
expert, with bf16 working weights too, and through a launched recipe phase. Resuming an EP-2 checkpoint on
1 rank and a 1-rank checkpoint with EP 2 (Muon momentum reassembled / cut): ``test_reshard.py``."""

from __future__ import annotations

import pytest
import torch

from tasks.io.weights import load_safetensors
from tasks.train.checkpoint import checkpoint_path, torch_load_plain
from tasks.train.engine import TrainEngine
from tests.integration._engine_common import _one_thread_and_clean_process_group  # noqa: F401
from tests.integration._engine_worker import engine_config, loss_fn, make_model, train
from tests.integration.test_engine_checkpoints import _losses, run_two_ranks
from tests.integration.test_launch_sequence_parallel import assert_launched_weights_match, launch_phase

pytestmark = pytest.mark.integration
SAVE, END = 3, 6
EXPERTS = "model.layers.1.mlp.experts.gate_proj"  # the tiny LM's MoE layer: 4 experts, 2 per EP rank


@pytest.fixture(scope="module")
def reference():
    """1 rank, every expert, plain Muon: losses, grad norms and weights at END."""
    model = make_model()
    eng = TrainEngine(model, engine_config("muon", 0), loss_fn)
    history = train(eng, model, 0, END)
    return {
        "losses": [h["loss"] for h in history],
        "norms": [h["grad_norm"] for h in history],
        "weights": eng.full_state_dict(),
    }


def _close(weights: dict, ref: dict, rel: float = 1e-5) -> None:
    assert weights.keys() == ref.keys()
    for name, w in ref.items():
        assert weights[name].shape == w.shape, name
        assert float((weights[name] - w).abs().max()) <= rel * max(float(w.abs().max()), 1e-3), name


@pytest.mark.timeout(300)
def test_two_ep_ranks_train_like_one_rank(tmp_path, reference):
    run_two_ranks("muon:0:ep2", END, tmp_path, timeout=240)
    out = tmp_path / "muon-z0-ep2"
    losses, norms = _losses(out / "steps.jsonl"), _losses(out / "steps.jsonl", "grad_norm")
    assert [losses[s] for s in range(1, END + 1)] == pytest.approx(reference["losses"], rel=1e-5)
    assert [norms[s] for s in range(1, END + 1)] == pytest.approx(reference["norms"], rel=1e-4)
    _close(load_safetensors(out / "final.safetensors"), reference["weights"])  # whole expert stacks
    # each rank kept the Muon momentum of its own 2 experts only
    ckpt = checkpoint_path(out / "ckpt", END)
    shards = [torch_load_plain(ckpt / f"optimizer/rank-{r:05d}.pt")["state_dict"] for r in range(2)]
    assert [(sd["expert_parallel"], sd["ep_rank"]) for sd in shards] == [(2, 0), (2, 1)]
    pid = next(i for i, n in enumerate(n for g in _group_names(reference) for n in g) if n == EXPERTS)
    owned = [sd["state"][pid]["momentum_buffer"] for sd in shards]  # expert-DP group of 1: each rank owns it
    assert [tuple(m.shape) for m in owned] == [(2, 32, 64), (2, 32, 64)]
    assert not torch.equal(owned[0], owned[1])


def _group_names(reference) -> list[list[str]]:
    """The param names of each optimizer group, in the optimizer's order (ids are positions in it)."""
    from kimivl_model.muon import build_param_groups

    model = make_model()
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in build_param_groups(model, lr=1.0)]


def _saved_experts(ckpt) -> torch.Tensor:
    """The whole fp32 expert stack a checkpoint holds, read straight from its files (either format)."""
    if (ckpt / "model.safetensors").exists():
        return load_safetensors(ckpt / "model.safetensors")[EXPERTS]
    from tasks.train.sharded_checkpoint import read_model_tensors

    return read_model_tensors(ckpt / "state", [EXPERTS])[EXPERTS]  # one slice per EP rank, concatenated


@pytest.mark.parametrize("fmt", ["gathered", "sharded"])
@pytest.mark.timeout(300)
def test_ep2_with_bf16_working_weights_a3b_combination(tmp_path, fmt):
    """a3b's combination: EP 2 with bf16 working weights (fp32 masters on the owners), sharded gradients and
    either checkpoint format. The checkpoint holds the fp32 masters of the whole expert stacks (gathered:
    one file; sharded: a slice per EP rank); a 1-rank run resumes with exactly those masters and continues
    like an uninterrupted 1-rank bf16 run (bf16 rounding apart)."""
    bf16 = {"precision": "bf16", "working_weights": "bf16"}
    model = make_model()
    eng = TrainEngine(model, engine_config("muon", 0).model_copy(update=bf16), loss_fn)
    ref = [h["loss"] for h in train(eng, model, 0, END)]

    variant = "muon:0:bf16w:ep2" + (":dcp" if fmt == "sharded" else "")
    run_two_ranks(variant, SAVE, tmp_path, timeout=240)
    out = tmp_path / variant.replace("muon:0", "muon-z0").replace(":", "-")
    losses = _losses(out / "steps.jsonl")
    assert [losses[s] for s in range(1, SAVE + 1)] == pytest.approx(ref[:SAVE], rel=2e-2)
    ckpt = checkpoint_path(out / "ckpt", SAVE)
    saved = _saved_experts(ckpt)
    # the phase-end export (streamed tensor by tensor with the sharded format) is the checkpoint's weights
    final = load_safetensors(out / "final.safetensors")
    if fmt == "gathered":
        in_ckpt = load_safetensors(ckpt / "model.safetensors")
    else:
        from tasks.train.sharded_checkpoint import read_model_tensors

        in_ckpt = read_model_tensors(ckpt / "state")
    assert final.keys() == in_ckpt.keys()
    assert all(torch.equal(final[k], v) and final[k].dtype == v.dtype for k, v in in_ckpt.items())
    assert saved.dtype == torch.float32 and tuple(saved.shape) == (4, 32, 64)
    # the saved experts are fp32 masters, not the bf16 working copies
    assert not torch.equal(saved, saved.to(torch.bfloat16).float())

    model = make_model(seed=123)
    eng = TrainEngine(model, engine_config("muon", 0).model_copy(update=bf16), loss_fn)
    eng.load_checkpoint(ckpt)
    masters = eng._muon.master_weights(dst=0)
    param = dict(model.named_parameters())[EXPERTS]
    assert torch.equal(masters[id(param)], saved)  # reassembled from both EP shards
    history = train(eng, model, SAVE, END)
    assert [h["loss"] for h in history] == pytest.approx(ref[SAVE:], rel=2e-2)


@pytest.mark.timeout(900)
def test_launched_joint_phase_with_expert_parallel(tiny_data, tmp_path):
    """The whole path a recipe takes: the tiny recipe's joint_pretrain phase (images and text, ViT +
    projector + MoE LM) launched on 2 ranks with ``train.expert_parallel: 2`` trains like the same 2 ranks
    without it: losses within 1e-5; every Muon-updated matrix (the expert stacks, whole, included) within 1e-5
    of its magnitude. The EP path sums each token's expert outputs in another order than the CPU
    ``embedding_bag`` combine; where a gradient is at rounding level (a key bias, whose exact gradient is 0;
    an embedding row seen once), AdamW's normalisation turns that rounding into a sizeable step, so the
    AdamW-updated params are checked element-wise: 99.9% of their elements within 1e-5 of the magnitude, none
    off by more than a tenth of one LR step."""
    runs = {}
    for name, ep in (("plain", 1), ("ep2", 2)):
        recipe, losses, final, _ = launch_phase(tiny_data, tmp_path, name, 2, train={"expert_parallel": ep})
        runs[name] = (losses, final)
    (plain, plain_w), (ep, ep_w) = runs["plain"], runs["ep2"]
    assert len(plain) >= 4 and ep == pytest.approx(plain, rel=1e-5)
    key = "language_model.model.layers.1.mlp.experts.gate_proj"
    assert ep_w[key].shape == plain_w[key].shape and ep_w[key].shape[0] == 8
    assert_launched_weights_match(ep_w, plain_w, recipe)
