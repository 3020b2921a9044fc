"""Expert parallelism for the routed experts: each rank of an expert-parallel group holds E / ep experts.

Wired into training by ``train.expert_parallel`` (``tasks/train/engine.py``): the engine builds the groups
(``expert_parallel_groups``), swaps every ``RoutedExperts`` for this rank's ``ExpertParallelExperts`` shard
(``shard_experts``) and hands the shards to ``DistributedMuon`` (ownership and gradient reduction within the
expert-data-parallel group); ``gather_full_experts`` / ``expert_slices`` convert between the shards and the
full (E, out, in) tensors that checkpoints and exports hold, so the files do not depend on the EP degree.
``tests/unit/test_moe_ep.py`` checks a sharded KimiLM's forward/backward on 2 gloo ranks against the
unsharded model; ``tests/integration/test_expert_parallel.py`` trains with it.

Groups (world W, expert-parallel degree ep, W % ep == 0): the EP groups are consecutive ranks
``[k*ep, (k+1)*ep)`` (on one node with ep <= GPUs per node the all-to-alls stay on NVLink); rank r holds
experts ``[(r % ep) * E/ep, (r % ep + 1) * E/ep)``; the expert-data-parallel group of r is every rank with
the same ``r % ep`` (they hold the same experts and average their gradients).

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
    """Replace every ``MoE``'s ``RoutedExperts`` in ``model`` (a ``KimiLM`` or a model holding one, e.g.
    ``KimiVL``) by this rank's ``ExpertParallelExperts`` shard (in place; every rank must hold the same full
    weights when called). Returns the number of MoE layers. The rest of the model (attention, router, shared
    experts, ...) stays replicated."""
    from kimivl_model.moe import MoE

    lms = [m for m in model.modules() if isinstance(getattr(m, "cfg", None), LMConfig)]
    if not lms:
        raise TypeError("shard_experts: expected a model with an LMConfig in .cfg (KimiLM) or holding one")
    n = 0
    for lm in lms:
        for m in lm.modules():
            if isinstance(m, MoE) and not isinstance(m.experts, ExpertParallelExperts):
                m.experts = ExpertParallelExperts.from_full(m.experts, lm.cfg, group)
                n += 1
    return n


EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


def expert_parallel_groups(ep: int) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None, list[int]]:
    """Collective (every rank, same order): (this rank's EP group, its expert-data-parallel group, the
    global ranks of that group). ``ep == world``: the EP group is the world (None) and the data-parallel
    group a single rank (None: nothing to reduce). Groups as in the module docstring."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep < 1 or world % ep:
        raise ValueError(f"expert_parallel: {ep} must divide the world size {world}")
    ep_group = dp_group = None
    for k in range(world // ep):  # new_group is collective: every rank creates every group
        ranks = list(range(k * ep, (k + 1) * ep))
        g = dist.new_group(ranks) if ep < world else None
        if rank in ranks:
            ep_group = g
    dp_ranks = [r for r in range(world) if r % ep == rank % ep]
    for j in range(ep):
        ranks = [r for r in range(world) if r % ep == j]
        g = dist.new_group(ranks) if len(ranks) > 1 else None
        if j == rank % ep:
            dp_group = g
    return ep_group, dp_group, dp_ranks


def expert_shards(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    """{state-dict prefix: module} of every expert shard in ``model`` (empty when not sharded)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertParallelExperts)}


def expert_param_names(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    """{state-dict name of an expert-shard weight: its module}, e.g. ``...mlp.experts.gate_proj``."""
    return {f"{prefix}.{w}": m for prefix, m in expert_shards(model).items() for w in EXPERT_WEIGHTS}


def expert_slices(model: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``full`` (a state dict with whole (E, out, in) expert tensors) with each expert-shard entry cut to
    this rank's experts (views, no copy); other entries as they are. Entries already shard-shaped are
    refused: a checkpoint always holds the whole tensors."""
    out = dict(full)
    for name, m in expert_param_names(model).items():
        if name not in full:
            continue
        t = full[name]
        if t.shape[0] != m.num_experts:
            raise ValueError(
                f"{name}: expected all {m.num_experts} experts stacked, got shape {tuple(t.shape)}"
            )
        out[name] = t[m.first : m.first + m.num_local]
    return out


@torch.no_grad()
def gather_full_experts(
    model: nn.Module, tensors: dict[str, torch.Tensor], skip: set[str] = frozenset(), dst: int | None = 0
) -> dict[str, torch.Tensor]:
    """Collective over each shard's EP group: ``tensors`` (shard-shaped expert entries, keyed by state-dict
    name) with every expert-shard entry replaced by the whole (E, out, in) tensor, on CPU, on EP-group rank
    ``dst`` (every rank when None; other ranks get the entry dropped). One tensor in flight at a time. Names
    in ``skip`` are left out of the collective (every rank must pass the same set)."""
    out = dict(tensors)
    for name, m in expert_param_names(model).items():
        if name in skip or name not in tensors:
            continue
        shard = tensors[name]
        device = getattr(m, EXPERT_WEIGHTS[0]).device
        local = shard.detach().to(device).contiguous()
        parts = [torch.empty_like(local) for _ in range(m.ep)]
        dist.all_gather(parts, local, group=m.group)
        if dst is None or m.rank == dst:
            out[name] = torch.cat(parts, dim=0).to("cpu")
        else:
            out.pop(name)
    return out
