"""MLA: names/shapes, equality with a naive dense per-head implementation, packing invariance."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from kimivl_model.config import preset
from kimivl_model.mla import MLA
from kimivl_model.rope import RotaryEmbedding1D


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _cfg(**kw):
    return dataclasses.replace(preset("tiny").lm, **kw)


def _init(m: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def _rope_complex(t: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Independent RoPE: adjacent pairs as complex numbers times exp(i * pos * theta^(-2j/d)). t (T, ..., d)."""
    d = t.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    rot = torch.polar(torch.ones(len(pos), d // 2, dtype=torch.float64), pos.double()[:, None] * freqs)
    tc = torch.view_as_complex(t.double().reshape(*t.shape[:-1], d // 2, 2).contiguous())
    if tc.dim() == 3:
        rot = rot[:, None, :]
    return torch.view_as_real(tc * rot).flatten(-2)


def naive_mla(m: MLA, x: torch.Tensor, theta: float) -> torch.Tensor:
    """Single document, fp64, explicit per-head matmuls + causal softmax."""
    cfg = m.cfg
    t, nh = x.shape[0], cfg.num_heads
    dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    xd = x.double()

    def rms(z, w):
        return z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w.double()

    if cfg.q_lora_rank is None:
        q = xd @ m.q_proj.weight.double().T
    else:
        q = rms(xd @ m.q_a_proj.weight.double().T, m.q_a_layernorm.weight) @ m.q_b_proj.weight.double().T
    q = q.view(t, nh, dn + dr)
    kv_a = xd @ m.kv_a_proj_with_mqa.weight.double().T  # (T, r + dr)
    c, k_pe = kv_a[:, :r], kv_a[:, r:]
    kv = (rms(c, m.kv_a_layernorm.weight) @ m.kv_b_proj.weight.double().T).view(t, nh, dn + dv)
    pos = torch.arange(t)
    k_rot = _rope_complex(k_pe, pos, theta)  # (T, dr), shared by all heads
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    outs = []
    for h in range(nh):
        qh = torch.cat([q[:, h, :dn], _rope_complex(q[:, h, dn:], pos, theta)], dim=-1)  # (T, dn + dr)
        kh = torch.cat([kv[:, h, :dn], k_rot], dim=-1)  # (T, dn + dr)
        s = (qh @ kh.T) / math.sqrt(dn + dr)
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
        outs.append(p @ kv[:, h, dn:])  # (T, dv)
    return torch.cat(outs, dim=-1) @ m.o_proj.weight.double().T


def test_param_names_and_shapes():
    cfg = _cfg()
    m = MLA(cfg)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    h, nh = cfg.hidden_size, cfg.num_heads
    assert shapes == {
        "q_proj.weight": (nh * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim), h),
        "kv_a_proj_with_mqa.weight": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h),
        "kv_a_layernorm.weight": (cfg.kv_lora_rank,),
        "kv_b_proj.weight": (nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        "o_proj.weight": (h, nh * cfg.v_head_dim),
    }
    mq = MLA(_cfg(q_lora_rank=48))
    assert {"q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"} <= set(mq.state_dict())
    assert "q_proj.weight" not in mq.state_dict()
    x = torch.randn(7, h)
    cos, sin = RotaryEmbedding1D(cfg.qk_rope_head_dim, cfg.rope_theta)(torch.arange(7))
    assert m(x, cos, sin, torch.tensor([0, 7])).shape == (7, h)
    with pytest.raises(ValueError, match="cos/sin"):
        m(x, cos[:3], sin[:3], torch.tensor([0, 7]))


@pytest.mark.parametrize("q_lora_rank", [None, 48])
def test_mla_matches_naive_dense(q_lora_rank):
    torch.manual_seed(0)
    theta = 500.0  # small base: the rope channels rotate a lot within 13 tokens
    cfg = _cfg(q_lora_rank=q_lora_rank, rope_theta=theta)
    m = MLA(cfg)
    _init(m)
    x = torch.randn(13, cfg.hidden_size)
    cos, sin = RotaryEmbedding1D(cfg.qk_rope_head_dim, theta)(torch.arange(13))
    out = m(x, cos, sin, torch.tensor([0, 13]))
    ref = naive_mla(m, x, theta)
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5), (out.double() - ref).abs().max()


def test_mla_packed_equals_separate():
    torch.manual_seed(1)
    cfg = _cfg()
    m = MLA(cfg)
    _init(m, seed=3)
    lens = [4, 9, 6]
    x = torch.randn(sum(lens), cfg.hidden_size)
    pos = torch.cat([torch.arange(n) for n in lens])
    rot = RotaryEmbedding1D(cfg.qk_rope_head_dim, cfg.rope_theta)
    cos, sin = rot(pos)
    cu = torch.tensor([0, 4, 13, 19])
    packed = m(x, cos, sin, cu)
    for i, n in enumerate(lens):
        s = int(cu[i])
        c1, s1 = rot(torch.arange(n))
        alone = m(x[s : s + n], c1, s1, torch.tensor([0, n]))
        assert torch.allclose(packed[s : s + n], alone, atol=1e-5)
        ref = naive_mla(m, x[s : s + n], cfg.rope_theta)
        assert torch.allclose(alone.double(), ref, atol=1e-5)
