"""DeepSeek-V3-style MoE feed-forward (DeepSeek-V3 Sec. 2.1.2) with auxiliary-loss-free load balancing.

- FFN experts are SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x)). Dense layers and the shared
  experts (all ``num_shared_experts`` fused into one SwiGLU of width num_shared * moe_intermediate) use
  the same block.
- Router (DeepSeek-V3 eq. 12-16): s_i = sigmoid(u^T e_i) in fp32; the top-k experts are chosen on
  s_i + b_i where b is a per-expert correction bias (a buffer, not trained by gradient); the gating weights
  are the RAW scores of the chosen experts, renormalised to sum 1 (``norm_topk_prob``) and multiplied by
  ``routed_scaling_factor``. h = x + sum_shared FFN(x) + sum_{i in topk} g_i FFN_i(x).
- Aux-loss-free balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for
  Mixture-of-Experts"; DeepSeek-V3 Sec. 2.1.2): after each step b_i += u * (sign(e_i) - mean_j sign(e_j))
  with load error e_i = mean(load) - load_i, so under-loaded experts become more attractive
  (``aux_free_bias_update``; the step itself is applied by ``KimiLM.update_router_bias``).
- Complementary sequence-wise balance loss (DeepSeek-V3 eq. 17-20), with "sequence" = one packed
  document: f_i = E / (k T_s) * #{t : i in topk(t)}, P_i = mean_t s'_{i,t} with s' = s / sum_j s_j,
  L = alpha * mean_docs sum_i f_i P_i.

Routed experts are dispatched by grouping tokens by expert: one argsort of the T*k assignments, one
gather of the tokens into expert order, each expert on a contiguous slice, then each token's k expert
outputs are gathered back and summed with their gating weights. Every gather is a permutation gather whose
backward is the inverse gather, never a scatter-add: no atomics, deterministic on CUDA. On CUDA in bf16
(bf16 weights, or fp32 weights under bf16 autocast: the expert weights are then cast once per layer call)
``torch._grouped_mm`` runs all experts in one call per projection; elsewhere the experts run one after
another on their slices (``_SwiGLULoop``: one autograd node that writes every expert's outputs and weight
gradients in place, bit-identical to the per-expert autograd graph it replaces).

Two kernels for the same combine, chosen by device (``COMBINE_IMPLS``; both run on CPU, and
``tests/unit/test_moe.py`` checks them against each other and against a per-token reference):
- ``gather`` (CUDA): permute the (T*k, hidden) outputs back to (token, slot) order (``PermuteRows``), then
  a weighted sum over the k slots. Verified on the H100 path (``tests/unit/test_gpu_path.py``).
- ``bag`` (CPU): ``F.embedding_bag(inv, ys, mode="sum", per_sample_weights=w)``, the gather, the weighting
  and the sum in one pass, and its backward likewise (measured 5.1 vs 27.5 ms forward + backward for
  2048 tokens x 4 slots x 512 on one core); the dispatch's backward (gather + sum over the k slots) uses
  it too. The sums are the same; only the floating-point summation order differs (rounding-level).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimivl_model.config import LMConfig
from kimivl_model.sequence_parallel import SequenceShard, reduce_sum

EXPERT_IMPLS = ("auto", "loop", "grouped")
COMBINE_IMPLS = ("auto", "gather", "bag")


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (T, hidden) -> (T, hidden)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid top-k router with the aux-loss-free correction bias (DeepSeek-V3 eq. 13-16)."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.num_routed_experts, cfg.hidden_size))
        # updated outside the gradient (aux_free_bias_update); saved with the checkpoint
        self.register_buffer(
            "e_score_correction_bias",
            torch.zeros(cfg.num_routed_experts, dtype=torch.float32),
            persistent=True,
        )
        nn.init.normal_(self.weight, std=cfg.initializer_range)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, hidden) -> topk_idx (T, k) long, topk_weight (T, k) fp32, scores (T, E) fp32."""
        with torch.autocast(x.device.type, enabled=False):  # fp32 even under bf16 autocast (GPU training)
            scores = torch.sigmoid(x.float() @ self.weight.float().t())  # (T, E)
        biased = scores.detach() + self.e_score_correction_bias.float()[None, :]  # selection only
        topk_idx = torch.topk(biased, self.top_k, dim=-1, sorted=True).indices  # (T, k)
        topk_weight = scores.gather(1, topk_idx)  # (T, k) raw scores, no bias
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_idx, topk_weight * self.routed_scaling_factor, scores


class _SwiGLULoop(torch.autograd.Function):
    """xs (N, hidden) sorted by expert, counts[e] rows each -> (N, hidden): expert e's SwiGLU on its slice.

    The same matmuls and elementwise ops, in the same order, as running ``F.linear``/``F.silu`` per expert
    under autograd (the test checks bit equality), but as one node: outputs, activations, input gradients
    and the (E, out, in) weight gradients are written in place into preallocated tensors, instead of
    autograd's per-expert graph whose backward concatenates the input-gradient slices and stacks the
    per-expert weight gradients (two extra full copies, ~2.5% of a small-preset training step on CPU).
    Saved for backward, as autograd would: gate and up pre-activations, silu(gate), and their product.
    """

    @staticmethod
    def forward(ctx, xs, counts: list[int], gate, up, down):
        n, inter = xs.shape[0], gate.shape[1]
        ys = xs.new_empty(n, down.shape[1])
        g, u, s, hid = (xs.new_empty(n, inter) for _ in range(4))
        a = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            b = a + c
            torch.mm(xs[a:b], gate[e].t(), out=g[a:b])
            torch.mm(xs[a:b], up[e].t(), out=u[a:b])
            torch.ops.aten.silu.out(g[a:b], out=s[a:b])
            torch.mul(s[a:b], u[a:b], out=hid[a:b])
            torch.mm(hid[a:b], down[e].t(), out=ys[a:b])
            a = b
        ctx.save_for_backward(xs, gate, up, down, g, u, s, hid)
        ctx.counts = counts
        return ys

    @staticmethod
    def backward(ctx, dy):
        xs, gate, up, down, g, u, s, hid = ctx.saved_tensors
        need_x, _, need_g, need_u, need_d = ctx.needs_input_grad
        dx = torch.empty_like(xs) if need_x else None
        dgate, dup, ddown = (
            torch.empty_like(w) if need else None
            for w, need in ((gate, need_g), (up, need_u), (down, need_d))
        )
        a = 0
        for e, c in enumerate(ctx.counts):
            if c == 0:  # an expert without tokens gets a zero gradient
                for dw in (dgate, dup, ddown):
                    if dw is not None:
                        dw[e].zero_()
                continue
            b = a + c
            xe, dye = xs[a:b], dy[a:b]
            if ddown is not None:
                torch.mm(dye.t(), hid[a:b], out=ddown[e])
            dh = torch.mm(dye, down[e])  # (n_e, inter)
            du = dh * s[a:b]
            dg = torch.ops.aten.silu_backward(dh * u[a:b], g[a:b])
            if dup is not None:
                torch.mm(du.t(), xe, out=dup[e])
            if dgate is not None:
                torch.mm(dg.t(), xe, out=dgate[e])
            if dx is not None:
                torch.mm(dg, gate[e], out=dx[a:b])
                dx[a:b].add_(torch.mm(du, up[e]))
            a = b
        return dx, None, dgate, dup, ddown


def swiglu_loop(
    xs: torch.Tensor, counts: list[int], gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """xs (N, hidden) sorted by expert, counts[e] rows each -> (N, hidden); one matmul set per expert."""
    return _SwiGLULoop.apply(xs, counts, gate, up, down)


def swiglu_grouped(
    xs: torch.Tensor, counts: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """Same as ``swiglu_loop`` with one ``torch._grouped_mm`` per projection (offs = cumulative ends)."""
    offs = torch.cumsum(counts, dim=0).to(torch.int32)  # (E,)
    g = torch._grouped_mm(xs, gate.transpose(-2, -1), offs=offs)  # (N, inter)
    u = torch._grouped_mm(xs, up.transpose(-2, -1), offs=offs)  # (N, inter)
    return torch._grouped_mm(F.silu(g) * u, down.transpose(-2, -1), offs=offs)  # (N, hidden)


class PermuteRows(torch.autograd.Function):
    """y = x[perm] for a permutation ``perm`` of x's rows; backward = grad[inv] (a gather, not index_add)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inv)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inv,) = ctx.saved_tensors
        return grad.index_select(0, inv), None, None


class DispatchRows(torch.autograd.Function):
    """xs = x[order // k]: each token copied to its k expert slots in expert order.

    Backward: the slots' gradients are gathered back into (token, slot) order with the inverse
    permutation and summed over the k slots (instead of index_add with k-fold collisions); with
    ``combine="bag"`` in one ``embedding_bag`` pass.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, order: torch.Tensor, inv: torch.Tensor, k: int, combine: str = "gather"
    ) -> torch.Tensor:
        ctx.save_for_backward(inv)
        ctx.k, ctx.combine = k, combine
        return x.index_select(0, torch.div(order, k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inv,) = ctx.saved_tensors
        if ctx.combine == "bag":
            return F.embedding_bag(inv.view(-1, ctx.k), grad, mode="sum"), None, None, None, None
        g = grad.index_select(0, inv)  # (T*k, hidden) in (token, slot) order
        return g.view(-1, ctx.k, g.shape[-1]).sum(dim=1), None, None, None, None


def _combine_impl(impl: str, x: torch.Tensor) -> str:
    """``auto``: ``bag`` on CPU, ``gather`` elsewhere (module docstring)."""
    if impl != "auto":
        return impl
    return "bag" if x.device.type == "cpu" else "gather"


def expert_counts(flat: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert (E,) int64. ``torch.bincount`` would wait for the GPU to size its output
    (a host sync per MoE layer); a scatter-add into E slots does not (exact: integer adds)."""
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The lower-precision dtype when CUDA autocast is on for x's device, else None."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return None


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as 3D weights (E, out, in) (nn.Linear layout per expert)."""

    def __init__(self, cfg: LMConfig, impl: str = "auto", combine: str = "auto") -> None:
        super().__init__()
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"RoutedExperts.impl: unknown {impl!r} (expected one of {EXPERT_IMPLS})")
        if combine not in COMBINE_IMPLS:
            raise ValueError(f"RoutedExperts.combine: unknown {combine!r} (expected one of {COMBINE_IMPLS})")
        self.impl, self.combine = impl, combine
        e, h, i = cfg.num_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts = e
        self.gate_proj = nn.Parameter(torch.empty(e, i, h))
        self.up_proj = nn.Parameter(torch.empty(e, i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        for p in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(p, std=cfg.initializer_range)

    def _use_grouped(self, x: torch.Tensor, compute_dtype: torch.dtype) -> bool:
        if self.impl != "auto":
            return self.impl == "grouped"
        return (
            hasattr(torch, "_grouped_mm")
            and x.is_cuda
            and compute_dtype == torch.bfloat16
            and x.shape[-1] % 8 == 0
            and self.gate_proj.shape[1] % 8 == 0
        )

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """x (T, hidden), topk_idx (T, k), topk_weight (T, k) -> sum_j w_tj FFN_{idx_tj}(x_t): (T, hidden)."""
        t, k = topk_idx.shape
        flat = topk_idx.reshape(-1)  # (T*k,) expert of each assignment, (token, slot) order
        order = torch.argsort(flat, stable=True)  # (T*k,) assignments grouped by expert
        inv = torch.argsort(order)  # (T*k,) inverse permutation: sorted position of each (token, slot)
        counts = expert_counts(flat, self.num_experts)  # (E,)
        weights = (self.gate_proj, self.up_proj, self.down_proj)
        low = autocast_dtype(x)
        compute = low if low is not None else self.gate_proj.dtype
        if low is not None:  # one cast of each 3D weight per call (autocast would cast every expert's slice)
            weights = tuple(p.to(low) for p in weights)
        combine = _combine_impl(self.combine, x)
        xs = DispatchRows.apply(x.to(compute), order, inv, k, combine)  # (T*k, hidden), contiguous per expert
        if self._use_grouped(x, compute):
            ys = swiglu_grouped(xs, counts, *weights)
        else:
            ys = swiglu_loop(xs, counts.tolist(), *weights)
        # weighted sum over the k slots in the residual dtype (fp32 under autocast over fp32 weights)
        w = topk_weight.to(x.dtype)
        if combine == "bag":  # row inv[t*k+j] of ys is token t's slot j
            return F.embedding_bag(inv.view(t, k), ys.to(x.dtype), mode="sum", per_sample_weights=w)
        ys = PermuteRows.apply(ys, inv, order).view(t, k, -1)  # (T, k, hidden) back in (token, slot) order
        return (ys.to(x.dtype) * w[..., None]).sum(dim=1)  # (T, hidden)


def sequence_aux_loss(
    scores: torch.Tensor,
    topk_idx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    shard: SequenceShard | None = None,
) -> torch.Tensor:
    """Unweighted sequence-wise balance loss (DeepSeek-V3 eq. 17-20), one "sequence" per packed document.

    scores (T, E) sigmoid affinities, topk_idx (T, k), cu_seqlens (S+1,) -> scalar fp32 mean over the
    non-empty documents of sum_i f_i P_i. Vectorised with segment sums (index_add), no loop over tokens.
    Sequence parallel (``shard``): the rows are this rank's slice of the packed sequence and ``cu_seqlens``
    the whole sequence's; the per-document sums are all-reduced over the SP group (the affinity sums with
    their gradient), so every rank returns the loss of the whole sequence.
    """
    t, e = scores.shape
    k = topk_idx.shape[1]
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(scores.device)  # (S,)
    s = lens.numel()
    if shard is None:
        doc = torch.repeat_interleave(torch.arange(s, device=scores.device), lens, output_size=t)  # (T,)
    else:  # the documents of this rank's tokens only
        pos = torch.arange(shard.start, shard.end, device=scores.device)
        doc = torch.searchsorted(cu_seqlens[1:].to(scores.device), pos, right=True)  # (T_local,)
    chosen = torch.zeros(t, e, device=scores.device, dtype=torch.float32).scatter_(1, topk_idx, 1.0)  # (T, E)
    counts = torch.zeros(s, e, device=scores.device).index_add_(0, doc, chosen)  # (S, E)
    probs = scores.float() / scores.float().sum(dim=-1, keepdim=True)  # (T, E) normalised s'
    p_sum = torch.zeros(s, e, device=scores.device).index_add(0, doc, probs)  # (S, E)
    if shard is not None and shard.size > 1:
        counts, p_sum = reduce_sum(counts, shard), reduce_sum(p_sum, shard)
    n = lens.clamp(min=1).to(torch.float32)[:, None]  # (S, 1)
    f = counts * (e / (k * n))  # (S, E)
    per_doc = (f * (p_sum / n)).sum(dim=-1)  # (S,)
    valid = (lens > 0).to(torch.float32)
    return (per_doc * valid).sum() / valid.sum().clamp(min=1.0)


def aux_free_bias_update(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """One aux-loss-free bias step (Wang et al. 2024, Alg. 1): returns the new bias (E,) fp32.

    error_i = mean(load) - load_i; b_i <- b_i + rate * (sign(error_i) - mean_j sign(error_j)).
    Under-loaded experts (positive error) get a larger bias. Centering keeps sum(b) constant.
    ``load`` should be the global (all-reduced over data-parallel ranks) token count per expert.
    """
    if bias.shape != load.shape or bias.dim() != 1:
        raise ValueError(
            f"aux_free_bias_update: bias and load must both be (E,), got {tuple(bias.shape)}, {tuple(load.shape)}"
        )
    load = load.to(torch.float32)
    sign = torch.sign(load.mean() - load)  # (E,)
    return (bias.to(torch.float32) + rate * (sign - sign.mean())).to(bias.dtype)


class MoE(nn.Module):
    """Routed + shared experts. forward(x (T, hidden), cu_seqlens) -> (out, aux_loss, load)."""

    def __init__(self, cfg: LMConfig, expert_impl: str = "auto") -> None:
        super().__init__()
        self.num_experts = cfg.num_routed_experts
        self.aux_loss_alpha = cfg.aux_loss_alpha
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg, impl=expert_impl)
        self.shared_experts: SwiGLU | None = None
        if cfg.num_shared_experts > 0:
            self.shared_experts = SwiGLU(cfg.hidden_size, cfg.num_shared_experts * cfg.moe_intermediate_size)

    def forward(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor, shard: SequenceShard | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, hidden) -> out (T, hidden), aux_loss () fp32 (already times alpha), load (E,) fp32 detached.
        With ``shard`` (sequence parallel) x is this rank's slice; the load counts its tokens only."""
        topk_idx, topk_weight, scores = self.gate(x)  # (T, k), (T, k), (T, E)
        out = self.experts(x, topk_idx, topk_weight)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        load = expert_counts(topk_idx.reshape(-1), self.num_experts).to(torch.float32)  # (E,)
        if self.training and self.aux_loss_alpha > 0:
            aux = self.aux_loss_alpha * sequence_aux_loss(scores, topk_idx, cu_seqlens, shard)
        else:
            aux = torch.zeros((), device=x.device, dtype=torch.float32)
        return out, aux, load.detach()
