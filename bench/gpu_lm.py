"""``bench.gpu`` sections on KimiLM training steps: MFU of A3B-shaped layers (with a profile) and the
tiny/small presets' steps. See ``bench/gpu.py`` for what each figure means."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import torch

from bench.common import lognormal_lengths, packed_batch, random_docs, rnd
from bench.gpu_timing import cuda_time, interleaved, med, try_run

H100_SXM_BF16_DENSE = 989.4e12  # FLOP/s, NVIDIA H100 SXM data sheet (dense, no sparsity)
LAYERS = 4
VOCAB = 32768


def a3b_layers_cfg(layers: int = LAYERS, vocab: int = VOCAB):
    from kimivl_model.config import preset

    return dataclasses.replace(preset("a3b").lm, num_layers=layers, first_k_dense=0, vocab_size=vocab)


def flops_per_token(cfg, lens: list[int]) -> dict[str, float]:
    from kimivl_model.lm import lm_param_counts

    params = 6.0 * (lm_param_counts(cfg)["activated_no_embed"] + cfg.vocab_size * cfg.hidden_size)
    s_eff = sum(n * n for n in lens) / sum(lens)
    attn = 6.0 * cfg.num_layers * s_eff * cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    s_causal = sum(n * (n + 1) / 2 for n in lens) / sum(lens)  # keys actually seen per query, on average
    attn_causal = 6.0 * cfg.num_layers * s_causal * cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return {"params": params, "attention": attn, "attention_causal": attn_causal}


def mixed_lengths(total: int, median_len: float, hi: int, seed: int) -> list[int]:
    out: list[int] = []
    for n in lognormal_lengths(4 * total // 32 + 8, median_len=median_len, lo=32, hi=hi, seed=seed):
        if sum(out) + n >= total:
            out.append(total - sum(out))
            break
        out.append(n)
    return [n for n in out if n > 0]


@contextlib.contextmanager
def dispatch(model, attn_backend: str = "auto", expert_impl: str = "auto"):
    """Temporarily set every layer's attention backend and expert dispatch (restored on exit)."""
    from kimivl_model.mla import MLA
    from kimivl_model.moe import RoutedExperts

    saved = []
    for m in model.modules():
        if isinstance(m, MLA):
            saved.append((m, "attn_backend", m.attn_backend))
            m.attn_backend = attn_backend
        elif isinstance(m, RoutedExperts):
            saved.append((m, "impl", m.impl))
            m.impl = expert_impl
    try:
        yield
    finally:
        for m, attr, v in saved:
            setattr(m, attr, v)


def set_compiled(model, on: bool) -> None:
    """Compile the blocks (first call) or switch them between their compiled and eager ``__call__``."""
    from kimivl_model.compile import compile_blocks
    from kimivl_model.lm import DecoderLayer

    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    if on and getattr(layers[0], "_bench_compiled", None) is None:
        compile_blocks(model)
        for m in layers:
            m._bench_compiled = m._compiled_call_impl
    for m in layers:  # switch between the (cached) compiled call and eager without recompiling
        m._compiled_call_impl = m._bench_compiled if on else None


class LMStep:
    """fwd + CE + aux + bwd (+ optimizer step) of a KimiLM on one packed batch.

    ``autocast``: bf16 autocast over the model's weights (what ``TrainEngine`` runs on CUDA);
    ``path``: attention backend / expert dispatch for this variant (``dispatch``)."""

    def __init__(self, model, batch, autocast: bool, path: dict | None = None, opt=None) -> None:
        self.model, self.b, self.autocast, self.path, self.opt = model, batch, autocast, path or {}, opt

    def __call__(self) -> float:
        b = self.b
        with (
            dispatch(self.model, **self.path),
            torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast),
        ):
            out = self.model(
                b["input_ids"], cu_seqlens=b["cu_seqlens"], labels=b["labels"], return_logits=False
            )
            loss = out.loss + out.aux_loss
        loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.model.update_router_bias(out.expert_load)
        self.model.zero_grad(set_to_none=True)
        return out.loss


def step_metrics(tokens: int, fpt: dict[str, float], ts: list[float], peak: float) -> dict[str, Any]:
    t = med(ts)
    achieved = tokens * (fpt["params"] + fpt["attention"]) / t
    return {
        "step_ms": rnd(1e3 * t),
        "tokens_per_s": rnd(tokens / t),
        "achieved_tflops": rnd(achieved / 1e12),
        "mfu_vs_measured_peak": rnd(achieved / peak, 3),
        "mfu_vs_989_spec": rnd(achieved / H100_SXM_BF16_DENSE, 3),
        "mfu_causal_exact_vs_measured_peak": rnd(
            tokens * (fpt["params"] + fpt["attention_causal"]) / t / peak, 3
        ),
        "samples_ms": [rnd(1e3 * x) for x in ts],
    }


def cuda_batch(lens: list[int], vocab: int, seed: int) -> dict[str, torch.Tensor]:
    return {k: v.cuda() for k, v in packed_batch(random_docs(lens, vocab, seed=seed)).items()}


def profile_step(step, steps: int = 2, top: int = 18) -> dict[str, Any]:
    """torch.profiler over ``steps`` steps: top CUDA kernels by self time and a kernel-class breakdown."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels = []
    for e in prof.key_averages():
        dev = getattr(e, "self_device_time_total", None)
        if dev is None:
            dev = getattr(e, "self_cuda_time_total", 0.0)
        if dev and (e.device_type == torch.autograd.DeviceType.CUDA or not e.self_cpu_time_total):
            kernels.append((e.key, dev / 1e6 / steps, e.count // steps))
    busy = sum(k[1] for k in kernels)
    classes: dict[str, float] = {}
    for name, t, _ in kernels:
        n = name.lower()
        if "grouped" in n or ("cutlass" in n and "group" in n):
            c = "grouped_gemm"
        elif any(s in n for s in ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "sm90_")):
            c = "gemm"
        elif any(s in n for s in ("flash", "fmha", "attention", "attn")):
            c = "attention"
        elif any(
            s in n for s in ("index", "scatter", "gather", "sort", "radix", "bincount", "cumsum", "topk")
        ):
            c = "moe_dispatch_index_sort"
        elif "memcpy" in n or "memset" in n or "copy" in n:
            c = "copies"
        elif "reduce" in n:
            c = "reductions"
        else:
            c = "elementwise_other"
        classes[c] = classes.get(c, 0.0) + t
    kernels.sort(key=lambda k: -k[1])
    return {
        "step_wall_ms": rnd(1e3 * wall / steps),
        "gpu_kernel_busy_ms": rnd(1e3 * busy),
        "gpu_busy_fraction": rnd(busy / (wall / steps), 3),
        "by_class_ms": {k: rnd(1e3 * v) for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {"name": name[:110], "ms_per_step": rnd(1e3 * t), "calls_per_step": c}
            for name, t, c in kernels[:top]
        ],
    }


EAGER_VARIANTS = {
    "engine_before": {"attn_backend": "sdpa", "expert_impl": "loop"},  # the session-2 engine path
    "engine": {},  # library defaults on CUDA: torch varlen_attn (or flash-attn) + torch._grouped_mm
}


def _compile_variant(model, step: LMStep, budget_s: int = 300) -> dict[str, Any]:
    """Compile the blocks and run ``step`` twice (fwd + bwd graphs); abandoned after ``budget_s``."""
    import signal

    def on_alarm(signum, frame):
        raise TimeoutError(f"torch.compile took more than {budget_s} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(budget_s)
    t0 = time.perf_counter()
    try:
        set_compiled(model, True)
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        return {"compile_s": rnd(time.perf_counter() - t0)}
    except Exception as e:
        set_compiled(model, False)
        torch._dynamo.reset()
        return {"error": f"{type(e).__name__}: {str(e)[:400]}", "after_s": rnd(time.perf_counter() - t0)}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _measure_shape(model, lens, cfg, peak, reps, label_prefix: str, autocast: bool, profile: dict | None):
    """Eager variants interleaved, then the compiled engine path; returns (row, errors)."""
    batch = cuda_batch(lens, cfg.vocab_size, seed=len(lens))
    fpt = flops_per_token(cfg, lens)
    errors: dict[str, str] = {}
    steps = {f"{label_prefix}{n}": LMStep(model, batch, autocast, p) for n, p in EAGER_VARIANTS.items()}
    steps = {n: s for n, s in steps.items() if try_run(s, errors, n)}
    rows = {n: step_metrics(sum(lens), fpt, ts, peak) for n, ts in interleaved(steps, reps).items()}
    if profile is not None:
        for n, s in steps.items():
            profile[n] = _safe_profile(s)
    name = f"{label_prefix}engine_compiled"
    info = _compile_variant(model, steps.get(f"{label_prefix}engine") or LMStep(model, batch, autocast))
    if "error" in info:
        errors[name] = info["error"]
    else:
        cstep = LMStep(model, batch, autocast)
        rows[name] = {**step_metrics(sum(lens), fpt, cuda_time(cstep, reps, warmup=1), peak), **info}
        if profile is not None:
            profile[name] = _safe_profile(cstep)
    set_compiled(model, False)
    return rows, errors


def _safe_profile(step) -> dict[str, Any]:
    try:
        return profile_step(step)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def run_mfu(peak: float, quick: bool, reps: int) -> dict[str, Any]:
    from kimivl_model.lm import KimiLM, lm_param_counts

    cfg = a3b_layers_cfg(layers=1 if quick else LAYERS, vocab=4096 if quick else VOCAB)
    total = 2048 if quick else 16384
    shapes = {
        f"{total // 1024}k_mixed_docs": mixed_lengths(total, 512.0, min(4096, total), seed=0),
        f"2x{total // 2048}k_docs": [total // 2, total // 2],
    }
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = KimiLM(cfg).train()
    rows: dict[str, Any] = {}
    profile: dict[str, Any] = {}
    for label, lens in shapes.items():
        rows[label] = {
            "tokens": sum(lens),
            "documents": len(lens),
            "max_doc": max(lens),
            "gflop_per_token": rnd(sum(flops_per_token(cfg, lens)[k] for k in ("params", "attention")) / 1e9),
            "variants": {},
            "errors": {},
        }
    # fp32 weights under bf16 autocast (TrainEngine's default), then the matmul weights in bf16 under autocast
    # (TrainEngine with working_weights: bf16; the fp32 masters live in the optimizer, not timed here), then
    # the whole model cast to bf16 (no autocast, for comparison)
    for prefix, autocast in (("", True), ("bf16_working_", True), ("bf16_weights_", False)):
        if prefix == "bf16_working_":
            from kimivl_model.precision import low_precision_weights

            for _, p in low_precision_weights(model):
                p.data = p.data.to(torch.bfloat16)
        elif prefix:
            model.to(torch.bfloat16)
        for si, (label, lens) in enumerate(shapes.items()):
            prof = profile if (si == 0 and not quick) else None
            v, e = _measure_shape(model, lens, cfg, peak, reps, prefix, autocast, prof)
            rows[label]["variants"].update(v)
            rows[label]["errors"].update(e)
    counts = lm_param_counts(cfg)
    del model
    torch.cuda.empty_cache()
    return {
        "config": {
            "layers": cfg.num_layers,
            "first_k_dense": cfg.first_k_dense,
            "vocab": cfg.vocab_size,
            "hidden": cfg.hidden_size,
            "experts": f"{cfg.num_routed_experts} routed top-{cfg.num_experts_per_tok} + "
            f"{cfg.num_shared_experts} shared, width {cfg.moe_intermediate_size}",
            "attention": f"MLA {cfg.num_heads} heads, q/k {cfg.qk_head_dim}, v {cfg.v_head_dim}, kv_lora {cfg.kv_lora_rank}",
            "params_total": counts["total"],
            "params_activated_no_embed": counts["activated_no_embed"],
            "step": "forward + chunked CE + aux loss + backward (no optimizer step)",
        },
        "variants_are": {
            "engine_before": "autocast bf16 over fp32 weights, per-segment SDPA + per-expert loop (session 2 engine)",
            "engine": "autocast bf16 over fp32 weights, library defaults (torch varlen_attn / flash-attn, grouped_mm)",
            "engine_compiled": "engine + model.compile: true (kimivl_model.compile.compile_blocks)",
            "bf16_working_*": "the same with train.working_weights: bf16 (matmul weights in bf16, norms, "
            "embeddings and router fp32, autocast on): the TrainEngine path with fp32 masters in Muon",
            "bf16_weights_*": "the same with the model cast to bf16 (no autocast), for comparison",
        },
        "shapes": rows,
        "profile": profile,
        "peak_mem_gib": rnd(torch.cuda.max_memory_allocated() / 2**30),
    }


def run_presets(quick: bool, reps: int) -> dict[str, Any]:
    from kimivl_model.config import preset
    from kimivl_model.lm import KimiLM

    out = {}
    for name, total in (("tiny", 2048), ("small", 8192)):
        cfg = preset(name).lm
        lens = mixed_lengths(total, 256.0, min(2048, total), seed=3)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = KimiLM(cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        step = LMStep(model, cuda_batch(lens, cfg.vocab_size, seed=3), True, opt=opt)
        ts = cuda_time(step, 3 if quick else reps, warmup=3)
        out[name] = {
            "tokens_per_step": total,
            "documents": len(lens),
            "step_ms": rnd(1e3 * med(ts)),
            "tokens_per_s": rnd(total / med(ts)),
            "step": "autocast bf16 over fp32 weights, fwd + bwd + fused AdamW + router bias update",
        }
        del model, opt, step
        torch.cuda.empty_cache()
    return out
