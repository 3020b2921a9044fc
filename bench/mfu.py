"""Training MFU of the ``small`` LM on this CPU against the fp32 GEMM peak measured in the same run.

    python -m bench.mfu [--quick] [--threads N]

One training step = forward (packed, per-document causal attention) + CE + aux loss + backward + fused
``torch.optim.AdamW`` step + router-bias update, fp32. Shapes: 4 documents x 512 tokens and 1 x 2048.
FLOPs per token (as ../shared/STACK.md counts them for the reference LM): 6 x N_activated (without the
input embedding, with the output head: ``tasks.train.flops.flops_per_token``) + attention
6 * L * S * H * (d_qk + d_v), with S the token's document length. Peak: best time of an n=1024 fp32
matmul (same threads), measured before and after the training steps and between them (one probe per
interleaved round); the best of all of them is used. MFU = achieved FLOP/s (median step) / peak.
Goal >= 0.65. On a shared VM whose speed drifts during the run the best probe can be a short burst the
steps never see, so the JSON also gives every probe and the MFU against their median (information only;
the goal is judged on the best).
"""

from __future__ import annotations

import time

import torch

from bench.common import bench_main, median, packed_batch, random_docs, rnd, time_interleaved
from kimivl_model.config import preset
from kimivl_model.lm import KimiLM
from tasks.train.flops import flops_per_token

GOAL = 0.65


def gemm_peak(n: int = 1024, reps: int = 10) -> float:
    """Best observed fp32 FLOP/s of an (n x n) @ (n x n) matmul with the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    best = float("inf")
    for _ in range(reps + 2):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def attention_flops_per_token(cfg, doc_lengths: list[int]) -> float:
    """6 * L * S * H * (d_qk + d_v), S averaged over tokens (each token sees its own document)."""
    s_eff = sum(n * n for n in doc_lengths) / sum(doc_lengths)
    return 6.0 * cfg.num_layers * s_eff * cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim)


class Step:
    def __init__(self, model: KimiLM, batch: dict) -> None:
        self.model, self.b = model, batch
        self.opt = torch.optim.AdamW(
            model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True
        )

    def __call__(self) -> None:
        b = self.b
        out = self.model(b["input_ids"], cu_seqlens=b["cu_seqlens"], labels=b["labels"], return_logits=False)
        (out.loss + out.aux_loss).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.model.update_router_bias(out.expert_load)


def run(quick: bool = False, repeats: int = 3) -> dict:
    name = "tiny" if quick else "small"
    vcfg = preset(name)
    cfg = vcfg.lm
    shapes = {"4x512": [512] * 4, "1x2048": [2048]}
    if quick:
        shapes, repeats = {"2x64": [64] * 2}, 1
    peak_before = gemm_peak()
    torch.manual_seed(0)
    base = KimiLM(cfg, attn_backend="sdpa").train()
    fpt_params = flops_per_token(vcfg, "lm")
    steps, fpts = {}, {}
    for i, (label, lens) in enumerate(shapes.items()):
        model = KimiLM(cfg, attn_backend="sdpa").train()
        model.load_state_dict(base.state_dict())
        steps[label] = Step(model, packed_batch(random_docs(lens, cfg.vocab_size, seed=i)))
        fpts[label] = fpt_params + attention_flops_per_token(cfg, lens)
    probes: list[float] = []  # the GEMM peak measured between the steps, in the same interleaved rounds
    samples = time_interleaved({**steps, "peak_probe": lambda: probes.append(gemm_peak())}, repeats, warmup=1)
    peak_after = gemm_peak()
    probes = probes[1:]  # the warm-up round's probe is not a sample
    peak = max(peak_before, peak_after, *probes)
    rows = {}
    for label, lens in shapes.items():
        t = median(samples[label])
        tokens = sum(lens)
        achieved = tokens * fpts[label] / t
        rows[label] = {
            "tokens_per_step": tokens,
            "step_s": rnd(t),
            "tokens_per_s": rnd(tokens / t),
            "gflop_per_token": rnd(fpts[label] / 1e9),
            "achieved_gflop_per_s": rnd(achieved / 1e9),
            "mfu": rnd(achieved / peak, 3),
            "samples_s": [rnd(x) for x in samples[label]],
        }
    main_label = next(iter(shapes))
    mfu = rows[main_label]["mfu"]
    return {
        "what": "training MFU (fwd+bwd+fused AdamW step, fp32) of the LM vs the fp32 GEMM peak measured in "
        "this run",
        "preset": name,
        "flops_per_token_counts": "6*N_activated (excl. input embedding, incl. head) + 6*L*S*H*(d_qk+d_v)",
        "activated_params_for_flops": rnd(fpt_params / 6, 6),
        "peak_gemm_gflop_per_s": rnd(peak / 1e9),
        "peak_gemm_gflop_per_s_before_after": [rnd(peak_before / 1e9), rnd(peak_after / 1e9)],
        "peak_gemm_gflop_per_s_interleaved": [rnd(p / 1e9) for p in probes],
        "mfu_vs_median_interleaved_peak": {
            label: rnd(row["achieved_gflop_per_s"] * 1e9 / median(probes), 3) for label, row in rows.items()
        },
        "repeats": repeats,
        "cpu_share": samples.cpu_share,
        "ours": rows,
        "baseline": {
            "name": "fp32 GEMM n=1024, same threads",
            "gflop_per_s": rnd(peak / 1e9),
        },
        "ratio": mfu,
        "ratio_is": f"MFU of the {main_label} step",
        "goal": f">= {GOAL}",
        "goal_met": bool(mfu >= GOAL),
    }


def main(argv: list[str] | None = None) -> dict:
    return bench_main("mfu", __doc__, run, argv)


if __name__ == "__main__":
    main()
