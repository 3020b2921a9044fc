"""Parameter accounting of a preset, built on the meta device (no memory, no init cost).

``model_summary(cfg)`` counts every component of the real ``KimiVL`` module tree (so the numbers cannot
drift from the code) and adds the analytic activated-parameter count of the MoE LM. For the ``a3b``
preset the counts are checked against the published ones (REFERENCE.md: LM 15.960B total, 15.289B without
embeddings, 2.244B activated without embeddings; MoonViT 416.9M; projector 30.7M; 16.408B in all).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kimivl_model.config import VLMConfig
from kimivl_model.lm import lm_param_counts
from kimivl_model.muon import build_param_groups, param_group_summary
from kimivl_model.vlm import KimiVL

# Published counts of the full-size model (REFERENCE.md), used to report relative errors for a3b.
A3B_REFERENCE = {
    "total_params": 16.408e9,
    "lm_total_params": 15.960e9,
    "lm_params_no_embed": 15.289e9,
    "lm_activated_params_no_embed": 2.244e9,
    "vit_params": 416.9e6,
    "projector_params": 30.7e6,
}


def count_params(module: nn.Module) -> int:
    """Distinct parameters (tied tensors once); buffers excluded."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def build_meta_model(cfg: VLMConfig, with_coca: bool = False) -> KimiVL:
    with torch.device("meta"):
        return KimiVL(cfg, attn_backend="sdpa", with_coca=with_coca)


def model_summary(cfg: VLMConfig) -> dict[str, Any]:
    model = build_meta_model(cfg, with_coca=True)
    coca = model.coca
    model.coca = None  # the exported VLM excludes the ViT-stage head
    lm_counts = lm_param_counts(cfg.lm)
    out: dict[str, Any] = {
        "preset": cfg.name,
        "total_params": count_params(model),
        "lm_total_params": count_params(model.language_model),
        "lm_params_no_embed": lm_counts["no_embed"],
        "lm_activated_params_no_embed": lm_counts["activated_no_embed"],
        "vit_params": count_params(model.vision_tower),
        "projector_params": count_params(model.multi_modal_projector),
        "coca_head_params": count_params(coca) if coca is not None else 0,
    }
    meta_lm_no_embed = out["lm_total_params"] - lm_counts["embedding"]
    if meta_lm_no_embed != lm_counts["no_embed"]:  # the analytic count must agree with the module tree
        raise AssertionError(
            f"analytic LM count {lm_counts['no_embed']} != module count {meta_lm_no_embed} for {cfg.name}"
        )
    groups = build_param_groups(model, lr=1e-3)
    out["optimizer"] = param_group_summary(groups)
    if cfg.name == "a3b":
        out["reference"] = A3B_REFERENCE
        out["relative_error"] = {k: round(out[k] / v - 1.0, 6) for k, v in A3B_REFERENCE.items() if k in out}
    return out
