"""RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"), as used by DeepSeek-V3/Moonlight.

y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (fp64 for fp64 input) and cast back to the input dtype (bf16-safe).
The only parameter is ``weight`` (no bias), matching the public checkpoint names.

Forward and backward are one autograd node (``_RMSNormFn``) with the closed-form gradient
dx = r * (g - xhat * mean(g * xhat)), g = dy * weight, xhat = x * r, r = 1 / sqrt(mean(x^2) + eps);
dweight = sum(dy * xhat). Autograd over the forward's six ops would save more tensors and run ~twice as
many elementwise passes (measured 6.1 -> 4.1 ms forward + backward at 2048 x 512 fp32 on one core). The
output and dweight are bit-identical to the op-by-op graph, dx equal up to float rounding
(``tests/unit/test_norm.py`` checks both against autograd over the formula, fp32 and bf16, and gradcheck).

Under ``torch.compile`` the module uses the op-by-op formula (``rms_norm_reference``) instead: Inductor fuses
it and derives the backward itself, so the hand-written node buys nothing there, and on CUDA (torch 2.11,
H100, 2026-11-24) Inductor's compilation of the node gave wrong gradients (the weight's came out zero;
``tests/unit/test_gpu_moe.py``'s compiled-vs-eager check caught it). The forward is the same math either way.
"""

from __future__ import annotations

import torch
from torch import nn


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 math (fp64 stays fp64)
        r = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)  # (..., 1)
        xhat = xf * r
        ctx.save_for_backward(xhat, r, weight)
        return (xhat * weight.to(xf.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xhat, r, weight = ctx.saved_tensors
        dyf = dy.to(xhat.dtype)
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dyf * xhat).reshape(-1, xhat.shape[-1]).sum(dim=0).to(weight.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            g = dyf * weight.to(xhat.dtype)
            dx = ((g - xhat * (g * xhat).mean(dim=-1, keepdim=True)) * r).to(dy.dtype)
        return dx, dw, None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The op-by-op formula (autograd derives the backward): the compiled path and the tests' reference."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    r = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * r * weight.to(xf.dtype)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"RMSNorm.dim must be > 0, got {dim}")
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., dim) -> (..., dim), same dtype
        if torch.compiler.is_compiling():  # module docstring: Inductor fuses the formula itself
            return rms_norm_reference(x, self.weight, self.eps)
        return _RMSNormFn.apply(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
