"""Expert parallelism for the routed experts: each rank of an expert-parallel group holds E / ep experts.

BUILDING BLOCK, NOT WIRED INTO TRAINING YET: ``KimiLM`` builds ``RoutedExperts`` (every expert on every
rank); ``shard_experts(model)`` swaps them for this rank's shard, and a sharded KimiLM's forward/backward
is checked on 2 gloo ranks against the unsharded model (``tests/unit/test_moe_ep.py``: losses, every
replicated parameter's gradient, every expert's gradient summed over the ranks' tokens). But
``TrainEngine`` / ``DistributedMuon`` / the checkpoint format / the memory plan know nothing of expert
shards: wiring needs (1) expert params excluded from DeepSpeed's data-parallel all-reduce (reduced only
over ranks holding the same experts) and global-norm clipping over the shards, (2) DistributedMuon owning
expert shards locally (no broadcast), (3) checkpoints/exports gathering the shards into the public
per-expert names, (4) the memory plan, (5) a recipe/launch setting for the expert-parallel size.

Forward of ``ExpertParallelExperts`` (same contract as ``RoutedExperts.forward``):
1. assignments (token, slot) sorted by global expert id; the expert id gives the destination rank
   (``id // E_local``), so the sorted rows are already grouped by destination;
2. per-destination row counts are exchanged (one small ``all_to_all_single`` and one host sync: the split
   sizes must be known on the host), then the rows and their local expert ids;
3. each rank regroups what it received by local expert, runs the SwiGLU experts (the same per-expert loop /
   grouped GEMM as ``RoutedExperts``), and sends the results back along the reverse splits;
4. the weighted sum over the k slots, as in ``RoutedExperts`` (gather path).
The row exchanges use ``torch.distributed.nn.functional.all_to_all_single``, whose backward is the reverse
exchange, so gradients flow back to the sending ranks; expert weight gradients are complete on the rank
that holds the expert (sums over every rank's tokens), with no further reduction inside the EP group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_to_all_single as all_to_all_autograd

from kimivl_model.config import LMConfig
from kimivl_model.moe import (
    EXPERT_IMPLS,
    DispatchRows,
    PermuteRows,
    RoutedExperts,
    autocast_dtype,
    expert_counts,
    swiglu_grouped,
    swiglu_loop,
)


class ExpertParallelExperts(nn.Module):
    """Experts ``[rank * E_local, (rank + 1) * E_local)`` of ``cfg``'s E routed experts on this rank of
    ``group`` (default: the world). Weights (E_local, out, in), the layout of ``RoutedExperts``."""

    def __init__(self, cfg: LMConfig, group: dist.ProcessGroup | None = None, impl: str = "auto") -> None:
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("ExpertParallelExperts: torch.distributed is not initialised")
        self.group = group
        self.ep = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        e, h, i = cfg.num_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        if e % self.ep:
            raise ValueError(
                f"num_routed_experts: {e} experts cannot be split evenly over an expert-parallel group of {self.ep}"
            )
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"ExpertParallelExperts.impl: unknown {impl!r} (expected one of {EXPERT_IMPLS})")
        self.impl = impl
        self.num_experts = e
        self.num_local = e // self.ep
        self.first = self.rank * self.num_local
        self.gate_proj = nn.Parameter(torch.empty(self.num_local, i, h))
        self.up_proj = nn.Parameter(torch.empty(self.num_local, i, h))
        self.down_proj = nn.Parameter(torch.empty(self.num_local, h, i))
        for p in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(p, std=cfg.initializer_range)

    _use_grouped = RoutedExperts._use_grouped  # the same kernel choice as the unsharded layer

    @torch.no_grad()
    def load_from_full(self, full: nn.Module) -> None:
        """Copy this rank's slice of a ``RoutedExperts`` holding all E experts."""
        sl = slice(self.first, self.first + self.num_local)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(self, name).copy_(getattr(full, name)[sl])

    @classmethod
    def from_full(
        cls, full: nn.Module, cfg: LMConfig, group: dist.ProcessGroup | None = None
    ) -> ExpertParallelExperts:
        """This rank's shard of ``full`` (a ``RoutedExperts``): same device, dtype and requires_grad, no
        random init of the shard (built on the meta device, then the slices are copied)."""
        with torch.device("meta"):
            ep = cls(cfg, group, impl=full.impl)
        sl = slice(ep.first, ep.first + ep.num_local)
        for name in ("gate_proj", "up_proj", "down_proj"):
            src = getattr(full, name)
            setattr(ep, name, nn.Parameter(src.detach()[sl].clone(), requires_grad=src.requires_grad))
        return ep

    def _exchange(
        self, t: torch.Tensor, out_splits: list[int], in_splits: list[int], grad: bool
    ) -> torch.Tensor:
        out = t.new_empty((sum(out_splits), *t.shape[1:]))
        if grad:
            return all_to_all_autograd(
                out, t.contiguous(), out_splits, in_splits, group=self.group or dist.group.WORLD
            )
        dist.all_to_all_single(out, t.contiguous(), out_splits, in_splits, group=self.group)
        return out

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """x (T, hidden), topk_idx (T, k) global expert ids, topk_weight (T, k) -> (T, hidden)."""
        t, k = topk_idx.shape
        flat = topk_idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        inv = torch.argsort(order)
        sorted_ids = flat[order]
        dest = torch.div(sorted_ids, self.num_local, rounding_mode="floor")  # non-decreasing
        send_counts = expert_counts(dest, self.ep)  # (ep,)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()  # host sync: split sizes

        low = autocast_dtype(x)
        weights = (self.gate_proj, self.up_proj, self.down_proj)
        compute = low if low is not None else self.gate_proj.dtype
        if low is not None:
            weights = tuple(p.to(low) for p in weights)
        xs = DispatchRows.apply(x.to(compute), order, inv, k, "gather")  # (T*k, hidden) by expert
        local_ids = self._exchange(sorted_ids - dest * self.num_local, recv, send, grad=False)
        xr = self._exchange(xs, recv, send, grad=True)  # (R, hidden), blocks by source rank
        perm = torch.argsort(local_ids, stable=True)  # regroup the received rows by local expert
        perm_inv = torch.argsort(perm)
        counts = expert_counts(local_ids, self.num_local)
        xe = PermuteRows.apply(xr, perm, perm_inv)
        if self._use_grouped(x, compute):
            ye = swiglu_grouped(xe, counts, *weights)
        else:
            ye = swiglu_loop(xe, counts.tolist(), *weights)
        yr = PermuteRows.apply(ye, perm_inv, perm)  # back to the received order
        ys = self._exchange(yr, send, recv, grad=True)  # (T*k, hidden) in sorted order again
        ys = PermuteRows.apply(ys, inv, order).view(t, k, -1)  # (token, slot) order
        return (ys.to(x.dtype) * topk_weight.to(x.dtype)[..., None]).sum(dim=1)


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Replace every ``MoE``'s ``RoutedExperts`` in ``model`` by this rank's ``ExpertParallelExperts`` shard
    (in place; every rank must hold the same full weights when called). Returns the number of MoE layers.
    The rest of the model (attention, router, shared experts, ...) stays replicated."""
    from kimivl_model.moe import MoE

    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, LMConfig):
        raise TypeError("shard_experts: expected a model with an LMConfig in .cfg (KimiLM)")
    n = 0
    for m in model.modules():
        if isinstance(m, MoE):
            m.experts = ExpertParallelExperts.from_full(m.experts, cfg, group)
            n += 1
    return n
