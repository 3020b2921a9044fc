"""``bench.gpu`` sections on single components: varlen attention backends, the MoE layer vs the per-expert
loop reference and a dense SwiGLU, and the Muon step vs AdamW. See ``bench/gpu.py``."""

from __future__ import annotations

from typing import Any

import torch

from bench.common import rnd
from bench.gpu_lm import LMStep, a3b_layers_cfg, cuda_batch, mixed_lengths
from bench.gpu_timing import cuda_time, interleaved, med, try_run

GOAL_MOE_LOOP = 3.0
GOAL_MOE_DENSE = 1.5
GOAL_MUON = 1.3


# ------------------------------------------------------------------------------------------ attention
def attention_case(lens: list[int], heads: int, dqk: int, dv: int, reps: int, seed: int) -> dict[str, Any]:
    """fwd+bwd of each backend on one packed causal batch; outputs compared with the dense-masked one."""
    from kimivl_model.attention import torch_varlen_available, varlen_attention

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

    def fb(backend: str):
        def step():
            for x in (q, k, v):
                x.grad = None
            o = varlen_attention(q, k, v, cu, causal=True, softmax_scale=scale, backend=backend)
            o.backward(gout)
            return o

        return step

    names = ["sdpa_masked", "sdpa"] + (["torch_varlen"] if torch_varlen_available() else [])
    fns = {n: fb(n) for n in names}
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
    if "torch_varlen" in samples and "sdpa" in samples:
        row["speedup_torch_varlen_vs_sdpa"] = rnd(med(samples["sdpa"]) / med(samples["torch_varlen"]))
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


# ------------------------------------------------------------------------------------------ MoE
def run_moe(quick: bool, reps: int) -> dict[str, Any]:
    """bench.moe's comparison at A3B expert shapes on the GPU (bf16 autocast over fp32 weights)."""
    from bench.moe import loop_reference, moe_shape
    from kimivl_model.moe import MoE, SwiGLU

    cfg = a3b_layers_cfg(layers=1)
    tokens = 2048 if quick else 16384
    torch.manual_seed(0)
    with torch.device("cuda"):
        moe = MoE(cfg).train()
        width = (cfg.num_experts_per_tok + cfg.num_shared_experts) * cfg.moe_intermediate_size
        dense = SwiGLU(cfg.hidden_size, width)
        x = torch.randn(tokens, cfg.hidden_size).requires_grad_()
        proj = torch.randn(tokens, cfg.hidden_size)
    cu = torch.tensor([0, tokens], device="cuda")

    def fwd_bwd(fn):
        def step():
            moe.zero_grad(set_to_none=True)
            dense.zero_grad(set_to_none=True)
            x.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = fn()
            (y.float() * proj).sum().backward()
            return y

        return step

    fns = {
        "ours": fwd_bwd(lambda: moe(x, cu)[0]),
        "loop_reference": fwd_bwd(lambda: loop_reference(moe, x)),
        "dense_swiglu": fwd_bwd(lambda: dense(x)),
    }
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = moe(x, cu)[0].float(), loop_reference(moe, x).float()
    rel = float((a - b).norm() / b.norm())
    errors: dict[str, str] = {}
    fns = {n: f for n, f in fns.items() if try_run(f, errors, n)}
    s = interleaved(fns, reps=reps, warmup=2)
    t = {n: med(v) for n, v in s.items()}
    out: dict[str, Any] = {
        "shape": moe_shape(cfg, tokens, width),
        "rel_diff_ours_vs_loop_bf16": rnd(rel, 3),
        "errors": errors,
        **{n: {"ms": rnd(1e3 * v), "tokens_per_s": rnd(tokens / v)} for n, v in t.items()},
    }
    if "ours" in t and "loop_reference" in t and "dense_swiglu" in t:
        out["ratio_vs_loop"] = rnd(t["loop_reference"] / t["ours"])
        out["ratio_vs_dense"] = rnd(t["ours"] / t["dense_swiglu"])
        out["goal"] = f"ratio_vs_loop >= {GOAL_MOE_LOOP} and ratio_vs_dense <= {GOAL_MOE_DENSE}"
        out["goal_met"] = bool(
            out["ratio_vs_loop"] >= GOAL_MOE_LOOP and out["ratio_vs_dense"] <= GOAL_MOE_DENSE
        )
    return out  # the caller empties the CUDA cache


# ------------------------------------------------------------------------------------------ Muon
def _optimizer_vs_adamw(model, reps: int, train_step=None) -> dict[str, Any]:
    """Muon step vs fused AdamW step on ``model``'s params (fixed random grads); with ``train_step``
    also the share of a whole training step (fwd + bwd + optimizer)."""
    from kimivl_model.muon import Muon, build_param_groups

    g = torch.Generator(device="cuda").manual_seed(1)
    grads = [torch.randn(p.shape, device="cuda", generator=g) * 1e-3 for p in model.parameters()]

    def with_grads(opt):
        def step():
            for p, gr in zip(model.parameters(), grads, strict=True):
                p.grad = gr
            opt.step()

        return step

    muon = Muon(build_param_groups(model, lr=1e-5))
    muon_bf16 = Muon(build_param_groups(model, lr=1e-5, ns_dtype="bf16"))  # train.muon_ns_dtype: bf16
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    s = interleaved(
        {"muon": with_grads(muon), "muon_bf16_ns": with_grads(muon_bf16), "adamw_fused": with_grads(adamw)},
        reps=reps,
        warmup=1,
    )
    t_m, t_b, t_a = med(s["muon"]), med(s["muon_bf16_ns"]), med(s["adamw_fused"])
    out: dict[str, Any] = {
        "muon_ms": rnd(1e3 * t_m),
        "muon_bf16_ns_ms": rnd(1e3 * t_b),
        "adamw_fused_ms": rnd(1e3 * t_a),
        "ratio": rnd(t_m / t_a),
        "ratio_bf16_ns": rnd(t_b / t_a),
    }
    if train_step is not None:
        t_fb = med(cuda_time(train_step, reps, warmup=1))
        out["fwd_bwd_ms"] = rnd(1e3 * t_fb)
        out["train_step_ratio"] = rnd((t_fb + t_m) / (t_fb + t_a))
        out["train_step_ratio_bf16_ns"] = rnd((t_fb + t_b) / (t_fb + t_a))
    model.zero_grad(set_to_none=True)
    for opt in (muon, muon_bf16, adamw):
        opt.state.clear()
    return out


def run_muon(quick: bool, reps: int) -> dict[str, Any]:
    from kimivl_model.config import preset
    from kimivl_model.lm import KimiLM

    out: dict[str, Any] = {
        "what": "Muon (NS5 in fp32, TF32 matmuls allowed; *_bf16_ns: NS5 in bf16, train.muon_ns_dtype) vs torch "
        "AdamW(fused) on the model's params; train_step_ratio = (fwd+bwd + Muon) / (fwd+bwd + AdamW) on one "
        "packed batch",
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
    }
    cases = [("small", preset("small").lm, 8192)]
    if not quick:
        cases.append(("a3b_2_layers", a3b_layers_cfg(layers=2), 16384))  # optimizer states fit in 80 GB
    for name, cfg, tokens in cases:
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = KimiLM(cfg).train()
        batch = cuda_batch(mixed_lengths(tokens, 512.0, min(4096, tokens), seed=5), cfg.vocab_size, seed=5)
        out[name] = {
            "tokens_per_batch": tokens,
            **_optimizer_vs_adamw(model, reps, LMStep(model, batch, True)),
        }
        del model, batch
        torch.cuda.empty_cache()
    out["goal"] = f"small ratio <= {GOAL_MUON}"
    out["goal_met"] = bool(out["small"]["ratio"] <= GOAL_MUON)
    return out
