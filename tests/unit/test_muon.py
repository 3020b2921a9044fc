"""Tests for kimivl_model/muon.py against independent naive references written here."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from kimivl_model.muon import (
    Muon,
    adamw_step_,
    build_param_groups,
    moonlight_scale,
    param_group_summary,
    zeropower_via_newtonschulz5,
)


# ------------------------------------------------------------------ naive references (one matrix at a time)
def naive_ns(m: torch.Tensor) -> torch.Tensor:
    """Quintic Newton-Schulz on ONE 2-D matrix, written out plainly."""
    x = m / (torch.sqrt((m * m).sum()) + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.t()
    for _ in range(5):
        a = x @ x.t()
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * (a @ a)) @ x
    return x.t() if tall else x


def naive_muon_update(w, g, buf, lr, wd, beta, nesterov):
    """Returns (new_w, new_buf); 3-D = per expert slice, 4-D = conv flattened to (out, rest)."""
    buf = beta * buf + g
    d = g + beta * buf if nesterov else buf
    if w.ndim == 2:
        mats, shape2 = [d], w.shape
    elif w.ndim == 3:
        mats, shape2 = [d[e] for e in range(w.shape[0])], w.shape[1:]
    else:
        mats, shape2 = [d.reshape(w.shape[0], -1)], (w.shape[0], math.prod(w.shape[1:]))
    scale = 0.2 * math.sqrt(max(shape2))
    ortho = torch.stack([naive_ns(m) for m in mats]).reshape(w.shape)
    return w * (1 - lr * wd) - lr * scale * ortho, buf


# ------------------------------------------------------------------ Newton-Schulz
@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (4, 48, 24)])
def test_newton_schulz_singular_values_and_orthogonality(shape):
    torch.manual_seed(0)
    g = torch.randn(*shape)
    x = zeropower_via_newtonschulz5(g)
    assert x.shape == g.shape and x.dtype == g.dtype
    s = torch.linalg.svdvals(x)  # (..., k)
    # 5 quintic steps land singular values in about (0.68, 1.14), not at exactly 1 (Jordan et al. 2024)
    assert s.min() > 0.6 and s.max() < 1.25, (s.min().item(), s.max().item())
    k = min(shape[-2:])
    eye = torch.eye(k)
    gram = lambda t: t.mT @ t if t.shape[-2] > t.shape[-1] else t @ t.mT  # noqa: E731  (..., k, k)
    g_unit = g / torch.linalg.matrix_norm(g, ord=2, keepdim=True)  # input with spectral norm 1
    dev_out = torch.linalg.matrix_norm(gram(x) - eye).max()  # ~1.8 for k=32 (s^2 in ~(0.46, 1.28))
    dev_in = torch.linalg.matrix_norm(gram(g_unit) - eye).min()  # ~3.2: Gaussian spectrum is wide
    assert dev_out < 0.7 * dev_in, (dev_out.item(), dev_in.item())
    cond_in = torch.linalg.cond(g).min()  # ~6 for these aspect ratios
    cond_out = (s.max(dim=-1).values / s.min(dim=-1).values).max()
    assert cond_out < 2.0 and cond_out < 0.5 * cond_in, (cond_out.item(), cond_in.item())
    for idx in range(x.shape[0] if x.ndim == 3 else 1):  # equals the naive one-matrix reference
        xi, gi = (x[idx], g[idx]) if x.ndim == 3 else (x, g)
        torch.testing.assert_close(xi, naive_ns(gi), atol=1e-5, rtol=0)


def test_newton_schulz_transpose_path():
    torch.manual_seed(1)
    g = torch.randn(3, 40, 16)  # rows > cols: transposed internally
    torch.testing.assert_close(
        zeropower_via_newtonschulz5(g), zeropower_via_newtonschulz5(g.mT.contiguous()).mT, atol=1e-6, rtol=0
    )


def test_newton_schulz_rejects_vector():
    with pytest.raises(ValueError, match="ndim >= 2"):
        zeropower_via_newtonschulz5(torch.randn(5))


def test_moonlight_scale_shape_rules():
    assert moonlight_scale((16, 64)) == pytest.approx(0.2 * 8)
    assert moonlight_scale((8, 100, 36)) == pytest.approx(0.2 * 10)  # per expert slice
    assert moonlight_scale((4, 3, 5, 5)) == pytest.approx(0.2 * math.sqrt(75))  # (out, in*kh*kw)


# ------------------------------------------------------------------ Muon update
@pytest.mark.parametrize("shape", [(64, 32), (32, 128), (4, 48, 96), (8, 4, 3, 3)])
def test_update_rms_matches_moonlight_target(shape):
    torch.manual_seed(2)
    lr = 0.01
    w = nn.Parameter(torch.randn(*shape))
    w0 = w.detach().clone()
    opt = Muon([{"params": [w], "use_muon": True, "lr": lr, "weight_decay": 0.0}])
    w.grad = torch.randn(*shape)
    opt.step()
    rms = (w.detach() - w0).pow(2).mean().sqrt().item()
    # target lr*0.2 assumes an exactly orthogonal O; the quintic's singular values (~0.68-1.13) give
    # ~0.85-0.9 of it on Gaussian grads, so the band is [0.8, 1.05] x target
    assert 0.8 * lr * 0.2 < rms < 1.05 * lr * 0.2, rms / (lr * 0.2)


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_naive_reference(nesterov):
    torch.manual_seed(3)
    shapes = [(8, 12), (12, 8), (3, 6, 10), (4, 3, 3, 3)]  # matrix, tall, experts, conv
    params = [nn.Parameter(torch.randn(*s)) for s in shapes]
    ref_w = [p.detach().clone() for p in params]
    ref_buf = [torch.zeros(s) for s in shapes]
    lr, wd, beta = 0.03, 0.1, 0.95
    opt = Muon([{"params": params, "use_muon": True, "lr": lr, "weight_decay": wd, "nesterov": nesterov}])
    for _ in range(4):
        grads = [torch.randn(*s) for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            ref_w[i], ref_buf[i] = naive_muon_update(ref_w[i], g, ref_buf[i], lr, wd, beta, nesterov)
    for p, r in zip(params, ref_w, strict=True):
        torch.testing.assert_close(p.detach(), r, atol=1e-6, rtol=0)


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(4)
    shapes = [(7,), (4, 3), ()]
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    kw = {"lr": 1e-2, "weight_decay": 0.1}
    opt = Muon([{"params": ours, "use_muon": False, "adamw_betas": (0.9, 0.95), "adamw_eps": 1e-8, **kw}])
    ref = torch.optim.AdamW(theirs, betas=(0.9, 0.95), eps=1e-8, **kw)
    for _ in range(6):
        for a, b in zip(ours, theirs, strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=0)


def test_adamw_step_function_matches_torch_adamw():
    torch.manual_seed(5)
    p = torch.randn(10)
    ref = nn.Parameter(p.clone())
    torch_opt = torch.optim.AdamW([ref], lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    m, v = torch.zeros(10), torch.zeros(10)
    for step in range(1, 5):
        g = torch.randn(10)
        adamw_step_(p, g, m, v, step, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
        ref.grad = g.clone()
        torch_opt.step()
    torch.testing.assert_close(p, ref.detach(), atol=1e-6, rtol=0)


def test_params_without_grad_are_skipped_and_groups_validated():
    w, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))
    opt = Muon([{"params": [w], "use_muon": True, "lr": 0.1}, {"params": [b], "use_muon": False, "lr": 0.1}])
    w0 = w.detach().clone()
    b.grad = torch.ones(4)
    opt.step()
    assert torch.equal(w.detach(), w0) and len(opt.state[w]) == 0 and opt.state[b]["step"] == 1
    with pytest.raises(ValueError, match="ndim >= 2"):
        Muon([{"params": [b], "use_muon": True, "lr": 0.1}])
    with pytest.raises(ValueError, match="use_muon"):
        Muon([{"params": [w], "lr": 0.1}])


# ------------------------------------------------------------------ param groups
class Table(nn.Module):
    _adamw_params = ("table",)

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(4, 4, 8))  # 3-D, but AdamW by the class attribute
        self.proj = nn.Parameter(torch.randn(8, 8))


class Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 16, 8))  # (E, out, in)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.experts = Experts()
        self.pos = Table()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(16, 20)
        self.head.is_output_head = True
        self.scalar = nn.Parameter(torch.tensor(1.0))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.shared_a = nn.Linear(8, 8, bias=False)
        self.shared_b = self.shared_a  # same module twice: listed once


def test_build_param_groups_by_structure():
    model = Tiny()
    groups = build_param_groups(model, lr=1e-3, weight_decay=0.05, momentum=0.9)
    by_kind = {g["use_muon"]: g for g in groups}
    muon_names = set(by_kind[True]["names"])
    adamw_names = set(by_kind[False]["names"])
    assert muon_names == {"fc1.weight", "experts.w", "pos.proj", "conv.weight", "shared_a.weight"}
    assert adamw_names == {
        "embed.weight",
        "fc1.bias",
        "norm.weight",
        "norm.bias",
        "pos.table",
        "conv.bias",
        "head.weight",
        "head.bias",
        "scalar",
    }
    for g in groups:
        assert g["lr"] == 1e-3 and g["weight_decay"] == 0.05 and g["momentum"] == 0.9
        assert len(g["names"]) == len(g["params"])
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))
    s = param_group_summary(groups)
    muon_n = 16 * 8 + 3 * 16 * 8 + 8 * 8 + 4 * 27 + 8 * 8
    adamw_n = 20 * 8 + 16 + 16 + 16 + 4 * 4 * 8 + 4 + 20 * 16 + 20 + 1
    assert (s["muon_params"], s["muon_tensors"]) == (muon_n, 5)
    assert (s["adamw_params"], s["adamw_tensors"]) == (adamw_n, 9)
    assert s["muon_fraction"] == pytest.approx(muon_n / (muon_n + adamw_n))
    Muon(groups)  # the groups are accepted by the optimizer


def test_build_param_groups_tied_head_and_bad_adamw_name():
    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 6)
            self.body = nn.Linear(6, 6, bias=False)
            self.head = nn.Linear(6, 10, bias=False)
            self.head.is_output_head = True
            self.head.weight = self.embed.weight

    groups = build_param_groups(TiedLM(), lr=1e-3)
    assert [(g["use_muon"], g["names"]) for g in groups] == [
        (True, ["body.weight"]),
        (False, ["embed.weight"]),
    ]

    class Bad(nn.Module):
        _adamw_params = ("nope",)

        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 3))

    with pytest.raises(ValueError, match="nope"):
        build_param_groups(Bad(), lr=1e-3)


# ------------------------------------------------------------------ training and checkpoints
def _mlp() -> nn.Module:
    torch.manual_seed(6)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.LayerNorm(32), nn.Linear(32, 4))


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(32, 8, generator=gen)
    return x, torch.sin(x[:, :4]) + 0.5 * x[:, 4:]


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> float:
    loss = torch.tensor(0.0)
    for step in steps:
        x, y = _data(step)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    return loss.item()


def test_training_reduces_loss():
    model = _mlp()
    x, y = _data(0)
    with torch.no_grad():
        first = nn.functional.mse_loss(model(x), y).item()
    opt = Muon(build_param_groups(model, lr=0.02, weight_decay=0.01))
    _train(model, opt, range(60))
    with torch.no_grad():
        last = nn.functional.mse_loss(model(x), y).item()
    assert last < 0.3 * first, (first, last)


def test_state_dict_round_trip_resumes_bit_exact():
    full = _mlp()
    opt = Muon(build_param_groups(full, lr=0.02))
    _train(full, opt, range(6))

    part = _mlp()
    opt_a = Muon(build_param_groups(part, lr=0.02))
    _train(part, opt_a, range(3))
    buf = io.BytesIO()
    torch.save({"model": part.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = _mlp()
    resumed.load_state_dict(ckpt["model"])
    opt_b = Muon(build_param_groups(resumed, lr=0.02))
    opt_b.load_state_dict(copy.deepcopy(ckpt["opt"]))
    _train(resumed, opt_b, range(3, 6))
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bf16_newton_schulz_is_the_fp32_direction_within_bf16_rounding():
    """``ns_dtype: bf16`` (the reference implementations' arithmetic): same orthogonalised direction as fp32
    up to bf16 rounding, the update applied in the param's dtype; an unknown dtype is refused."""
    from kimivl_model.muon import NS_DTYPES, Muon, zeropower_via_newtonschulz5

    torch.manual_seed(0)
    g = torch.randn(3, 64, 96)
    o32 = zeropower_via_newtonschulz5(g)
    o16 = zeropower_via_newtonschulz5(g, dtype=torch.bfloat16)
    assert o16.dtype == torch.float32 and not torch.equal(o16, o32)
    cos = torch.nn.functional.cosine_similarity(o16.flatten(1), o32.flatten(1), dim=1)
    assert float(cos.min()) > 0.99, cos
    assert set(NS_DTYPES) == {"fp32", "bf16"}

    w0 = torch.randn(64, 96)
    grad = torch.randn(64, 96)
    updates = []
    for dtype in ("fp32", "bf16"):
        w = torch.nn.Parameter(w0.clone())
        opt = Muon([{"params": [w], "use_muon": True, "ns_dtype": dtype}], lr=0.02)
        w.grad = grad.clone()
        opt.step()
        assert w.dtype == torch.float32
        updates.append((w.detach() - w0).flatten())
    assert not torch.equal(*updates)
    assert float(torch.nn.functional.cosine_similarity(*updates, dim=0)) > 0.99
    with pytest.raises(ValueError, match="ns_dtype"):
        Muon([{"params": [torch.nn.Parameter(torch.randn(4, 4))], "use_muon": True, "ns_dtype": "fp16"}])
