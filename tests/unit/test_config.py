import dataclasses

import pytest

from kimivl_model.config import ConfigError, LMConfig, MoonViTConfig, VLMConfig, preset


@pytest.mark.parametrize("name", ["tiny", "small", "a3b"])
def test_presets_build_and_round_trip(name):
    cfg = preset(name)
    assert cfg.name == name
    assert VLMConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*a3b"):
        preset("huge")


def test_a3b_numbers_match_reference():
    cfg = preset("a3b")
    assert (cfg.vit.patch_size, cfg.vit.hidden_size, cfg.vit.num_layers, cfg.vit.num_heads) == (
        14,
        1152,
        27,
        16,
    )
    assert cfg.vit.head_dim == 72 and cfg.vit.intermediate_size == 4304 and cfg.vit.pos_table_size == (64, 64)
    lm = cfg.lm
    assert (lm.vocab_size, lm.hidden_size, lm.num_layers, lm.num_heads) == (163840, 2048, 27, 16)
    assert lm.q_lora_rank is None and lm.kv_lora_rank == 512
    assert (lm.qk_nope_head_dim, lm.qk_rope_head_dim, lm.v_head_dim) == (128, 64, 128)
    assert lm.softmax_scale == pytest.approx(192**-0.5)
    assert (lm.num_routed_experts, lm.num_experts_per_tok, lm.num_shared_experts) == (64, 6, 2)
    assert lm.first_k_dense == 1 and lm.intermediate_size == 11264 and lm.moe_intermediate_size == 1408
    assert lm.routed_scaling_factor == 2.446 and lm.rope_theta == 50000.0
    assert cfg.coca.caption_loss_weight == 2.0 and cfg.coca.siglip_bias_init == -10.0


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        (lambda: MoonViTConfig(hidden_size=100, num_heads=3), "MoonViTConfig.hidden_size"),
        (lambda: MoonViTConfig(hidden_size=40, num_heads=4), "MoonViTConfig.num_heads"),
        (lambda: LMConfig(num_experts_per_tok=99), "LMConfig.num_experts_per_tok"),
        (lambda: LMConfig(rope_theta=-1), "LMConfig.rope_theta"),
        (lambda: LMConfig(first_k_dense=99), "LMConfig.first_k_dense"),
        (lambda: LMConfig(qk_rope_head_dim=7), "LMConfig.qk_rope_head_dim"),
    ],
)
def test_invalid_configs_name_the_field(factory, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        factory()


def test_mismatched_projector_is_rejected():
    cfg = preset("tiny")
    with pytest.raises(ConfigError, match=r"projector\.lm_hidden_size"):
        dataclasses.replace(cfg, projector=dataclasses.replace(cfg.projector, lm_hidden_size=7))


def test_from_dict_rejects_unknown_keys():
    d = preset("tiny").to_dict()
    d["lm"]["bogus"] = 1
    with pytest.raises(ConfigError, match=r"VLMConfig\.lm\.bogus"):
        VLMConfig.from_dict(d)
