"""Fused output-head + cross-entropy: the summed CE of ``hidden @ weight.T`` without (N, V) logits alive.

``linear_cross_entropy_sum(hidden, weight, labels, chunk_size)`` = ``F.cross_entropy(hidden @ weight.T,
labels, reduction="sum")`` with the logits computed ``chunk_size`` rows at a time. When a gradient is
needed, each chunk's gradient is computed right away in the forward pass (the idea of Liger-Kernel's fused
linear cross-entropy): with p = softmax(logits), d(sum CE)/d logits = p - onehot(labels), so

    grad_hidden[chunk] = (p - onehot) @ weight          grad_weight += (p - onehot).T @ hidden[chunk]

and backward only scales the stored gradients by the incoming one. Same FLOPs as the unfused head (one
forward and two gradient GEMMs), no recomputation, and neither the logits nor their log-softmax or
gradient ever exist for more than one chunk: (N, V) fp32 is 64 MB for 2,048 tokens of the small preset's
8K vocabulary and 5.4 GB for 8,192 tokens of A3B's 164K one. On a 1-thread CPU the small LM's
fwd+bwd head + CE went from 771 to 674 ms (fewer passes over the logits, and no 64 MB buffers for the
allocator to map and fault in on every step).

Numerics match the unfused path: the GEMMs run in the ambient dtype (bf16 under CUDA autocast, exactly like
``nn.Linear`` there) and the log-softmax, loss and p - onehot in fp32; ``grad_weight`` is accumulated in
fp32 across chunks. Every label must be a valid class (callers select the labelled rows first).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _chunk_stats(hc: torch.Tensor, weight: torch.Tensor, lc: torch.Tensor):
    logits = torch.mm(hc, weight.t()).float()  # (c, V) fp32 (the GEMM itself in the ambient dtype)
    lse = torch.logsumexp(logits, dim=1)  # (c,)
    loss = (lse - logits.gather(1, lc.unsqueeze(1)).squeeze(1)).sum()
    return logits, lse, loss


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):
        autocast = torch.is_autocast_enabled(hidden.device.type)
        fp32 = not autocast and hidden.dtype == weight.dtype == torch.float32
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        g_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        g_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        rows = torch.arange(min(chunk_size, hidden.shape[0]), device=hidden.device)
        for s in range(0, hidden.shape[0], chunk_size):
            hc, lc = hidden[s : s + chunk_size], labels[s : s + chunk_size]
            logits, lse, loss = _chunk_stats(hc, weight, lc)
            total += loss
            # logits -> p - onehot, in place: d(sum CE)/d(logits) of this chunk
            p = logits.sub_(lse.unsqueeze(1)).exp_()
            p[rows[: hc.shape[0]], lc] -= 1.0
            g = p if autocast else p.to(hc.dtype)
            if g_hidden is not None:
                g_hidden[s : s + chunk_size] = torch.mm(g, weight)
            if g_weight is not None:
                if fp32:  # accumulate in place
                    g_weight.addmm_(g.t(), hc)
                else:  # autocast (or bf16 weights) picks the GEMM dtype, as nn.Linear's backward would
                    g_weight += torch.mm(g.t(), hc)
        ctx.save_for_backward(g_hidden, g_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        g_hidden, g_weight = ctx.saved_tensors
        gh = g_hidden * grad_out.to(g_hidden.dtype) if g_hidden is not None else None
        gw = (g_weight * grad_out).to(ctx.weight_dtype) if g_weight is not None else None
        return gh, gw, None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Summed fp32 cross-entropy of ``hidden (N, H) @ weight (V, H).T`` against ``labels (N,)`` (all valid
    classes), ``chunk_size`` rows at a time; differentiable in ``hidden`` and ``weight``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden (N, H) and weight (V, H) expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be (N={hidden.shape[0]},), got {tuple(labels.shape)}")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropySum.apply(hidden, weight, labels, chunk_size)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk_size):
        total += _chunk_stats(hidden[s : s + chunk_size], weight, labels[s : s + chunk_size])[2]
    return total
