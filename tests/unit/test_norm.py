"""``RMSNorm``'s one-node autograd Function against autograd over the formula it replaces."""

from __future__ import annotations

import pytest
import torch

from kimivl_model.norm import RMSNorm, _RMSNormFn, rms_norm_reference


def _reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * w.float()).to(x.dtype)


def _run(fn, x, w, dy):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fn(x, w)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 48)])
def test_rmsnorm_matches_autograd_over_the_formula_fp32(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape) * 3
    w = torch.rand(shape[-1]) + 0.5
    dy = torch.randn(*shape)
    y, dx, dw = _run(lambda a, b: _RMSNormFn.apply(a, b, 1e-5), x, w, dy)
    y_ref, dx_ref, dw_ref = _run(lambda a, b: _reference(a, b, 1e-5), x, w, dy)
    assert torch.equal(y, y_ref)  # same ops in the same order
    assert torch.equal(dw, dw_ref)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)  # closed form: rounding-level only


def test_rmsnorm_bf16_input_keeps_dtypes_and_matches():
    torch.manual_seed(1)
    x = (torch.randn(9, 32) * 2).bfloat16()
    w = torch.rand(32) + 0.5  # fp32 weight, as under fp32 master weights
    dy = torch.randn(9, 32).bfloat16()
    y, dx, dw = _run(lambda a, b: _RMSNormFn.apply(a, b, 1e-6), x, w, dy)
    y_ref, dx_ref, dw_ref = _run(lambda a, b: _reference(a, b, 1e-6), x, w, dy)
    assert y.dtype == dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1.6e-2, atol=1e-2)  # one bf16 rounding of the same value


def test_rmsnorm_gradcheck_and_frozen_weight():
    torch.manual_seed(2)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFn.apply(a, b, 1e-5), (x, w))
    m = RMSNorm(6).double()
    m.weight.requires_grad_(False)  # frozen (e.g. the LM during the ViT/align stages)
    m(x).sum().backward()
    assert m.weight.grad is None and x.grad is not None


def test_compiled_rmsnorm_uses_the_formula_and_matches_eager():
    """Under torch.compile the module runs ``rms_norm_reference`` (Inductor derives the backward; compiling
    the hand-written node gave zero weight gradients on CUDA with torch 2.11): same output and gradients as
    eager within float rounding, for the weight too."""
    torch.manual_seed(0)
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    lin = torch.nn.Linear(64, 32)

    def f(x):
        return lin(norm(x))

    x = torch.randn(3, 40, 64)
    gy = torch.randn(3, 40, 32)
    runs = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        norm.weight.grad = None
        xi = x.clone().requires_grad_()
        y = fn(xi)
        (y * gy).sum().backward()
        runs.append((y.detach(), xi.grad, norm.weight.grad))
    for eager, compiled in zip(*runs, strict=True):
        assert compiled.abs().sum() > 0
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert torch.equal(rms_norm_reference(x, norm.weight, norm.eps), _reference(x, norm.weight, norm.eps))
