"""Model FLOPs per token and an MFU estimate against the GEMM peak measured on this machine.

FLOPs per trained token = 6 x (parameters a token activates in matmuls): the LM's activated parameters
without the input embedding (attention, dense FFN, k routed + shared experts, router, output head), plus,
for image tokens, the ViT and projector parameters times the patches behind one LM token (merge^2). The
attention score/value FLOPs are NOT included, so the MFU reported is a lower bound (documented in every
metric name as ``mfu_est``). The peak is the fp32 (CPU) or bf16 (CUDA) matmul throughput measured once
per process on square n=1024 (CPU) / 8192 (CUDA) matrices.
"""

from __future__ import annotations

import functools
import time

import torch

from kimivl_model.config import VLMConfig
from kimivl_model.lm import lm_param_counts


@functools.lru_cache(maxsize=4)
def measure_peak_flops(device: str = "cpu") -> float:
    """Best observed matmul FLOP/s (fp32 on CPU, bf16 on CUDA)."""
    if device == "cuda" and torch.cuda.is_available():
        n, dtype, reps = 8192, torch.bfloat16, 10
    else:
        n, dtype, reps, device = 1024, torch.float32, 5, "cpu"
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def flops_per_token(cfg: VLMConfig, objective: str) -> float:
    """6 x matmul parameters a text token activates (see module docstring)."""
    lm = lm_param_counts(cfg.lm)
    head = cfg.lm.vocab_size * cfg.lm.hidden_size
    if objective == "coca":
        vit = _vit_matmul_params(cfg)
        return 6.0 * vit * cfg.projector.merge_kernel[0] * cfg.projector.merge_kernel[1]
    return 6.0 * (lm["activated_no_embed"] + head)


def _vit_matmul_params(cfg: VLMConfig) -> int:
    v = cfg.vit
    per_layer = 4 * v.hidden_size * v.hidden_size + 2 * v.hidden_size * v.intermediate_size
    return v.num_layers * per_layer + v.in_channels * v.patch_size**2 * v.hidden_size


class MfuMeter:
    """Running tokens/s -> achieved FLOP/s -> MFU estimate (lower bound: attention FLOPs excluded)."""

    def __init__(self, cfg: VLMConfig, objective: str, device: str = "cpu") -> None:
        self.fpt = flops_per_token(cfg, objective)
        self.peak = measure_peak_flops(device)
        self.last: float | None = None

    def update(self, tokens: int, now: float) -> dict[str, float]:
        if self.last is None:
            self.last = now
            return {}
        dt, self.last = max(now - self.last, 1e-9), now
        achieved = tokens * self.fpt / dt
        return {"model_tflops_per_s": achieved / 1e12, "mfu_est": achieved / self.peak}
