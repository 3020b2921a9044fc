"""``train.frozen_weights: bf16``: frozen matmul weights held in bf16 (the LM in the vit/align phases),
saved from the phase's starting checkpoint so no rounded value reaches a checkpoint. On CPU under bf16
autocast: the same losses as fp32-held frozen weights, bit-exact fp32 frozen tensors in every save, the
memory plan byte for byte, and the refusals."""

from __future__ import annotations

import pytest
import torch
import yaml
from pydantic import ValidationError

from kimivl_model.precision import frozen_matmul_weights
from tasks.io.weights import load_safetensors, save_safetensors_atomic
from tasks.recipe import recipe_from_dict
from tasks.train.engine import TrainEngine
from tasks.train.engine_config import EngineConfig
from tasks.train.runner import lm_loss
from tests.integration._engine_common import _one_thread_and_clean_process_group  # noqa: F401
from tests.integration._engine_worker import engine_config, loss_fn, make_model, train
from tests.integration.test_memory_plan import ROOT, _bytes, plan_and_model

pytestmark = pytest.mark.integration


def _frozen_model():
    model = make_model()
    for p in model.model.layers[0].parameters():  # a frozen decoder layer, as the LM in align
        p.requires_grad_(False)
    return model


def _engine(model, tmp_path, frozen: str, source=True, **update):
    path = tmp_path / "start.safetensors"
    if source and not path.exists():
        save_safetensors_atomic({k: v.detach().clone() for k, v in model.state_dict().items()}, path)
    cfg = engine_config("muon", 0).model_copy(
        update={"precision": "bf16", "frozen_weights": frozen, **update}
    )
    return TrainEngine(model, cfg, loss_fn, frozen_source=path if source else None)


def test_frozen_bf16_trains_like_fp32_and_saves_the_exact_start(tmp_path):
    ref_model = _frozen_model()
    ref = train(_engine(ref_model, tmp_path, "fp32"), ref_model, 0, 3)
    model = _frozen_model()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    eng = _engine(model, tmp_path, "bf16")
    chosen = dict(frozen_matmul_weights(model))
    assert chosen and eng.frozen_low == set(chosen)
    assert all(p.dtype == torch.bfloat16 for p in chosen.values())
    got = train(eng, model, 0, 3)
    # autocast casts a frozen fp32 weight to the same bf16 values at each use: the same GEMMs
    assert [h["loss"] for h in got] == pytest.approx([h["loss"] for h in ref], rel=1e-6)
    exported = load_safetensors(eng.export_weights(tmp_path / "final.safetensors"))
    for name in chosen:
        assert exported[name].dtype == torch.float32 and torch.equal(exported[name], start[name]), name
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(not torch.equal(exported[n], start[n]) for n in trained)
    # a checkpoint holds the exact fp32 start too, and a resume keeps the frozen weights in bf16
    ckpt = eng.save_checkpoint(tmp_path / "ckpt" / "step-3", {"next_step": 3})
    saved = load_safetensors(ckpt / "model.safetensors")
    assert all(torch.equal(saved[n], start[n]) for n in chosen)
    resumed_model = _frozen_model()
    resumed = _engine(resumed_model, tmp_path, "bf16")
    resumed.load_checkpoint(ckpt)
    assert all(p.dtype == torch.bfloat16 for _, p in frozen_matmul_weights(resumed_model))
    assert [h["loss"] for h in train(resumed, resumed_model, 3, 4)] == pytest.approx(
        [h["loss"] for h in train(eng, model, 3, 4)], rel=1e-6
    )


def test_frozen_bf16_with_sharded_checkpoints(tmp_path):
    """``checkpoint_format: sharded``: the frozen bf16 weights reach the checkpoint as the exact fp32 start
    (read from the starting file by one rank), the trained ones as trained; a resume equals continuing."""
    from tasks.train.sharded_checkpoint import read_model_tensors

    model = _frozen_model()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    eng = _engine(model, tmp_path, "bf16", checkpoint_format="sharded")
    train(eng, model, 0, 3)
    ckpt = eng.save_checkpoint(tmp_path / "ckpt" / "step-3", {"next_step": 3})
    saved = read_model_tensors(ckpt / "state")
    assert saved.keys() == start.keys() and not (ckpt / "model.safetensors").exists()
    for name in eng.frozen_low:
        assert saved[name].dtype == torch.float32 and torch.equal(saved[name], start[name]), name
    assert saved.keys() == eng.full_state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in eng.full_state_dict().items())
    resumed_model = _frozen_model()
    resumed = _engine(resumed_model, tmp_path, "bf16")
    resumed.load_checkpoint(ckpt)
    assert [h["loss"] for h in train(resumed, resumed_model, 3, 5)] == pytest.approx(
        [h["loss"] for h in train(eng, model, 3, 5)], rel=1e-6
    )


def test_frozen_bf16_refusals(tmp_path):
    # from scratch there is no exact copy to save them from: they stay fp32
    model = _frozen_model()
    assert not _engine(model, tmp_path, "bf16", source=False).frozen_low
    assert {p.dtype for _, p in frozen_matmul_weights(model)} == {torch.float32}
    with pytest.raises(ValueError, match="starting checkpoint .* is missing"):
        cfg = engine_config("muon", 0).model_copy(update={"precision": "bf16", "frozen_weights": "bf16"})
        TrainEngine(_frozen_model(), cfg, loss_fn, frozen_source=tmp_path / "gone.safetensors")
    other = tmp_path / "other.safetensors"
    save_safetensors_atomic({"x": torch.zeros(2)}, other)
    cfg = engine_config("muon", 0).model_copy(update={"precision": "bf16", "frozen_weights": "bf16"})
    with pytest.raises(ValueError, match="has no tensor 'model.layers.0"):
        TrainEngine(_frozen_model(), cfg, loss_fn, frozen_source=other)
    with pytest.raises(ValidationError, match="frozen_weights: 'bf16' needs bf16 autocast"):
        EngineConfig(precision="fp32", frozen_weights="bf16")


def test_plan_with_frozen_bf16_weights_is_what_the_engine_allocates(tmp_path):
    """The align phase (LM frozen) with frozen_weights bf16: the plan's weights byte for byte."""
    plan, model, cfg = plan_and_model("align", frozen_weights="bf16")
    source = tmp_path / "start.safetensors"
    save_safetensors_atomic({k: v.detach().clone() for k, v in model.state_dict().items()}, source)
    eng = TrainEngine(model, cfg, lm_loss, frozen_source=source)
    params = list({id(p): p for p in model.parameters()}.values())
    assert plan.weights == _bytes(params)
    held = sum(p.numel() for p in params if p.dtype == torch.bfloat16)
    assert held == sum(p.numel() for _, p in frozen_matmul_weights(model)) > 0.5 * plan.params
    assert len(eng.frozen_low) > 0


def test_the_engine_gets_the_file_the_phase_starts_from(tmp_path):
    """``start_weights_file`` names the file ``build_model`` loads: none from scratch, the previous phase's
    final weights, or the recipe's init checkpoint for the first phase."""
    from tasks.train.phase_model import start_weights_file

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    recipe = recipe_from_dict(raw, "params.yaml")
    first, second = recipe.phases[0], recipe.phases[1]
    assert start_weights_file(recipe, first, tmp_path) is None
    want = tmp_path / "phases" / first.name / "final" / "model.safetensors"
    assert start_weights_file(recipe, second, tmp_path) == want
    init = tmp_path / "imported"
    raw["model"]["init_checkpoint"] = str(init)
    recipe = recipe_from_dict(raw, "params.yaml")
    assert start_weights_file(recipe, recipe.phases[0], tmp_path) == init / "model.safetensors"
