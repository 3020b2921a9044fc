"""The CUDA path, measured in one run: bf16 training MFU of A3B-shaped LM layers, varlen attention
backends, and the tiny/small presets' training step, against the bf16 GEMM peak measured in the same run.

    python -m bench.gpu [--quick] [--no-write] [--out-dir DIR]

Without CUDA it prints ``{"bench": "gpu", "skipped": "no CUDA"}`` and writes nothing (exit 0).

1. ``peak``: an 8192^3 bf16 matmul (3 warm-ups, then 10 timed with CUDA events: best and median), plus the
   H100 SXM data-sheet figure (989.4 dense bf16 TFLOP/s) as a second denominator.
2. ``mfu``: ``KimiLM`` with the a3b preset's LM dimensions (hidden 2048, MLA 16 heads q/k 192 v 128,
   kv_lora 512, 64 routed experts of width 1408, top-6, 2 shared) but ``LAYERS`` layers, all MoE
   (``first_k_dense=0``: the real model has 26 MoE layers of 27), and a ``VOCAB``-token head (the real
   163,840-token head would dominate a 4-layer stack; 32,768 keeps the head at ~17% of the FLOPs, close to
   the real model's ~13%). One step = forward + CE (chunked) + aux loss + backward (no optimizer step).
   FLOPs per token (bench.mfu's convention): 6 x activated parameters (no input embedding, with the head)
   + 6 * L * S * H * (d_qk + d_v) with S the token's document length (no causal discount; the
   causal-exact figure is reported next to it). Variants, timed interleaved:
   - ``autocast``: what ``TrainEngine`` runs (fp32 master weights, ``torch.autocast`` bf16); the experts'
     dispatch then takes the per-expert loop (``_grouped_mm`` needs bf16 inputs and weights);
   - ``autocast_grouped``: the same with ``torch._grouped_mm`` forced, inputs and expert weights cast to
     bf16 inside the experts (a bench-local patch, not library code);
   - ``autocast_grouped_torchvarlen``: plus torch's ``varlen_attn`` instead of per-segment SDPA;
   - ``autocast_grouped_compiled``: the fastest patch set with every decoder layer under
     ``torch.compile`` (first shape only; abandoned, and reported, if compiling takes over 240 s);
   - ``bf16_weights``: the model cast to bf16 (library default dispatch: ``_grouped_mm``).
   The variants of the first shape are profiled with ``torch.profiler``: top kernels, a kernel-class
   breakdown and the fraction of the step the GPU is busy.
3. ``attention``: ``varlen_attention`` fwd+bwd on packed causal documents, bf16, MLA head shapes (16 heads,
   q/k 192, v 128): per-segment SDPA (``sdpa``) vs one dense-masked SDPA (``sdpa_masked``) vs
   ``torch.nn.attention.varlen.varlen_attn`` when this torch has it. Outputs are checked to agree first.
4. ``presets``: tiny and small ``KimiLM`` training steps (autocast bf16, fwd+bwd+fused AdamW+router bias)
   on packed batches: tokens/s for orientation (small models are launch-bound on a GPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import bench_main, lognormal_lengths, packed_batch, parser, random_docs, rnd

H100_SXM_BF16_DENSE = 989.4e12  # FLOP/s, NVIDIA H100 SXM data sheet (dense, no sparsity)
GOAL = 0.45
LAYERS = 4
VOCAB = 32768


# ------------------------------------------------------------------------------------------ timing
def cuda_time(fn, reps: int, warmup: int = 2) -> list[float]:
    """Seconds per call of ``fn`` (each call timed with CUDA events, after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    return out


def interleaved(fns: dict[str, Any], reps: int, warmup: int = 2) -> dict[str, list[float]]:
    """Wall seconds per call (synchronised) with the contenders interleaved, order alternating."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    torch.cuda.synchronize()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names if r % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            fns[n]()
            torch.cuda.synchronize()
            out[n].append(time.perf_counter() - t0)
    return out


def med(xs: list[float]) -> float:
    return float(statistics.median(xs))


def gemm_peak(n: int = 8192, reps: int = 10) -> dict[str, float]:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ts = cuda_time(lambda: a @ b, reps, warmup=3)
    return {"best_tflops": rnd(2 * n**3 / min(ts) / 1e12), "median_tflops": rnd(2 * n**3 / med(ts) / 1e12)}


# ------------------------------------------------------------------------------------------ torch varlen
def torch_varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def call_torch_varlen(q, k, v, cu, max_len: int, causal: bool, scale: float):
    """torch's varlen_attn with our semantics: v zero-padded to q/k's head dim (as every backend of ours)."""
    fn = torch_varlen_attn()
    params = inspect.signature(fn).parameters
    dv = v.shape[-1]
    if dv < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))
    kw: dict[str, Any] = {}
    if "is_causal" in params:
        kw["is_causal"] = causal
    elif "window_size" in params:
        kw["window_size"] = (-1, 0) if causal else (-1, -1)
    if "scale" in params:
        kw["scale"] = scale
    elif not math.isclose(scale, q.shape[-1] ** -0.5):
        q = q * (scale / q.shape[-1] ** -0.5)
    cu = cu.to(torch.int32)
    return fn(q, k, v, cu, cu, max_len, max_len, **kw)[..., :dv]


# ------------------------------------------------------------------------------------------ patches
@contextlib.contextmanager
def patched(grouped_under_autocast: bool = False, torch_varlen_max: int | None = None):
    """Bench-local variants of the library's dispatch (restored on exit)."""
    import kimivl_model.mla as mla_mod
    import kimivl_model.moe as moe_mod

    saved = (moe_mod._swiglu_grouped, moe_mod.RoutedExperts._use_grouped, mla_mod.varlen_attention)
    orig_grouped = saved[0]
    try:
        if grouped_under_autocast:

            def grouped(xs, counts, gate, up, down):
                if torch.is_autocast_enabled("cuda"):
                    dt = torch.get_autocast_dtype("cuda")
                    xs, gate, up, down = xs.to(dt), gate.to(dt), up.to(dt), down.to(dt)
                return orig_grouped(xs, counts, gate, up, down)

            moe_mod._swiglu_grouped = grouped
            moe_mod.RoutedExperts._use_grouped = lambda self, x: x.is_cuda
        if torch_varlen_max is not None:

            def attn(q, k, v, cu, *, causal=False, softmax_scale=None, backend="auto", **_):
                dt = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else q.dtype
                scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
                return call_torch_varlen(q.to(dt), k.to(dt), v.to(dt), cu, torch_varlen_max, causal, scale)

            mla_mod.varlen_attention = attn
        yield
    finally:
        moe_mod._swiglu_grouped, moe_mod.RoutedExperts._use_grouped, mla_mod.varlen_attention = saved


# ------------------------------------------------------------------------------------------ MFU
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


class LMStep:
    """fwd + CE + aux + bwd of a KimiLM on one packed batch (optionally under a patch and autocast)."""

    def __init__(
        self, model, batch, autocast: bool, patch: dict | None = None, opt=None, layers=None
    ) -> None:
        self.model, self.b, self.autocast, self.patch, self.opt = model, batch, autocast, patch or {}, opt
        self.layers = layers  # e.g. torch.compile'd wrappers of model.model.layers, swapped in for forward

    def __call__(self) -> float:
        b = self.b
        backbone = self.model.model
        own = backbone.layers
        if self.layers is not None:
            backbone.layers = self.layers
        try:
            with patched(**self.patch), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                out = self.model(
                    b["input_ids"], cu_seqlens=b["cu_seqlens"], labels=b["labels"], return_logits=False
                )
        finally:
            backbone.layers = own
        (out.loss + out.aux_loss).backward()
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


def compiled_step(model, batch, lens: list[int], budget_s: int = 240) -> tuple[LMStep | None, dict[str, Any]]:
    """The fastest autocast variant with every decoder layer under ``torch.compile`` (a bench-local cheap
    win, not library code); compilation is abandoned after ``budget_s`` seconds."""
    import signal

    def on_alarm(signum, frame):
        raise TimeoutError(f"torch.compile took more than {budget_s} s")

    layers = torch.nn.ModuleList(torch.compile(layer, dynamic=False) for layer in model.model.layers)
    patch = {"grouped_under_autocast": True}
    if torch_varlen_attn() is not None:
        patch["torch_varlen_max"] = max(lens)
    step = LMStep(model, batch, True, patch, layers=layers)
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(budget_s)
    t0 = time.perf_counter()
    try:
        for _ in range(2):  # forward + backward graphs
            step()
        torch.cuda.synchronize()
        info: dict[str, Any] = {"compile_s": rnd(time.perf_counter() - t0), "patch": sorted(patch)}
    except Exception as e:
        info = {"error": f"{type(e).__name__}: {str(e)[:400]}", "after_s": rnd(time.perf_counter() - t0)}
        step = None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    if step is None:
        torch._dynamo.reset()
    return step, info


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


def run_mfu(peak: float, quick: bool, reps: int) -> dict[str, Any]:
    from kimivl_model.lm import KimiLM

    cfg = a3b_layers_cfg(layers=1 if quick else LAYERS, vocab=4096 if quick else VOCAB)
    total = 2048 if quick else 16384
    shapes = {
        f"{total // 1024}k_mixed_docs": mixed_lengths(total, 512.0, min(4096, total), seed=0),
        f"2x{total // 2048}k_docs": [total // 2, total // 2],
    }
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = KimiLM(cfg, attn_backend="sdpa").train()
    has_varlen = torch_varlen_attn() is not None
    rows: dict[str, Any] = {}
    profile = None
    for si, (label, lens) in enumerate(shapes.items()):
        batch = cuda_batch(lens, cfg.vocab_size, seed=si)
        fpt = flops_per_token(cfg, lens)
        variants = {
            "autocast": LMStep(model, batch, True),
            "autocast_grouped": LMStep(model, batch, True, {"grouped_under_autocast": True}),
        }
        if has_varlen:
            variants["autocast_grouped_torchvarlen"] = LMStep(
                model, batch, True, {"grouped_under_autocast": True, "torch_varlen_max": max(lens)}
            )
        errors: dict[str, str] = {}
        for name in list(variants):  # a variant that fails is reported, not fatal
            try:
                variants[name]()
                torch.cuda.synchronize()
            except Exception as e:
                errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
                variants.pop(name)
        samples = interleaved(variants, reps=reps, warmup=2)
        tokens = sum(lens)
        res: dict[str, Any] = {
            "tokens": tokens,
            "documents": len(lens),
            "max_doc": max(lens),
            "gflop_per_token": rnd((fpt["params"] + fpt["attention"]) / 1e9),
            "gflop_per_token_causal_exact": rnd((fpt["params"] + fpt["attention_causal"]) / 1e9),
            "variants": {},
            "errors": errors,
        }
        for name, ts in samples.items():
            res["variants"][name] = step_metrics(tokens, fpt, ts, peak)
        rows[label] = res
        if si == 0 and not quick and samples:
            fastest = min(samples, key=lambda n: med(samples[n]))
            profile = {}
            for name in dict.fromkeys(["autocast", fastest]):
                if name in variants:
                    try:
                        profile[name] = profile_step(variants[name])
                    except Exception as e:
                        profile[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            cstep, cinfo = compiled_step(model, batch, lens)
            res["compile"] = cinfo
            if cstep is not None:
                name = "autocast_grouped_compiled"
                res["variants"][name] = step_metrics(tokens, fpt, cuda_time(cstep, reps, warmup=1), peak)
                try:
                    profile[name] = profile_step(cstep)
                except Exception as e:
                    profile[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                del cstep
        del batch
    # the same layers with bf16 weights (library default dispatch: torch._grouped_mm)
    model.to(torch.bfloat16)
    for si, (label, lens) in enumerate(shapes.items()):
        batch = cuda_batch(lens, cfg.vocab_size, seed=si)
        fpt = flops_per_token(cfg, lens)
        step = LMStep(model, batch, False)
        try:
            ts = cuda_time(step, reps, warmup=2)
        except Exception as e:
            rows[label]["errors"]["bf16_weights"] = f"{type(e).__name__}: {str(e)[:300]}"
            continue
        rows[label]["variants"]["bf16_weights"] = step_metrics(sum(lens), fpt, ts, peak)
        if si == 0 and not quick and profile is not None:
            try:
                profile["bf16_weights"] = profile_step(step)
            except Exception as e:
                profile["bf16_weights"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    from kimivl_model.lm import lm_param_counts

    counts = lm_param_counts(cfg)
    del model
    torch.cuda.empty_cache()
    return {
        "config": {
            "layers": cfg.num_layers,
            "first_k_dense": cfg.first_k_dense,
            "vocab": cfg.vocab_size,
            "hidden": cfg.hidden_size,
            "experts": f"{cfg.num_routed_experts} routed top-{cfg.num_experts_per_tok} + {cfg.num_shared_experts} shared, width {cfg.moe_intermediate_size}",
            "attention": f"MLA {cfg.num_heads} heads, q/k {cfg.qk_head_dim}, v {cfg.v_head_dim}, kv_lora {cfg.kv_lora_rank}",
            "params_total": counts["total"],
            "params_activated_no_embed": counts["activated_no_embed"],
            "step": "forward + chunked CE + aux loss + backward (no optimizer step)",
        },
        "shapes": rows,
        "profile": profile,
        "peak_mem_gib": rnd(torch.cuda.max_memory_allocated() / 2**30),
    }


# ------------------------------------------------------------------------------------------ attention
def attention_case(lens: list[int], heads: int, dqk: int, dv: int, reps: int, seed: int) -> dict[str, Any]:
    """fwd+bwd of each backend on one packed causal batch; outputs compared with the dense-masked one."""
    from kimivl_model.attention import varlen_attention

    total, scale = sum(lens), dqk**-0.5
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rand(d: int) -> torch.Tensor:
        return torch.randn(total, heads, d, device="cuda", generator=g, dtype=torch.bfloat16)

    q, k, v, gout = (
        rand(dqk).requires_grad_(),
        rand(dqk).requires_grad_(),
        rand(dv).requires_grad_(),
        rand(dv),
    )
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device="cuda")

    def fb(fn):
        def step():
            for x in (q, k, v):
                x.grad = None
            o = fn()
            o.backward(gout)
            return o

        return step

    fns = {
        name: fb(lambda b=name: varlen_attention(q, k, v, cu, causal=True, softmax_scale=scale, backend=b))
        for name in ("sdpa_masked", "sdpa")
    }
    if torch_varlen_attn() is not None:
        fns["torch_varlen_attn"] = fb(lambda: call_torch_varlen(q, k, v, cu, max(lens), True, scale))
    agree, errors, ref = {}, {}, None
    for name in list(fns):
        try:
            o = fns[name]().detach().float()
            ref = o if ref is None else ref
            agree[name] = rnd(float((o - ref).norm() / ref.norm()), 3)
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
            fns.pop(name)
    samples = interleaved(fns, reps=reps, warmup=2)
    flops = 7.0 * sum(n * (n + 1) / 2 for n in lens) * heads * (dqk + dv)  # fwd 2 GEMMs, bwd 2.5x fwd
    row: dict[str, Any] = {
        "tokens": total,
        "documents": len(lens),
        "max_doc": max(lens),
        "distinct_lengths": len(set(lens)),
        "rel_diff_vs_first": agree,
        "errors": errors,
    }
    for name, ts in samples.items():
        row[name] = {"fwd_bwd_ms": rnd(1e3 * med(ts)), "tflops_causal_useful": rnd(flops / med(ts) / 1e12)}
    if "sdpa" in samples and "sdpa_masked" in samples:
        row["speedup_sdpa_vs_masked"] = rnd(med(samples["sdpa_masked"]) / med(samples["sdpa"]))
    if "torch_varlen_attn" in samples and "sdpa" in samples:
        row["speedup_torch_varlen_vs_sdpa"] = rnd(med(samples["sdpa"]) / med(samples["torch_varlen_attn"]))
    return row


def run_attention(quick: bool, reps: int) -> dict[str, Any]:
    heads, dqk, dv = 16, 192, 128
    cases = (
        {"4k_mixed": (4096, 512.0, 2048)}
        if quick
        else {
            "16k_mixed_median512": (16384, 512.0, 4096),
            "16k_mixed_median128": (16384, 128.0, 2048),
            "16k_long_docs": (16384, 4096.0, 8192),
        }
    )
    out: dict[str, Any] = {}
    for ci, (label, (total, median_len, hi)) in enumerate(cases.items()):
        out[label] = attention_case(mixed_lengths(total, median_len, hi, seed=ci), heads, dqk, dv, reps, ci)
        torch.cuda.empty_cache()
    return {
        "shape": {"heads": heads, "d_qk": dqk, "d_v": dv, "causal": True, "dtype": "bfloat16"},
        "flops_note": "tflops_causal_useful counts only unmasked scores: 7 * sum(n(n+1)/2) * H * (dqk + dv)",
        "rel_diff_note": "relative L2 difference of the output vs the first backend that ran (sdpa_masked)",
        "cases": out,
    }


# ------------------------------------------------------------------------------------------ presets
def run_presets(quick: bool, reps: int) -> dict[str, Any]:
    from kimivl_model.config import preset
    from kimivl_model.lm import KimiLM

    out = {}
    for name, total in (("tiny", 2048), ("small", 8192)):
        cfg = preset(name).lm
        lens = mixed_lengths(total, 256.0, min(2048, total), seed=3)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = KimiLM(cfg, attn_backend="auto").train()
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


# ------------------------------------------------------------------------------------------ main
def env_info() -> dict[str, Any]:
    from kimivl_model.attention import flash_attn_available

    p = torch.cuda.get_device_properties(0)
    fn = torch_varlen_attn()
    info = {
        "device": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "sms": p.multi_processor_count,
        "memory_gib": rnd(p.total_memory / 2**30),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "flash_attn_installed": flash_attn_available(),
        "torch_grouped_mm": hasattr(torch, "_grouped_mm"),
        "torch_varlen_attn": None if fn is None else str(inspect.signature(fn)),
    }
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception as e:
        info["deepspeed"] = f"not importable: {type(e).__name__}"
    return info


def run(quick: bool = False) -> dict[str, Any]:
    reps = 3 if quick else 8
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 parts (router) as a trainer would run them
    env = env_info()
    peak0 = gemm_peak()
    mfu = run_mfu(peak0["best_tflops"] * 1e12, quick, reps)
    attn = run_attention(quick, reps)
    presets = run_presets(quick, reps)
    peak1 = gemm_peak()
    peak = max(peak0["best_tflops"], peak1["best_tflops"])
    main_shape = next(iter(mfu["shapes"].values()))
    variants = main_shape["variants"]
    best_name = max(variants, key=lambda n: variants[n]["mfu_vs_measured_peak"])
    ours = variants.get("autocast", variants[best_name])
    return {
        "what": "bf16 training MFU of A3B-shaped MoE LM layers on one GPU vs the bf16 GEMM peak measured in "
        "the same run; varlen attention backends; tiny/small preset training steps",
        "env": env,
        "peak_gemm_8192_bf16": {"before": peak0, "after": peak1, "h100_sxm_spec_tflops": 989.4},
        "mfu": mfu,
        "attention": attn,
        "presets": presets,
        "ours": {"name": "autocast (the TrainEngine path)", "mfu": ours["mfu_vs_measured_peak"]},
        "best": {"name": best_name, "mfu": variants[best_name]["mfu_vs_measured_peak"]},
        "baseline": {"name": "bf16 GEMM 8192^3, same run", "tflops": peak},
        "ratio": ours["mfu_vs_measured_peak"],
        "ratio_is": f"MFU of the TrainEngine path (autocast) on {next(iter(mfu['shapes']))} vs the measured peak",
        "goal": f">= {GOAL}",
        "goal_met": bool(ours["mfu_vs_measured_peak"] >= GOAL),
        "goal_met_by_best_variant": bool(variants[best_name]["mfu_vs_measured_peak"] >= GOAL),
    }


def main(argv: list[str] | None = None) -> dict:
    if not torch.cuda.is_available():
        args = parser(__doc__).parse_args(argv)  # accept the common flags, write nothing
        del args
        out = {"bench": "gpu", "skipped": "no CUDA"}
        print(json.dumps(out, sort_keys=True))
        return out
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return bench_main("gpu", __doc__, run, argv)


if __name__ == "__main__":
    main()
