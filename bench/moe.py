"""The MoE layer (expert-grouped dispatch) vs a per-expert Python-loop reference and a dense SwiGLU MLP.

    python -m bench.moe [--quick] [--threads N]

Ours: ``kimivl_model.moe.MoE`` in training mode (router + sequence aux loss + expert-grouped dispatch:
one argsort of the T*k assignments, one gather, each expert on a contiguous slice, then each token's
k expert outputs gathered back and summed with their weights, in one ``embedding_bag`` on CPU; + the shared
expert). Forward + backward of a fixed random projection of the output.

(a) Loop reference, written here the way reference MoE code usually is (DeepSeek-V3's inference
    ``model.py``, HF Mixtral/DeepSeek eager experts): for every expert, ``torch.where(topk_idx == e)``,
    gather its tokens ``x[tok]``, run the expert with its slice of the stacked weights ``W[e]``, and
    ``index_add`` the weighted output. Same router, same weights: outputs and gradients are checked to
    agree before timing. Goal: ours >= 3x faster.
(b) Dense SwiGLU MLP with the same activated parameter count per token (width (k + shared) * moe_inter;
    the router's E*hidden parameters are left out of the dense model). Goal: time ours / time dense <= 1.5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import bench_main, median, rnd, time_interleaved
from kimivl_model.config import preset
from kimivl_model.moe import MoE, SwiGLU

GOAL_LOOP = 3.0
GOAL_DENSE = 1.5


def loop_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per-expert Python loop over the SAME router and stacked weights (the textbook reference)."""
    topk_idx, topk_weight, _ = moe.gate(x)
    ex = moe.experts
    out = torch.zeros_like(x)
    for e in range(ex.num_experts):
        tok, slot = torch.where(topk_idx == e)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        y = F.linear(F.silu(F.linear(xe, ex.gate_proj[e])) * F.linear(xe, ex.up_proj[e]), ex.down_proj[e])
        out.index_add_(0, tok, (y * topk_weight[tok, slot, None].to(y.dtype)).to(out.dtype))
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(x)
    return out


def moe_shape(cfg, tokens: int, dense_width: int) -> dict[str, int]:
    """The benchmarked MoE shape (shared with bench.gpu's MoE section)."""
    return {
        "tokens": tokens,
        "hidden": cfg.hidden_size,
        "experts": cfg.num_routed_experts,
        "top_k": cfg.num_experts_per_tok,
        "shared": cfg.num_shared_experts,
        "moe_intermediate": cfg.moe_intermediate_size,
        "dense_intermediate": dense_width,
    }


def _grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad.clone() for p in params]


def check_agree(moe: MoE, x: torch.Tensor, proj: torch.Tensor) -> float:
    """Ours vs the loop reference: outputs, d x and every weight gradient; raises unless allclose."""
    params = [p for p in moe.parameters() if p.requires_grad]
    res = []
    for fn in (lambda: moe(x, _one_doc(x))[0], lambda: loop_reference(moe, x)):
        moe.zero_grad(set_to_none=True)
        x.grad = None
        y = fn()
        (y * proj).sum().backward()
        res.append([y.detach(), x.grad.clone(), *_grads(params)])
    worst = 0.0
    for a, b in zip(*res, strict=True):
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
            raise AssertionError(f"MoE loop reference disagrees with ours: max |diff| {(a - b).abs().max()}")
        worst = max(worst, float((a - b).abs().max()))
    return worst


def _one_doc(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor([0, x.shape[0]])


def run(quick: bool = False, tokens: int = 4096, repeats: int = 5) -> dict:
    cfg = preset("tiny" if quick else "small").lm
    if quick:
        tokens, repeats = 256, 1
    torch.manual_seed(0)
    moe = MoE(cfg).train()
    activated_width = (cfg.num_experts_per_tok + cfg.num_shared_experts) * cfg.moe_intermediate_size
    dense = SwiGLU(cfg.hidden_size, activated_width)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=cfg.initializer_range)
    x = torch.randn(tokens, cfg.hidden_size).requires_grad_()
    proj = torch.randn(tokens, cfg.hidden_size)
    cu = _one_doc(x)
    max_diff = check_agree(moe, x, proj)

    def ours():
        moe.zero_grad(set_to_none=True)
        y, aux, _ = moe(x, cu)
        ((y * proj).sum() + aux).backward()

    def loop():
        moe.zero_grad(set_to_none=True)
        (loop_reference(moe, x) * proj).sum().backward()

    def dense_mlp():
        dense.zero_grad(set_to_none=True)
        (dense(x) * proj).sum().backward()

    s = time_interleaved({"ours": ours, "loop": loop, "dense": dense_mlp}, repeats=repeats, warmup=1)
    t_ours, t_loop, t_dense = median(s["ours"]), median(s["loop"]), median(s["dense"])
    speedup, vs_dense = t_loop / t_ours, t_ours / t_dense
    moe_activated = cfg.num_routed_experts * cfg.hidden_size + 3 * cfg.hidden_size * activated_width
    return {
        "what": "MoE layer forward+backward: ours (expert-grouped dispatch) vs (a) per-expert Python-loop "
        "reference, (b) dense SwiGLU with the same activated parameters",
        "preset": "tiny" if quick else "small",
        "shape": moe_shape(cfg, tokens, activated_width),
        "activated_params_per_token": {"moe": moe_activated, "dense": 3 * cfg.hidden_size * activated_width},
        "loop_reference_agrees": True,
        "max_abs_diff_vs_loop": rnd(max_diff, 3),
        "repeats": repeats,
        "cpu_share": s.cpu_share,
        "ours": {"ms": rnd(1e3 * t_ours), "tokens_per_s": rnd(tokens / t_ours)},
        "baseline": {
            "loop_reference": {"ms": rnd(1e3 * t_loop), "tokens_per_s": rnd(tokens / t_loop)},
            "dense_swiglu": {"ms": rnd(1e3 * t_dense), "tokens_per_s": rnd(tokens / t_dense)},
        },
        "ratio": rnd(speedup),
        "ratio_is": "loop reference time / ours (speed-up)",
        "ratio_vs_dense": rnd(vs_dense),
        "ratio_vs_dense_is": "ours time / dense time",
        "goal": f"ratio >= {GOAL_LOOP} and ratio_vs_dense <= {GOAL_DENSE}",
        "goal_met": bool(speedup >= GOAL_LOOP and vs_dense <= GOAL_DENSE),
        "goals": {
            "vs_loop": {"goal": f">= {GOAL_LOOP}", "met": bool(speedup >= GOAL_LOOP)},
            "vs_dense": {"goal": f"<= {GOAL_DENSE}", "met": bool(vs_dense <= GOAL_DENSE)},
        },
        "samples_ms": {k: [rnd(1e3 * t) for t in v] for k, v in s.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    return bench_main("moe", __doc__, run, argv)


if __name__ == "__main__":
    main()
