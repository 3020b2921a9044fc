"""Conversion to/from the public Kimi-VL checkpoint layout."""

import json

import pytest
import torch

from kimivl_model.config import preset
from kimivl_model.hf_interop import (
    CheckpointLayoutError,
    from_hf_config,
    from_hf_state_dict,
    to_hf_config,
    to_hf_state_dict,
)
from kimivl_model.summary import build_meta_model
from kimivl_model.vlm import KimiVL
from tasks.io.weights import load_hf, load_native, save_hf, save_native, verify_loadable

CFG = preset("tiny")


def test_state_dict_round_trip_is_exact():
    m = KimiVL(CFG, attn_backend="sdpa")
    sd = m.state_dict()
    back = from_hf_state_dict(to_hf_state_dict(sd, CFG), CFG)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_hf_layout_of_a3b_matches_public_checkpoint_names():
    cfg = preset("a3b")
    meta = build_meta_model(cfg).state_dict()
    hf = to_hf_state_dict(meta, cfg)
    expect = {
        "vision_tower.patch_embed.proj.weight": (1152, 3, 14, 14),
        "vision_tower.patch_embed.pos_emb.weight": (64, 64, 1152),
        "vision_tower.encoder.blocks.26.wqkv.weight": (3456, 1152),
        "vision_tower.encoder.blocks.0.mlp.fc0.weight": (4304, 1152),
        "vision_tower.encoder.final_layernorm.weight": (1152,),
        "multi_modal_projector.pre_norm.weight": (1152,),
        "multi_modal_projector.linear_1.weight": (4608, 4608),
        "multi_modal_projector.linear_2.weight": (2048, 4608),
        "language_model.model.embed_tokens.weight": (163840, 2048),
        "language_model.model.layers.0.mlp.gate_proj.weight": (11264, 2048),
        "language_model.model.layers.1.self_attn.q_proj.weight": (3072, 2048),
        "language_model.model.layers.1.self_attn.kv_a_proj_with_mqa.weight": (576, 2048),
        "language_model.model.layers.1.self_attn.kv_a_layernorm.weight": (512,),
        "language_model.model.layers.1.self_attn.kv_b_proj.weight": (4096, 512),
        "language_model.model.layers.1.self_attn.o_proj.weight": (2048, 2048),
        "language_model.model.layers.1.mlp.gate.weight": (64, 2048),
        "language_model.model.layers.1.mlp.gate.e_score_correction_bias": (64,),
        "language_model.model.layers.26.mlp.experts.63.down_proj.weight": (2048, 1408),
        "language_model.model.layers.26.mlp.experts.0.gate_proj.weight": (1408, 2048),
        "language_model.model.layers.1.mlp.shared_experts.up_proj.weight": (2816, 2048),
        "language_model.model.norm.weight": (2048,),
        "language_model.lm_head.weight": (163840, 2048),
    }
    for k, shape in expect.items():
        assert k in hf, k
        assert tuple(hf[k].shape) == shape, k
    assert not any(k.startswith("coca.") for k in hf)
    n_expert_keys = sum(1 for k in hf if ".mlp.experts." in k)
    assert n_expert_keys == 26 * 64 * 3


def test_missing_expert_is_named():
    hf = to_hf_state_dict(KimiVL(CFG, attn_backend="sdpa").state_dict(), CFG)
    del hf["language_model.model.layers.2.mlp.experts.3.up_proj.weight"]
    with pytest.raises(CheckpointLayoutError, match=r"layers\.2\.mlp\.experts\.\*\.up_proj.*missing \[3\]"):
        from_hf_state_dict(hf, CFG)


def test_config_round_trip():
    for name in ("tiny", "a3b"):
        cfg = preset(name)
        back = from_hf_config(json.loads(json.dumps(to_hf_config(cfg))), name=name)
        assert back.vit == cfg.vit and back.lm == cfg.lm and back.projector == cfg.projector
        assert back.media_pad_token_id == cfg.media_pad_token_id


def test_unsupported_hf_config_is_rejected():
    hf = to_hf_config(CFG)
    hf["text_config"]["scoring_func"] = "softmax"
    with pytest.raises(CheckpointLayoutError, match="scoring_func"):
        from_hf_config(hf)


def test_files_round_trip_give_identical_outputs(tmp_path):
    torch.manual_seed(1)
    m = KimiVL(CFG, attn_backend="sdpa").eval()
    save_hf(m.state_dict(), CFG, tmp_path / "hf", max_shard_bytes=200_000)  # force several shards
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    cfg2, sd = load_hf(tmp_path / "hf", name="tiny")
    verify_loadable(cfg2, sd)
    save_native(sd, cfg2, tmp_path / "native")
    cfg3, sd3 = load_native(tmp_path / "native")
    m2 = KimiVL(cfg3, attn_backend="sdpa").eval()
    m2.load_state_dict(sd3, strict=True)
    ids = torch.arange(10, 60)
    torch.testing.assert_close(m(ids).logits, m2(ids).logits, rtol=0, atol=0)


def test_verify_loadable_names_bad_tensors():
    sd = KimiVL(CFG, attn_backend="sdpa").state_dict()
    sd["language_model.model.norm.weight"] = torch.ones(3)
    sd.pop("multi_modal_projector.linear_1.bias")
    with pytest.raises(CheckpointLayoutError, match="linear_1.bias.*norm.weight: expected"):
        verify_loadable(CFG, sd)
