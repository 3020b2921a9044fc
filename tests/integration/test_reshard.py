"""Resume on another world size with the optimizer state kept: a muon checkpoint saved by 2 ranks resumes
on 1 rank, and one saved by 1 rank resumes on 2 (torchrun, gloo); the continued losses and the final
weights equal an uninterrupted 1-rank run's (Muon momentum and AdamW moments move to their new owners).
The same with the 2 ranks splitting the experts (``ep2``: ``train.expert_parallel: 2``): the expert
momentum is reassembled from, or cut into, the EP shards."""

from __future__ import annotations

import copy

import pytest
import torch

from tasks.io.weights import load_safetensors
from tasks.train.checkpoint import checkpoint_path, torch_load_plain
from tasks.train.engine import TrainEngine
from tests.integration._engine_common import _one_thread_and_clean_process_group  # noqa: F401
from tests.integration._engine_worker import engine_config, loss_fn, make_model, train
from tests.integration.test_engine_checkpoints import _losses, run_two_ranks

pytestmark = pytest.mark.integration
SAVE, END = 3, 6


@pytest.fixture(scope="module")
def reference():
    model = make_model()
    eng = TrainEngine(model, engine_config("muon", 0), loss_fn)
    saved = {}

    def on_step(s, r):
        if r.step == SAVE:
            saved["optimizer"] = copy.deepcopy(eng.optimizer.state_dict())  # live tensors otherwise

    history = train(eng, model, 0, END, on_step)
    return {"losses": [h["loss"] for h in history], "weights": eng.full_state_dict(), **saved}


def _close(weights: dict, ref: dict) -> None:
    assert weights.keys() == ref.keys()
    for name, w in ref.items():
        assert weights[name].shape == w.shape, name
        assert float((weights[name] - w).abs().max()) <= 1e-5 * max(float(w.abs().max()), 1e-3), name


VARIANTS = pytest.mark.parametrize(
    "variant", ["", ":ep2", ":dcp", ":ep2:dcp"], ids=["dp", "ep2", "dp-sharded-ckpt", "ep2-sharded-ckpt"]
)


def _shard_files(ckpt, variant: str, reference) -> None:
    """What each of the 2 ranks wrote: its optimizer shard (gathered format), or its DCP data file
    (sharded format: together the weights and the optimizer state once, no duplicate; each rank a share)."""
    if ":dcp" not in variant:
        shards = [torch_load_plain(ckpt / f"optimizer/rank-{r:05d}.pt")["state_dict"] for r in range(2)]
        assert all(len(sd["state"]) > 0 for sd in shards)  # each rank saved only the state it owned
        assert [sd["ep_rank"] for sd in shards] == ([0, 1] if ":ep2" in variant else [0, 0])
        return
    assert not (ckpt / "model.safetensors").exists() and not (ckpt / "optimizer").exists()
    sizes = [(ckpt / "state" / f"__{r}_0.distcp").stat().st_size for r in range(2)]
    weights = sum(t.numel() * t.element_size() for t in make_model().state_dict().values())
    state = sum(
        v.numel() * v.element_size()
        for st in reference["optimizer"]["state"].values()
        for v in st.values()
        if torch.is_tensor(v)
    )
    assert weights + state <= sum(sizes) <= 1.15 * (weights + state), (sizes, weights, state)
    assert min(sizes) > 0.3 * sum(sizes), sizes


def _cfg(variant: str):
    return engine_config("muon", 0).model_copy(
        update={"checkpoint_format": "sharded" if ":dcp" in variant else "gathered"}
    )


def _out(tmp_path, variant: str):
    return tmp_path / ("muon-z0" + variant.replace(":", "-"))


@VARIANTS
@pytest.mark.timeout(300)
def test_two_ranks_saved_one_rank_resumes(tmp_path, reference, variant):
    run_two_ranks("muon:0" + variant, SAVE, tmp_path, timeout=240)  # the worker's final checkpoint at SAVE
    ckpt = checkpoint_path(_out(tmp_path, variant) / "ckpt", SAVE)
    _shard_files(ckpt, variant, reference)
    model = make_model(seed=123)
    eng = TrainEngine(model, engine_config("muon", 0), loss_fn)  # loads either format
    assert eng.load_checkpoint(ckpt) == {"next_step": SAVE} and eng.step == SAVE
    # the momentum of every param, gathered from both shards, is the 1-rank run's at the same step
    got, want = eng.optimizer.state_dict()["state"], reference["optimizer"]["state"]
    assert got.keys() == want.keys()
    for pid, st in want.items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.is_floating_point():
                assert got[pid][k].shape == v.shape, (pid, k)
                assert torch.allclose(got[pid][k], v, rtol=1e-4, atol=1e-7), (pid, k)
    history = train(eng, model, SAVE, END)
    assert [h["loss"] for h in history] == pytest.approx(reference["losses"][SAVE:], rel=1e-5)
    _close(eng.full_state_dict(), reference["weights"])


@VARIANTS
@pytest.mark.timeout(300)
def test_one_rank_saved_two_ranks_resume(tmp_path, reference, variant):
    model = make_model()
    eng = TrainEngine(model, _cfg(variant), loss_fn)
    train(eng, model, 0, SAVE)
    out = _out(tmp_path, variant)
    eng.save_checkpoint(checkpoint_path(out / "ckpt", SAVE), {"next_step": SAVE})
    run_two_ranks("muon:0" + variant, END, tmp_path, 240, "--resume")
    losses = _losses(out / "steps.jsonl")
    assert sorted(losses) == list(range(SAVE + 1, END + 1))  # only the resumed steps ran
    assert [losses[s] for s in range(SAVE + 1, END + 1)] == pytest.approx(
        reference["losses"][SAVE:], rel=1e-5
    )
    _close(load_safetensors(out / "final.safetensors"), reference["weights"])
