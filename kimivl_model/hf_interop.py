"""Conversion between this library's state dict and the public Kimi-VL checkpoint layout.

The public checkpoint (``KimiVLForConditionalGeneration``: MoonViT ``vision_tower``, ``multi_modal_projector``,
DeepSeek-V3 ``language_model``) stores one ``nn.Linear`` per routed expert:
``language_model.model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``. This library keeps the
routed experts of a layer stacked in 3-D tensors ``mlp.experts.{gate,up,down}_proj`` of shape
(E, out, in) so tokens can be dispatched grouped by expert and Muon can orthogonalise each expert's matrix
in one batched call. All other tensors share names and layouts with the public checkpoint on purpose
(adjacent-pair RoPE, fused ViT ``wqkv`` laid out [q | k | v], the projector's (kernel_row, kernel_col)
pixel-shuffle order), so the mapping below is complete and explicit.

Pure functions on dicts of tensors: no file I/O here (``tasks/io/weights.py`` reads and writes safetensors).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from kimivl_model.config import CoCaConfig, LMConfig, MoonViTConfig, ProjectorConfig, VLMConfig

_EXPERT_STACKED = re.compile(
    r"^(language_model\.model\.layers\.(\d+)\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$"
)
_EXPERT_SINGLE = re.compile(
    r"^(language_model\.model\.layers\.(\d+)\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$"
)
# tensors some exports carry that hold no learned state (recomputed from the config)
_IGNORABLE = re.compile(r"(rotary_emb\.inv_freq|rope_2d\.|\.freqs_cis)$")
# the ViT-stage head is not part of the exported VLM
_NOT_EXPORTED = ("coca.",)


class CheckpointLayoutError(ValueError):
    """A state dict does not match the expected layout; the message names the offending keys."""


def hf_names(key: str, shape: tuple[int, ...], cfg: VLMConfig) -> list[tuple[str, int | None]]:
    """The public names of this library's tensor ``key`` (of ``shape``): [(name, expert index or None)];
    a stacked expert tensor (E, out, in) is E public tensors (its slices), a CoCa tensor none."""
    if key.startswith(_NOT_EXPORTED):
        return []
    m = _EXPERT_STACKED.match(key)
    if not m:
        return [(key, None)]
    prefix, _, proj = m.groups()
    if shape[0] != cfg.lm.num_routed_experts:
        raise CheckpointLayoutError(
            f"{key}: expected {cfg.lm.num_routed_experts} stacked experts, got shape {tuple(shape)}"
        )
    return [(f"{prefix}.{e}.{proj}.weight", e) for e in range(shape[0])]


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], cfg: VLMConfig) -> dict[str, torch.Tensor]:
    """This library's ``KimiVL.state_dict()`` -> public Kimi-VL key names and layouts."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        for name, e in hf_names(key, tuple(t.shape), cfg):
            out[name] = t if e is None else t[e].contiguous()
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: VLMConfig) -> dict[str, torch.Tensor]:
    """Public Kimi-VL key names -> this library's state dict (experts stacked per layer).

    Every routed expert of every MoE layer must be present exactly once; a missing expert is an error
    naming it. Tensors that carry no learned state (RoPE caches) are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, t in hf.items():
        if _IGNORABLE.search(key):
            continue
        m = _EXPERT_SINGLE.match(key)
        if m:
            prefix, _, e, proj = m.groups()
            experts.setdefault((prefix, proj), {})[int(e)] = t
            continue
        out[key] = t
    n = cfg.lm.num_routed_experts
    for (prefix, proj), by_idx in sorted(experts.items()):
        missing = sorted(set(range(n)) - set(by_idx))
        extra = sorted(set(by_idx) - set(range(n)))
        if missing or extra:
            raise CheckpointLayoutError(
                f"{prefix}.*.{proj}.weight: expected experts 0..{n - 1}; missing {missing[:8]}, unexpected {extra[:8]}"
            )
        out[f"{prefix}.{proj}"] = torch.stack([by_idx[e] for e in range(n)], dim=0)
    return out


# ------------------------------------------------------------------------------------------- config


def to_hf_config(cfg: VLMConfig) -> dict[str, Any]:
    """A ``config.json`` in the public Kimi-VL format (model_type kimi_vl, DeepSeek-V3 text config)."""
    v, lm = cfg.vit, cfg.lm
    return {
        "architectures": ["KimiVLForConditionalGeneration"],
        "model_type": "kimi_vl",
        "ignore_index": cfg.ignore_index,
        "media_placeholder_token_id": cfg.media_pad_token_id,
        "vision_config": {
            "model_type": "moonvit",
            "patch_size": v.patch_size,
            "init_pos_emb_height": v.pos_table_size[0],
            "init_pos_emb_width": v.pos_table_size[1],
            "num_attention_heads": v.num_heads,
            "num_hidden_layers": v.num_layers,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "merge_kernel_size": list(cfg.projector.merge_kernel),
        },
        "text_config": {
            "model_type": "deepseek_v3",
            "vocab_size": lm.vocab_size,
            "hidden_size": lm.hidden_size,
            "intermediate_size": lm.intermediate_size,
            "moe_intermediate_size": lm.moe_intermediate_size,
            "num_hidden_layers": lm.num_layers,
            "num_attention_heads": lm.num_heads,
            "num_key_value_heads": lm.num_heads,
            "n_shared_experts": lm.num_shared_experts,
            "n_routed_experts": lm.num_routed_experts,
            "routed_scaling_factor": lm.routed_scaling_factor,
            "kv_lora_rank": lm.kv_lora_rank,
            "q_lora_rank": lm.q_lora_rank,
            "qk_rope_head_dim": lm.qk_rope_head_dim,
            "qk_nope_head_dim": lm.qk_nope_head_dim,
            "v_head_dim": lm.v_head_dim,
            "topk_method": "noaux_tc",
            "n_group": 1,
            "topk_group": 1,
            "num_experts_per_tok": lm.num_experts_per_tok,
            "moe_layer_freq": 1,
            "first_k_dense_replace": lm.first_k_dense,
            "norm_topk_prob": lm.norm_topk_prob,
            "scoring_func": "sigmoid",
            "aux_loss_alpha": lm.aux_loss_alpha,
            "seq_aux": True,
            "hidden_act": "silu",
            "max_position_embeddings": lm.max_position_embeddings,
            "initializer_range": lm.initializer_range,
            "rms_norm_eps": lm.rms_norm_eps,
            "rope_theta": lm.rope_theta,
            "rope_scaling": None,
            "tie_word_embeddings": lm.tie_word_embeddings,
        },
    }


def from_hf_config(hf: dict[str, Any], name: str = "imported") -> VLMConfig:
    """Public ``config.json`` -> ``VLMConfig``; unsupported settings are errors naming the field."""
    if hf.get("model_type") not in (None, "kimi_vl"):
        raise CheckpointLayoutError(
            f"config.json model_type: expected 'kimi_vl', got {hf.get('model_type')!r}"
        )
    try:  # the placeholder id is the tokenizer's: never assumed (checked against it on import)
        v, t, pad_id = hf["vision_config"], hf["text_config"], hf["media_placeholder_token_id"]
    except KeyError as e:
        raise CheckpointLayoutError(f"config.json: missing {e.args[0]!r}") from None
    for field_name, expected in (("scoring_func", "sigmoid"), ("hidden_act", "silu"), ("moe_layer_freq", 1)):
        if t.get(field_name, expected) != expected:
            raise CheckpointLayoutError(
                f"config.json text_config.{field_name}: only {expected!r} is supported, got {t[field_name]!r}"
            )
    if (t.get("n_group") or 1) != 1 or (t.get("topk_group") or 1) != 1:
        raise CheckpointLayoutError(
            "config.json text_config.n_group/topk_group: only 1 (no group routing) is supported"
        )
    if t.get("rope_scaling"):
        raise CheckpointLayoutError(
            f"config.json text_config.rope_scaling: not supported, got {t['rope_scaling']!r}"
        )
    vit = MoonViTConfig(
        patch_size=v.get("patch_size", 14),
        hidden_size=v["hidden_size"],
        num_layers=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"],
        intermediate_size=v["intermediate_size"],
        pos_table_size=(v.get("init_pos_emb_height", 64), v.get("init_pos_emb_width", 64)),
    )
    lm = LMConfig(
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        num_layers=t["num_hidden_layers"],
        num_heads=t["num_attention_heads"],
        q_lora_rank=t.get("q_lora_rank"),
        kv_lora_rank=t["kv_lora_rank"],
        qk_nope_head_dim=t["qk_nope_head_dim"],
        qk_rope_head_dim=t["qk_rope_head_dim"],
        v_head_dim=t["v_head_dim"],
        intermediate_size=t["intermediate_size"],
        moe_intermediate_size=t["moe_intermediate_size"],
        num_routed_experts=t["n_routed_experts"],
        num_experts_per_tok=t["num_experts_per_tok"],
        num_shared_experts=t.get("n_shared_experts") or 0,
        first_k_dense=t.get("first_k_dense_replace", 0),
        routed_scaling_factor=t.get("routed_scaling_factor", 1.0),
        norm_topk_prob=t.get("norm_topk_prob", True),
        aux_loss_alpha=t.get("aux_loss_alpha", 0.0),
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=t.get("rope_theta", 10000.0),
        max_position_embeddings=t.get("max_position_embeddings", 8192),
        initializer_range=t.get("initializer_range", 0.02),
        tie_word_embeddings=t.get("tie_word_embeddings", False),
    )
    merge = tuple(v.get("merge_kernel_size", (2, 2)))
    return VLMConfig(
        name=name,
        vit=vit,
        projector=ProjectorConfig(
            vit_hidden_size=vit.hidden_size, lm_hidden_size=lm.hidden_size, merge_kernel=merge
        ),
        lm=lm,
        coca=CoCaConfig(vocab_size=lm.vocab_size),  # the ViT-stage caption decoder reads the same tokenizer
        media_pad_token_id=pad_id,
        ignore_index=hf.get("ignore_index", -100),
    )
