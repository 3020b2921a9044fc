"""Greedy generation with the MLA latent KV cache: cached == full forward (logits and tokens), eos, limits."""

from __future__ import annotations

import math

import pytest
import torch

from kimivl_model.config import preset
from kimivl_model.generate import (
    GenerationOutput,
    MLAKVCache,
    batch_greedy_generate,
    greedy_generate,
    lm_forward_cached,
)
from kimivl_model.image_processing import pack_images
from kimivl_model.vlm import KimiVL

CFG = preset("tiny")
PAD = CFG.media_pad_token_id
V = CFG.lm.vocab_size


def _strong_init(model: KimiVL, seed: int = 0) -> None:
    """O(1) logits and sharp attention (the default 0.02 init gives near-uniform, tie-prone logits)."""
    g = torch.Generator().manual_seed(seed)
    lm = model.language_model
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        for moe in lm.moe_layers():  # a non-zero correction bias: routing must use it identically
            moe.gate.e_score_correction_bias.copy_(0.1 * torch.randn(CFG.lm.num_routed_experts, generator=g))


@pytest.fixture(scope="module")
def model() -> KimiVL:
    torch.manual_seed(0)
    m = KimiVL(CFG, attn_backend="sdpa").eval()
    _strong_init(m)
    return m


def _ids(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, V, (n,), generator=g)  # ids >= 10: no special tokens


def _image_prompt(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    imgs = [torch.rand(3, 4 * 14, 6 * 14, generator=g), torch.rand(3, 2 * 14, 2 * 14, generator=g)]
    pv, grid = pack_images(imgs)
    n0, n1 = (h * w // 4 for h, w in grid.tolist())
    ids = torch.cat(
        [
            torch.tensor([2, 6, 3, *[PAD] * n0, 4]),
            _ids(7, seed + 1),
            torch.tensor([2, 6, 3, *[PAD] * n1, 4]),
            _ids(5, seed + 2),
        ]
    )
    return ids, pv, grid


def _naive_greedy(model, ids, n, pixel_values=None, grid_hws=None) -> list[int]:
    """Independent reference: full forward on prompt + generated tokens, argmax of the last row."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            full = torch.cat([ids, torch.tensor(out, dtype=torch.long)])
            logits = model(full, pixel_values=pixel_values, grid_hws=grid_hws).logits
            out.append(int(logits[-1].argmax()))
    return out


@pytest.mark.parametrize("absorb", [True, False])
def test_cached_step_logits_equal_full_forward(model, absorb):
    ids = _ids(220, 1)
    lm = model.language_model
    with torch.no_grad():
        full = model(ids).logits  # (T, V)
        cache = MLAKVCache(CFG.lm.num_layers, CFG.lm.kv_lora_rank, CFG.lm.qk_rope_head_dim, capacity=8)
        emb = lm.model.embed_tokens(ids)
        # prefill 200, then 3 tokens at once (offset causal mask), then one token at a time (grows the cache)
        got = [lm_forward_cached(lm, emb[:200], cache, absorb=absorb)]
        got.append(lm_forward_cached(lm, emb[200:203], cache, absorb=absorb))
        ends = [200, 203]
        for t in range(203, 220):
            got.append(lm_forward_cached(lm, emb[t : t + 1], cache, absorb=absorb))
            ends.append(t + 1)
    assert cache.length == 220 and cache.capacity >= 220
    want = full[torch.tensor(ends) - 1]
    assert want.abs().max() > 1.0  # the init gives real logits, so the tolerance means something
    torch.testing.assert_close(torch.stack(got), want, atol=1e-5, rtol=1e-5)


def test_cached_greedy_equals_uncached_text(model):
    ids = _ids(40, 2)
    cached = greedy_generate(model, ids, max_new_tokens=12)
    ref = greedy_generate(model, ids, max_new_tokens=12, use_cache=False)
    assert isinstance(cached, GenerationOutput)
    assert cached.tokens.tolist() == ref.tokens.tolist() == _naive_greedy(model, ids, 12)
    assert cached.tokens.dtype == torch.long and cached.tokens.shape == (12,)
    assert (cached.num_forward_calls, ref.num_forward_calls) == (12, 12)  # 1 prefill + 11 steps; 12 full
    assert not cached.finished and not ref.finished


def test_cached_greedy_equals_uncached_with_images(model):
    ids, pv, grid = _image_prompt(3)
    cached = greedy_generate(model, ids, pixel_values=pv, grid_hws=grid, max_new_tokens=10)
    ref = greedy_generate(model, ids, pixel_values=pv, grid_hws=grid, max_new_tokens=10, use_cache=False)
    assert PAD not in cached.tokens.tolist()  # the naive reference re-embeds generated ids through embed()
    assert cached.tokens.tolist() == ref.tokens.tolist() == _naive_greedy(model, ids, 10, pv, grid)
    # the images matter: the same prompt with other pixels continues differently
    other = greedy_generate(model, ids, pixel_values=torch.rand_like(pv), grid_hws=grid, max_new_tokens=10)
    assert other.tokens.tolist() != cached.tokens.tolist()


def test_long_context_theta_is_respected(model):
    ids = _ids(200, 4)
    try:
        with torch.no_grad():
            base = model(ids).logits[-1]
        model.set_rope_theta(800_000.0)
        with torch.no_grad():
            full = model(ids).logits[-1]
        assert (full - base).abs().max() > 1e-2  # theta matters here, so ignoring it would be caught
        with torch.no_grad():
            cache = MLAKVCache.for_model(model.language_model)
            step = lm_forward_cached(model.language_model, model.embed(ids), cache)
        torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
        cached = greedy_generate(model, ids, max_new_tokens=8)
        ref = greedy_generate(model, ids, max_new_tokens=8, use_cache=False)
        assert cached.tokens.tolist() == ref.tokens.tolist() == _naive_greedy(model, ids, 8)
    finally:
        model.set_rope_theta(CFG.lm.rope_theta)


@pytest.mark.parametrize("use_cache", [True, False])
def test_eos_stops_generation(model, use_cache):
    ids = _ids(30, 5)
    free = greedy_generate(model, ids, max_new_tokens=8, use_cache=use_cache).tokens.tolist()
    stop = free[3]
    k = free.index(stop) + 1  # generation ends at the first occurrence, the eos id included
    out = greedy_generate(model, ids, max_new_tokens=8, eos_ids={stop, V - 1}, use_cache=use_cache)
    assert out.tokens.tolist() == free[:k]
    assert out.finished
    assert out.num_forward_calls == k


@pytest.mark.parametrize("use_cache", [True, False])
def test_max_new_tokens_respected(model, use_cache):
    ids = _ids(20, 6)
    for n in (1, 5):
        out = greedy_generate(model, ids, max_new_tokens=n, use_cache=use_cache)
        assert out.tokens.shape == (n,) and not out.finished and out.num_forward_calls == n
    empty = greedy_generate(model, ids, max_new_tokens=0, use_cache=use_cache)
    assert empty.tokens.shape == (0,) and empty.num_forward_calls == 0
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, ids, max_new_tokens=-1, use_cache=use_cache)


@pytest.mark.parametrize("use_cache", [True, False])
def test_media_pad_mismatch_raises_models_error(model, use_cache):
    ids, pv, grid = _image_prompt(7)
    bad = torch.cat([ids, torch.tensor([PAD])])  # one placeholder too many
    with pytest.raises(ValueError, match="placeholder count mismatch"):
        greedy_generate(model, bad, pixel_values=pv, grid_hws=grid, max_new_tokens=2, use_cache=use_cache)
    with pytest.raises(ValueError, match="no images"):
        greedy_generate(model, ids, max_new_tokens=2, use_cache=use_cache)


def test_bad_input_ids_rejected(model):
    with pytest.raises(ValueError, match="input_ids"):
        greedy_generate(model, _ids(6, 0)[None], max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids"):
        greedy_generate(model, torch.tensor([1, V]), max_new_tokens=2)


def test_batch_generate_matches_single_and_restores_training_flag(model):
    ids, pv, grid = _image_prompt(8)
    prompts = [{"input_ids": _ids(15, 9)}, {"input_ids": ids, "pixel_values": pv, "grid_hws": grid}]
    model.train()
    try:
        outs = batch_greedy_generate(model, prompts, max_new_tokens=4, eos_ids=(V - 1,))
        assert model.training  # restored
    finally:
        model.eval()
    singles = [greedy_generate(model, p.pop("input_ids"), max_new_tokens=4, **p) for p in prompts]
    assert [o.tokens.tolist() for o in outs] == [s.tokens.tolist() for s in singles]
    with pytest.raises(ValueError, match="unknown keys"):
        batch_greedy_generate(model, [{"input_ids": ids, "pixel_value": pv}], max_new_tokens=1)
