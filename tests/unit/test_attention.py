"""varlen_attention backends against a naive per-segment softmax reference."""

from __future__ import annotations

import pytest
import torch

from kimivl_model.attention import varlen_attention

BACKENDS = ["sdpa", "sdpa_masked"]


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int64)


def naive_attention(q, k, v, lens_q, lens_k, causal, scale):
    """Loop over segments and heads; explicit softmax. Empty key segments give zeros."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype)
    sq = sk = 0
    for lq, lk in zip(lens_q, lens_k, strict=True):
        for h in range(q.shape[1]):
            if lk == 0:
                continue
            s = (q[sq : sq + lq, h] @ k[sk : sk + lk, h].T) * scale  # (lq, lk)
            if causal:
                mask = torch.ones(lq, lk, dtype=torch.bool).tril()
                s = s.masked_fill(~mask, float("-inf"))
            p = torch.exp(s - s.max(dim=-1, keepdim=True).values)
            p = p / p.sum(dim=-1, keepdim=True)
            out[sq : sq + lq, h] = p @ v[sk : sk + lk, h]
        sq, sk = sq + lq, sk + lk
    return out


def _inputs(tq, tk, h=2, dqk=8, dv=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tq, h, dqk, generator=g, requires_grad=True)
    k = torch.randn(tk, h, dqk, generator=g, requires_grad=True)
    v = torch.randn(tk, h, dv, generator=g, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dv", [8, 6, 12])
def test_self_attention_matches_naive(backend, causal, dv):
    lens = [3, 1, 5, 3, 2, 1]  # repeated lengths exercise the grouped path, 1 is the edge case
    t = sum(lens)
    q, k, v = _inputs(t, t, dv=dv)
    scale = 0.37
    out = varlen_attention(q, k, v, _cu(lens), causal=causal, softmax_scale=scale, backend=backend)
    assert out.shape == (t, 2, dv)
    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    ref = naive_attention(qr, kr, vr, lens, lens, causal, scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    for a, b in ((q, qr), (k, kr), (v, vr)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_scale_is_inverse_sqrt_head_dim(backend):
    lens = [4, 2]
    q, k, v = _inputs(6, 6, dqk=16)
    out = varlen_attention(q, k, v, _cu(lens), causal=False, backend=backend)
    ref = naive_attention(q, k, v, lens, lens, False, 16**-0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_no_attention_across_segments(backend, causal):
    lens = [4, 3, 5]
    cu = _cu(lens)
    q, k, v = (x.detach() for x in _inputs(12, 12))
    base = varlen_attention(q, k, v, cu, causal=causal, backend=backend)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    seg = slice(4, 7)  # perturb only the middle segment
    q2[seg] += 5.0
    k2[seg] -= 3.0
    v2[seg] *= -2.0
    out = varlen_attention(q2, k2, v2, cu, causal=causal, backend=backend)
    torch.testing.assert_close(out[:4], base[:4], atol=0, rtol=0)
    torch.testing.assert_close(out[7:], base[7:], atol=0, rtol=0)
    assert not torch.allclose(out[seg], base[seg])


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_attention_unequal_segment_lengths(backend):
    lens_q, lens_k = [1, 3, 2, 1], [4, 2, 5, 4]
    q, k, v = _inputs(sum(lens_q), sum(lens_k), dv=5, seed=3)
    out = varlen_attention(
        q, k, v, _cu(lens_q), _cu(lens_k), causal=False, softmax_scale=0.5, backend=backend
    )
    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    ref = naive_attention(qr, kr, vr, lens_q, lens_k, False, 0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    for a, b in ((q, qr), (k, kr), (v, vr)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_key_segment_gives_zeros(backend):
    lens_q, lens_k = [2, 2], [3, 0]
    q, k, v = (x.detach() for x in _inputs(4, 3))
    out = varlen_attention(q, k, v, _cu(lens_q), _cu(lens_k), causal=False, backend=backend)
    torch.testing.assert_close(out[2:], torch.zeros(2, 2, 8))
    torch.testing.assert_close(
        out, naive_attention(q, k, v, lens_q, lens_k, False, 8**-0.5), atol=1e-5, rtol=1e-5
    )


def test_auto_is_sdpa_on_cpu_and_errors():
    lens = [3, 2]
    q, k, v = (x.detach() for x in _inputs(5, 5))
    auto = varlen_attention(q, k, v, _cu(lens), causal=True, backend="auto")
    torch.testing.assert_close(auto, varlen_attention(q, k, v, _cu(lens), causal=True, backend="sdpa"))
    with pytest.raises(ValueError, match="backend"):
        varlen_attention(q, k, v, _cu(lens), causal=True, backend="nope")
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_attention(q, k, v, _cu([3, 3]), causal=False)
    with pytest.raises(ValueError, match="causal"):
        varlen_attention(q, k, v, _cu([3, 2]), _cu([2, 3]), causal=True)
