"""Greedy decoding with a compressed MLA KV cache for Kimi-VL (one prompt = one causal document).

Cache (DeepSeek-V2 Sec. 2.1.2-2.1.3): MLA's keys and values are functions of the per-token latent
c_kv = RMSNorm(W_DKV x) (``kv_lora_rank`` wide) and of ONE rotated RoPE key k_pe (``qk_rope_head_dim``)
shared by every head, so per layer the cache holds only (T, kv_lora_rank + qk_rope) numbers instead of
(T, H, qk_nope + qk_rope + v) for full keys/values (``MLAKVCache``).

Attention of new tokens against the cache, two exact forms of the same math (eq. 9-11, 14-17):
- expanded: [k_nope | v] = W_UKV c_kv re-expanded per head at each step, k = [k_nope, k_pe], softmax(q k^T) v;
- absorbed (DeepSeek-V2 Sec. 2.1.2, "absorb W_UK into W_Q, W_UV into W_O"): with W_UKV = [W_UK; W_UV] per head,
  q_nope . k_nope = (W_UK^T q_nope) . c_kv, and o_h = W_UV (sum_t p_t c_kv_t); attention runs in the
  latent space and nothing per-head is ever materialised for the cached tokens (the default for decode).
The prefill (empty cache) runs MLA exactly as ``MLA.forward`` does (``varlen_attention``, causal) and only
records c_kv / k_pe. RoPE positions continue from the cache length and use the LM's live theta
(``KimiLM.set_rope_theta``). MoE routing is per token, so a decode step routes exactly as the full forward.

Reuses the modules' own parameters (``layer.self_attn.q_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``, ...);
``MLA``/``KimiLM`` are unchanged. ``greedy_generate(..., use_cache=False)`` re-runs the full forward each
step and is the reference the cached path must match token for token.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kimivl_model.attention import varlen_attention
from kimivl_model.lm import KimiLM
from kimivl_model.mla import MLA
from kimivl_model.rope import apply_rotary
from kimivl_model.vlm import KimiVL

PROMPT_KEYS = ("input_ids", "pixel_values", "grid_hws")


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # (N,) long on CPU, the new token ids; ends with the eos id when ``finished``
    num_forward_calls: int  # model forward passes run (cached: 1 prefill + N-1 decode steps)
    finished: bool  # True when an eos id was generated, False when max_new_tokens ran out


class MLAKVCache:
    """Per-layer latent cache: c_kv (T, kv_lora_rank) after kv_a_layernorm and rotated k_pe (T, qk_rope).

    Storage is preallocated (``capacity`` tokens, doubled when exceeded). During one forward every layer
    writes its new rows at ``[length, length + n)`` (``update``); ``advance(n)`` then commits them.
    """

    def __init__(self, num_layers: int, kv_lora_rank: int, rope_dim: int, capacity: int = 256) -> None:
        if num_layers <= 0 or kv_lora_rank <= 0 or rope_dim <= 0:
            raise ValueError(
                f"MLAKVCache: num_layers, kv_lora_rank, rope_dim must be > 0, got "
                f"{num_layers}, {kv_lora_rank}, {rope_dim}"
            )
        self.num_layers = num_layers
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        self.capacity = max(int(capacity), 1)
        self.length = 0  # committed tokens
        self.c_kv: torch.Tensor | None = None  # (L, capacity, kv_lora_rank), allocated on first update
        self.k_pe: torch.Tensor | None = None  # (L, capacity, rope_dim)

    @classmethod
    def for_model(cls, lm: KimiLM, capacity: int = 256) -> MLAKVCache:
        cfg = lm.cfg
        return cls(cfg.num_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim, capacity)

    def _ensure(self, needed: int, like: torch.Tensor) -> None:
        if self.c_kv is None:
            cap = max(self.capacity, needed)
            shape = (self.num_layers, cap)
            self.c_kv = like.new_zeros(*shape, self.kv_lora_rank)
            self.k_pe = like.new_zeros(*shape, self.rope_dim)
            self.capacity = cap
        elif needed > self.capacity:
            cap = max(needed, 2 * self.capacity)
            grow = cap - self.capacity
            self.c_kv = torch.cat(
                [self.c_kv, self.c_kv.new_zeros(self.num_layers, grow, self.kv_lora_rank)], 1
            )
            self.k_pe = torch.cat([self.k_pe, self.k_pe.new_zeros(self.num_layers, grow, self.rope_dim)], 1)
            self.capacity = cap

    def update(
        self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write n new rows c_kv (n, r), k_pe (n, rope) of one layer; return all (length + n) rows (views)."""
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(
                f"MLAKVCache.update: layer_idx must be in [0, {self.num_layers}), got {layer_idx}"
            )
        n = c_kv.shape[0]
        if c_kv.shape != (n, self.kv_lora_rank) or k_pe.shape != (n, self.rope_dim):
            raise ValueError(
                f"MLAKVCache.update: expected c_kv (n, {self.kv_lora_rank}) and k_pe (n, {self.rope_dim}), "
                f"got {tuple(c_kv.shape)}, {tuple(k_pe.shape)}"
            )
        end = self.length + n
        self._ensure(end, c_kv)
        self.c_kv[layer_idx, self.length : end] = c_kv
        self.k_pe[layer_idx, self.length : end] = k_pe
        return self.c_kv[layer_idx, :end], self.k_pe[layer_idx, :end]

    def advance(self, n: int) -> None:
        """Commit the n rows every layer has just written."""
        self.length += n


def _causal_offset_mask(n: int, total: int, device: torch.device) -> torch.Tensor:
    """(n, total) bool, True where new query j (absolute position total - n + j) may see key t."""
    q_pos = torch.arange(total - n, total, device=device)  # (n,)
    return torch.arange(total, device=device)[None, :] <= q_pos[:, None]


def mla_forward_cached(
    attn: MLA,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: MLAKVCache,
    layer_idx: int,
    *,
    absorb: bool = True,
) -> torch.Tensor:
    """MLA of n new tokens x (n, hidden) at positions cache.length.. attending to the cache and causally
    to each other; cos/sin (n, rope/2) of those positions. Writes the layer's rows into ``cache``."""
    n, h = x.shape[0], attn.num_heads
    nope, rope, dv, r = attn.qk_nope, attn.qk_rope, attn.v_head, attn.kv_lora_rank
    q_nope, q_pe = attn._queries(x).split([nope, rope], dim=-1)  # (n, H, nope), (n, H, rope)
    q_pe = apply_rotary(q_pe, cos, sin)
    compressed_kv, k_pe = attn.kv_a_proj_with_mqa(x).split([r, rope], dim=-1)  # (n, r), (n, rope)
    c_new = attn.kv_a_layernorm(compressed_kv)  # (n, r)
    k_pe_new = apply_rotary(k_pe, cos, sin)  # (n, rope)
    past = cache.length
    c_all, k_pe_all = cache.update(layer_idx, c_new, k_pe_new)  # (L, r), (L, rope) with L = past + n
    total = c_all.shape[0]
    scale = attn.cfg.softmax_scale

    if past == 0:  # prefill: exactly MLA.forward's computation
        kv = attn.kv_b_proj(c_new).view(n, h, nope + dv)
        k_nope, v = kv.split([nope, dv], dim=-1)  # (n, H, nope), (n, H, v)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (n, H, nope + rope)
        k = torch.cat([k_nope, k_pe_new[:, None, :].expand(n, h, rope)], dim=-1)  # (n, H, nope + rope)
        cu = torch.tensor([0, n], dtype=torch.long, device=x.device)
        o = varlen_attention(
            q, k, v.contiguous(), cu, causal=True, softmax_scale=scale, backend=attn.attn_backend
        )  # (n, H, v)
        return attn.o_proj(o.reshape(n, h * dv))

    mask = None if n == 1 else _causal_offset_mask(n, total, x.device)  # (n, L)
    if absorb:
        w = attn.kv_b_proj.weight.view(h, nope + dv, r)
        w_uk, w_uv = w[:, :nope, :], w[:, nope:, :]  # (H, nope, r), (H, v, r)
        q_lat = torch.einsum("nhd,hdr->hnr", q_nope, w_uk)  # (H, n, r) queries in the latent space
        scores = torch.matmul(q_lat, c_all.t()) + torch.matmul(
            q_pe.transpose(0, 1), k_pe_all.t()
        )  # (H, n, L)
        scores = scores.float() * scale
        if mask is not None:
            scores = scores.masked_fill(~mask[None], float("-inf"))
        p = torch.softmax(scores, dim=-1).to(c_all.dtype)  # (H, n, L)
        o_lat = torch.matmul(p, c_all)  # (H, n, r)
        o = torch.einsum("hnr,hvr->nhv", o_lat, w_uv)  # (n, H, v)
    else:
        kv = attn.kv_b_proj(c_all).view(total, h, nope + dv)
        k_nope, v = kv.split([nope, dv], dim=-1)  # (L, H, nope), (L, H, v)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)  # (H, n, nope + rope)
        k = torch.cat([k_nope, k_pe_all[:, None, :].expand(total, h, rope)], dim=-1).transpose(0, 1)
        o = F.scaled_dot_product_attention(q, k, v.transpose(0, 1), attn_mask=mask, scale=scale).transpose(
            0, 1
        )  # (n, H, v)
    return attn.o_proj(o.reshape(n, h * dv))


@torch.no_grad()
def lm_forward_cached(
    lm: KimiLM, inputs_embeds: torch.Tensor, cache: MLAKVCache, *, absorb: bool = True
) -> torch.Tensor:
    """Run n new tokens' embeddings (n, hidden) through the LM on top of ``cache``; commits them.

    Returns the last new token's logits (V,) (only that row goes through the output head)."""
    if inputs_embeds.dim() != 2 or inputs_embeds.shape[1] != lm.cfg.hidden_size:
        raise ValueError(f"inputs_embeds must be (n, {lm.cfg.hidden_size}), got {tuple(inputs_embeds.shape)}")
    n = inputs_embeds.shape[0]
    if n == 0:
        raise ValueError("inputs_embeds must hold at least one token")
    backbone = lm.model
    positions = torch.arange(cache.length, cache.length + n, device=inputs_embeds.device)  # (n,)
    cos, sin = backbone.rotary(positions)  # (n, rope/2) fp32, live theta
    cu = torch.tensor([0, n], dtype=torch.long, device=inputs_embeds.device)
    h = inputs_embeds
    for i, layer in enumerate(backbone.layers):
        a = mla_forward_cached(layer.self_attn, layer.input_layernorm(h), cos, sin, cache, i, absorb=absorb)
        h = h + a
        x = layer.post_attention_layernorm(h)
        h = h + (layer.mlp(x, cu)[0] if layer.is_moe else layer.mlp(x))  # MoE routes per token
    cache.advance(n)
    return lm.lm_head(backbone.norm(h[-1:]))[0]  # (V,)


def _check_prompt(model: KimiVL, input_ids: torch.Tensor, max_new_tokens: int) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1 or input_ids.numel() == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a non-empty 1-D (T,) token tensor, got {shape}")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be int64 (or int32), got {input_ids.dtype}")
    vocab = model.cfg.lm.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise ValueError(
            f"input_ids must lie in [0, {vocab}), got [{int(input_ids.min())}, {int(input_ids.max())}]"
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")


def greedy_generate(
    model: KimiVL,
    input_ids: torch.Tensor,
    *,
    pixel_values: torch.Tensor | None = None,
    grid_hws: torch.Tensor | None = None,
    max_new_tokens: int,
    eos_ids: Iterable[int] = (),
    use_cache: bool = True,
) -> GenerationOutput:
    """Greedy (argmax) continuation of ONE prompt input_ids (T,) (positions 0..T-1, causal).

    ``<|media_pad|>`` tokens are replaced by the images' features as in ``KimiVL.embed`` (a count mismatch is
    its ValueError). Stops after ``max_new_tokens`` tokens or at the first generated id in ``eos_ids`` (kept
    as the last token). Runs in eval mode without grad (the model's training flag is restored after).
    ``use_cache=False`` re-runs the full forward on prompt + generated tokens at every step (reference).
    """
    _check_prompt(model, input_ids, max_new_tokens)
    if max_new_tokens == 0:
        return GenerationOutput(torch.zeros(0, dtype=torch.long), 0, False)
    eos = {int(e) for e in eos_ids}
    device = model.language_model.lm_head.weight.device
    input_ids = input_ids.to(device=device, dtype=torch.long)
    if pixel_values is not None:
        pixel_values = pixel_values.to(device)
    if grid_hws is not None:
        grid_hws = grid_hws.to(device)
    lm = model.language_model
    embed_tokens = lm.model.embed_tokens
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            tokens: list[int] = []
            calls, finished = 0, False
            if use_cache:
                prompt = model.embed(input_ids, pixel_values, grid_hws)  # (T, hidden)
                cache = MLAKVCache.for_model(lm, capacity=input_ids.numel() + max_new_tokens)
                logits = lm_forward_cached(lm, prompt, cache)
                calls = 1
            while True:
                if not use_cache:
                    new = torch.tensor(tokens, dtype=torch.long, device=device)
                    embeds = torch.cat([model.embed(input_ids, pixel_values, grid_hws), embed_tokens(new)])
                    hidden = lm(inputs_embeds=embeds, return_logits=False).hidden_states  # (T + i, hidden)
                    logits = lm.lm_head(hidden[-1:])[0]  # (V,)
                    calls += 1
                tok = int(torch.argmax(logits.float()))
                tokens.append(tok)
                if tok in eos:
                    finished = True
                    break
                if len(tokens) >= max_new_tokens:
                    break
                if use_cache:
                    new = embed_tokens(torch.tensor([tok], dtype=torch.long, device=device))  # (1, hidden)
                    logits = lm_forward_cached(lm, new, cache)
                    calls += 1
            return GenerationOutput(torch.tensor(tokens, dtype=torch.long), calls, finished)
    finally:
        model.train(was_training)


def batch_greedy_generate(
    model: KimiVL,
    prompts: list[dict],
    *,
    max_new_tokens: int,
    eos_ids: Iterable[int] = (),
    use_cache: bool = True,
) -> list[GenerationOutput]:
    """``greedy_generate`` over prompts, each a dict with "input_ids" (T,) and optionally "pixel_values",
    "grid_hws"; returns one output per prompt, in order (prompts run one after another)."""
    eos = tuple(int(e) for e in eos_ids)
    outs = []
    for i, p in enumerate(prompts):
        if not isinstance(p, dict) or "input_ids" not in p:
            raise ValueError(
                f"prompts[{i}] must be a dict with 'input_ids' (and optional images), got {p!r:.80}"
            )
        unknown = sorted(set(p) - set(PROMPT_KEYS))
        if unknown:
            raise ValueError(f"prompts[{i}]: unknown keys {unknown} (expected some of {list(PROMPT_KEYS)})")
        outs.append(
            greedy_generate(
                model,
                p["input_ids"],
                pixel_values=p.get("pixel_values"),
                grid_hws=p.get("grid_hws"),
                max_new_tokens=max_new_tokens,
                eos_ids=eos,
                use_cache=use_cache,
            )
        )
    return outs
