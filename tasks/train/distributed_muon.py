"""ZeRO-1-style distributed Muon with whole-matrix ownership.

Moonlight (Liu et al. 2025, "Muon is Scalable for LLM Training", Sec. 2.3) keeps optimizer state
sharded like ZeRO-1 but needs the FULL matrix for Newton-Schulz. Here each parameter tensor is owned
whole by one rank (greedy balance by element count), so no gather of matrix slices is needed:

1. grads are reduced (SUM / world) to their owner, one flattened bucket per (owner, dtype) -> O(world)
   collectives; skipped with ``grads_are_averaged=True`` (DDP / DeepSpeed ZeRO 0 already all-reduced);
2. the owner applies ``kimivl_model.muon.apply_param_update_`` (the single-process math, unchanged);
   optimizer state (momentum / Adam moments) exists only on the owner;
3. updated params are broadcast from their owners, one bucket per (owner, dtype).

A param counts as active in a step if ANY rank has a grad for it (one small all-reduce of flags); a rank
without a grad contributes zeros to the sum, as DDP does. Inactive params are skipped everywhere.
Gradient clipping must happen before ``step`` on already-averaged grads (``grads_are_averaged=True``).

Master weights (``hold_in_low_precision``, the engine's ``working_weights: bf16``): chosen params are held
in bf16 on every rank while the owner keeps an fp32 master in its optimizer state (``state[p]["master"]``).
The owner applies the update to the master in fp32 (grad upcast) and writes the rounded master back into
the param, which is then broadcast in bf16 as usual. So per rank the weights and gradients of those params
cost 2 + 2 bytes and the master 4 bytes / world (with the momentum), instead of 4 + 4 bytes. Masters are
part of ``state_dict`` (kept fp32 on load) and ``master_weights`` gathers them for full-precision exports.

Sharded gradients (``shard_gradients``, the engine's ``train.shard_gradients``; ZeRO-2 style for whole
matrices): while each micro-batch's backward runs, a parameter's gradient is reduced (SUM) to its owner as
soon as its bucket is complete (``register_post_accumulate_grad_hook``) and freed on every rank; the owner
adds it, divided by the world size, into an fp32 main gradient it keeps for the step. So a rank holds the
fp32 gradients of the matrices it owns (1/world of them) plus the gradients of the buckets still waiting,
instead of every gradient. Buckets (same owner and dtype, consecutive in backward order, at most
``bucket_bytes``) are reduced in one fixed order on every rank; a bucket waits for all its params, and
``finish_backward`` (after each micro-batch's backward) reduces whatever is left, with zeros for the params
this rank's micro-batch never touched (a text-only micro-batch on one rank, an image one on another: no
deadlock, and a missing gradient counts as zero, as in DDP). ``grad_norm`` (one all-reduce of the owners'
squared norms) and ``scale_grads`` give the global-norm clipping over the shards. Communication: one
reduce per bucket per micro-batch (ZeRO 0's all-reduce moves the same bytes once per step: the price of
the memory).

Expert parallelism (``set_expert_params``, the engine's ``train.expert_parallel``): each rank holds only its
EP shard of the routed experts, so an expert param at the same position means different experts on different
EP ranks. Those params are owned within the rank's expert-data-parallel group (the ranks holding the same
experts) and every collective on them (gradient reduce, parameter broadcast, master broadcast) runs on that
group, nothing when it is a single rank; their gradients are still divided by the world size (each shard's
gradient already sums the tokens of its whole EP group, so the sum over the expert-data-parallel group over
W is the same average over all tokens as the other params get). The global gradient norm needs no change:
each expert slice is owned by exactly one rank. Sharded gradients are required (DeepSpeed's all-reduce would
average the different shards together). ``load_resharded`` reassembles expert state from the old EP shards
and cuts it for the new degree, so a run can resume on another world size or expert-parallel degree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from kimivl_model.muon import DEFAULTS, apply_param_update_, validate_param_group

GRAD_BUCKET_BYTES = 25 * 2**20  # sharded gradients: the most bytes reduced in one collective


def assign_owners(
    numels: list[list[int]],
    world_size: int,
    expert: set[tuple[int, int]] = frozenset(),
    expert_ranks: list[int] | None = None,
) -> list[list[int]]:
    """Greedy deterministic ownership: by numel descending, then (group, index), to the least-loaded rank.

    ``numels[g][i]`` is the element count of param i of group g; returns owner ranks in the same layout.
    ``expert`` positions (expert-parallel shards) go, after all the others, to the least-loaded of
    ``expert_ranks`` (the ranks holding the same experts).
    """
    if world_size < 1:
        raise ValueError(f"world_size: expected >= 1, got {world_size}")
    order = sorted(
        ((n, g, i) for g, group in enumerate(numels) for i, n in enumerate(group)),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    load = [0] * world_size
    owners = [[0] * len(group) for group in numels]
    everyone = list(range(world_size))
    for phase_experts in (False, True):
        ranks = everyone if not phase_experts else (expert_ranks or everyone)
        for n, g, i in order:
            if ((g, i) in expert) != phase_experts:
                continue
            rank = min(ranks, key=lambda r: (load[r], r))
            owners[g][i] = rank
            load[rank] += n
    return owners


class DistributedMuon(torch.optim.Optimizer):
    """Muon/AdamW (same param-group format as ``kimivl_model.muon.Muon``), state sharded by owner rank.

    ``process_group``: defaults to the default group when torch.distributed is initialised, else a single
    rank (no collectives, no ``init_process_group`` needed). ``comm_bytes``: payload bytes this rank put
    into collectives in the last ``step`` (sum of tensor sizes per call).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        process_group: dist.ProcessGroup | None = None,
        grads_are_averaged: bool = False,
        **defaults: Any,
    ) -> None:
        unknown = set(defaults) - set(DEFAULTS) - {"use_muon"}
        if unknown:
            raise ValueError(
                f"DistributedMuon: unknown hyper-parameters {sorted(unknown)}; expected {sorted(DEFAULTS)}"
            )
        self.process_group = process_group
        if process_group is not None or (dist.is_available() and dist.is_initialized()):
            self.world_size = dist.get_world_size(process_group)
            self.rank = dist.get_rank(process_group)
        else:
            self.world_size, self.rank = 1, 0
        self.grads_are_averaged = grads_are_averaged
        self.comm_bytes = 0
        self.owners: list[list[int]] = []
        self.low_precision: list[tuple[int, int]] = []  # (group, index) of params with fp32 masters
        self.sharded = False  # shard_gradients() was called
        self._main: dict[int, Tensor] = {}  # id(param) -> fp32 main gradient (owner only, sharded mode)
        self._had_grad: set[int] = set()  # id(param) with a local gradient this step (sharded mode)
        self.expert: set[tuple[int, int]] = set()  # (group, index) of expert-parallel shards
        self.expert_group: dist.ProcessGroup | None = None  # their expert-data-parallel group (None: 1 rank)
        self.expert_ranks: list[int] = [self.rank]
        self.expert_parallel, self.ep_rank = 1, 0
        super().__init__(params, {**DEFAULTS, **defaults, "lr": lr})

    # ------------------------------------------------------------------ ownership
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        validate_param_group(self.param_groups[-1])
        self._assign()

    def _assign(self) -> None:
        numels = [[p.numel() for p in g["params"]] for g in self.param_groups]
        self.owners = assign_owners(numels, self.world_size, self.expert, self.expert_ranks)

    def set_expert_params(
        self,
        params: list[Tensor],
        dp_group: dist.ProcessGroup | None,
        dp_ranks: list[int],
        ep_size: int,
        ep_rank: int,
    ) -> None:
        """Mark ``params`` as this rank's expert-parallel shards (module docstring): owned within
        ``dp_ranks`` (global ranks holding the same experts; ``dp_group`` their group, None for one rank),
        this rank being ``ep_rank`` of an EP group of ``ep_size``. Call once, right after construction."""
        if self.expert or self.sharded or self.low_precision or len(self.state):
            raise RuntimeError("set_expert_params: call once, before any other set-up or step")
        if self.process_group is not None:
            raise ValueError("set_expert_params: needs the optimizer on the default (world) process group")
        if self.rank not in dp_ranks or len(dp_ranks) != (
            1 if dp_group is None else dist.get_world_size(dp_group)
        ):
            raise ValueError(
                f"set_expert_params: rank {self.rank} with data-parallel ranks {dp_ranks} and a group "
                "of another size"
            )
        self.expert = set(self._index(list(params)))
        self.expert_group, self.expert_ranks = dp_group, list(dp_ranks)
        self.expert_parallel, self.ep_rank = int(ep_size), int(ep_rank)
        self._assign()

    def _comm(self, gi: tuple[int, int]) -> tuple[dist.ProcessGroup | None, int]:
        """(process group, its size) of the collectives on param ``gi``: its expert-data-parallel group for
        an expert shard, the optimizer's group otherwise."""
        if gi in self.expert:
            return self.expert_group, len(self.expert_ranks)
        return self.process_group, self.world_size

    def owner_of(self, group_index: int, param_index: int) -> int:
        """Rank that owns (and holds the state of) param ``param_index`` of group ``group_index``."""
        return self.owners[group_index][param_index]

    def _global_rank(self, group_rank: int) -> int:
        if self.process_group is None:
            return group_rank
        return dist.get_global_rank(self.process_group, group_rank)

    # ------------------------------------------------------------------ master weights
    def _index(self, params: list[Tensor]) -> list[tuple[int, int]]:
        where = {
            id(p): (g, i) for g, group in enumerate(self.param_groups) for i, p in enumerate(group["params"])
        }
        missing = [tuple(p.shape) for p in params if id(p) not in where]
        if missing:
            raise ValueError(f"params of shapes {missing} are not in this optimizer's param groups")
        return [where[id(p)] for p in params]

    @torch.no_grad()
    def hold_in_low_precision(self, params: list[Tensor], dtype: torch.dtype = torch.bfloat16) -> None:
        """Keep fp32 masters of ``params`` on their owners and hold the params in ``dtype`` on every rank.

        Call once, before the first step, with the fp32 params (the masters are exact copies of them)."""
        if self.low_precision:
            raise RuntimeError("hold_in_low_precision: already called on this optimizer")
        for gi, p in zip(self._index(params), params, strict=True):
            if p.dtype != torch.float32 or p.grad is not None:
                raise ValueError(
                    f"hold_in_low_precision: param {gi} must be fp32 without a grad, got {p.dtype}"
                    f"{' with a grad' if p.grad is not None else ''}"
                )
            if self.owners[gi[0]][gi[1]] == self.rank:
                self.state[p]["master"] = p.detach().clone()
            p.data = p.data.to(dtype)
            self.low_precision.append(gi)

    @torch.no_grad()
    def master_weights(self, dst: int | None = 0) -> dict[int, Tensor]:
        """Collective: {id(param): fp32 master on CPU} for every low-precision param, on group rank ``dst``
        (every rank when ``dst`` is None; an empty dict elsewhere). One broadcast per param from its owner,
        so no rank ever holds more than one extra param on the device. Expert shards' masters are broadcast
        in their expert-data-parallel group and returned on every rank (the caller gathers the EP shards)."""
        out: dict[int, Tensor] = {}
        for g, i in self.low_precision:
            p = self.param_groups[g]["params"][i]
            t = self.fetch_master(p)
            if dst is None or dst == self.rank or (g, i) in self.expert:
                out[id(p)] = t.detach().to("cpu", copy=True)
        return out

    @torch.no_grad()
    def fetch_master(self, p: Tensor) -> Tensor:
        """Collective over ``p``'s group (its expert-data-parallel group for an expert shard): the fp32
        master of low-precision param ``p``, broadcast from its owner to every rank of that group."""
        (gi,) = self._index([p])
        owner = self.owners[gi[0]][gi[1]]
        t = self.state[p]["master"] if owner == self.rank else torch.empty_like(p, dtype=torch.float32)
        group, size = self._comm(gi)
        if size > 1:
            dist.broadcast(t, src=self._global_rank(owner), group=group)
        return t

    @torch.no_grad()
    def set_master_weights(self, values: dict[int, Tensor]) -> None:
        """Masters <- ``values`` ({id(param): fp32 tensor}, every rank passes all of them) and params <- their
        rounding: a weights-only resume from full-precision weights."""
        for g, i in self.low_precision:
            p = self.param_groups[g]["params"][i]
            v = values[id(p)]
            if self.owners[g][i] == self.rank:
                self.state[p]["master"] = v.detach().to(device=p.device, dtype=torch.float32, copy=True)
            p.copy_(v)

    # ------------------------------------------------------------------ sharded gradients
    def shard_gradients(self, backward_order: list[Tensor], bucket_bytes: int = GRAD_BUCKET_BYTES) -> None:
        """Reduce every trainable param's gradient to its owner during the backward (module docstring).

        ``backward_order``: the optimizer's params in the order their gradients are expected (reverse
        forward order, e.g. ``reversed(list(model.parameters()))``); any order is correct, a good one frees
        memory sooner. Call once, before the first backward."""
        if self.sharded:
            raise RuntimeError("shard_gradients: already called on this optimizer")
        where = self._index(list(backward_order))
        if sorted(where) != sorted(
            (g, i) for g, grp in enumerate(self.param_groups) for i in range(len(grp["params"]))
        ):
            raise ValueError("shard_gradients: backward_order must list every param of the optimizer once")
        self._buckets_fixed: list[list[tuple[int, int]]] = []
        size = 0
        for gi in where:
            p = self._param(gi)
            last = self._buckets_fixed[-1] if self._buckets_fixed else None
            same = (
                last is not None
                and self._owner(last[0]) == self._owner(gi)
                and (last[0] in self.expert) == (gi in self.expert)
                and self._param(last[0]).dtype == p.dtype
            )
            nbytes = p.numel() * p.element_size()
            if same and size + nbytes <= bucket_bytes:
                last.append(gi)
                size += nbytes
            else:
                self._buckets_fixed.append([gi])
                size = nbytes
        self._bucket_of = {gi: b for b, members in enumerate(self._buckets_fixed) for gi in members}
        self._waiting = [len(m) for m in self._buckets_fixed]
        self._next = 0  # the next bucket to reduce, in the fixed order
        for gi in where:
            self._param(gi).register_post_accumulate_grad_hook(lambda p, gi=gi: self._grad_ready(gi))
        self.sharded = True

    def _owner(self, gi: tuple[int, int]) -> int:
        return self.owners[gi[0]][gi[1]]

    def _grad_ready(self, gi: tuple[int, int]) -> None:
        self._had_grad.add(id(self._param(gi)))
        b = self._bucket_of[gi]
        self._waiting[b] -= 1
        while self._next < len(self._buckets_fixed) and self._waiting[self._next] == 0:
            self._reduce_bucket(self._next)

    @torch.no_grad()
    def _reduce_bucket(self, b: int) -> None:
        members = self._buckets_fixed[b]
        params = [self._param(gi) for gi in members]
        local = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        owner = self._owner(members[0])
        flat = _flatten_dense_tensors(local) if len(local) > 1 else local[0].reshape(-1).clone()
        group, size = self._comm(members[0])
        if size > 1:
            dist.reduce(flat, dst=self._global_rank(owner), op=dist.ReduceOp.SUM, group=group)
            self.comm_bytes += flat.numel() * flat.element_size()
        if owner == self.rank:
            for p, g in zip(params, _unflatten_dense_tensors(flat, local), strict=True):
                main = self._main.get(id(p))
                if main is None:
                    main = self._main[id(p)] = torch.zeros_like(p, dtype=torch.float32)
                main.add_(g.to(torch.float32), alpha=1.0 / self.world_size)
        for p in params:
            p.grad = None
        self._next = b + 1

    def finish_backward(self) -> None:
        """After a micro-batch's backward: reduce the buckets still waiting (zeros for params without a
        gradient here), in the fixed order; every rank calls it after every backward."""
        if not self.sharded:
            return
        while self._next < len(self._buckets_fixed):
            self._reduce_bucket(self._next)
        self._waiting = [len(m) for m in self._buckets_fixed]
        self._next = 0

    @torch.no_grad()
    def grad_norm(self) -> float:
        """Collective (sharded mode): the global L2 norm of the averaged gradients, from the owners' shards."""
        sq = torch.zeros((), dtype=torch.float64)
        for main in self._main.values():
            sq += main.double().pow(2).sum().cpu()
        if self.world_size > 1:
            device = self.param_groups[0]["params"][0].device
            t = sq.to(device)
            dist.all_reduce(t, group=self.process_group)
            sq = t.cpu()
        return float(sq.sqrt())

    @torch.no_grad()
    def scale_grads(self, factor: float) -> None:
        """Multiply the owners' main gradients by ``factor`` (clipping in sharded mode)."""
        for main in self._main.values():
            main.mul_(factor)

    def clear_sharded_grads(self) -> None:
        """Drop this step's main gradients and gradient flags (after the step, or a skipped step)."""
        self._main.clear()
        self._had_grad.clear()

    # ------------------------------------------------------------------ comm helpers
    def _active_flags(self) -> list[list[bool]]:
        if self.sharded:
            local = [[id(p) in self._had_grad for p in g["params"]] for g in self.param_groups]
        else:
            local = [[p.grad is not None for p in g["params"]] for g in self.param_groups]
        if self.world_size == 1:
            return local
        flat = [f for g in local for f in g]
        device = self.param_groups[0]["params"][0].device if flat else torch.device("cpu")
        flags = torch.tensor(flat, dtype=torch.int32, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.process_group)
        self.comm_bytes += flags.numel() * flags.element_size()
        it = iter(flags.tolist())
        return [[bool(next(it)) for _ in g] for g in local]

    def _buckets(
        self, active: list[list[bool]]
    ) -> dict[tuple[int, bool, torch.dtype], list[tuple[int, int]]]:
        """(owner, is expert shard, dtype) -> [(group, index)] of active params, in a deterministic order on
        every rank."""
        buckets: dict[tuple[int, bool, torch.dtype], list[tuple[int, int]]] = {}
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if active[g][i]:
                    key = (self.owners[g][i], (g, i) in self.expert, p.dtype)
                    buckets.setdefault(key, []).append((g, i))
        return dict(sorted(buckets.items(), key=lambda kv: (kv[0][0], kv[0][1], str(kv[0][2]))))

    def _param(self, gi: tuple[int, int]) -> Tensor:
        return self.param_groups[gi[0]]["params"][gi[1]]

    def _reduce_grads(self, buckets: dict[tuple[int, bool, torch.dtype], list[tuple[int, int]]]) -> dict:
        """Owner-side averaged grads {(group, index): grad} of this rank's active params."""
        grads: dict[tuple[int, int], Tensor] = {}
        for (owner, _expert, _dtype), members in buckets.items():
            local = []
            for gi in members:
                p = self._param(gi)
                local.append(p.grad if p.grad is not None else torch.zeros_like(p))
            if self.world_size == 1 or self.grads_are_averaged:
                if owner == self.rank:
                    grads.update(zip(members, local, strict=True))
                continue
            flat = _flatten_dense_tensors(local)  # (sum numel,) copy
            dist.reduce(flat, dst=self._global_rank(owner), op=dist.ReduceOp.SUM, group=self.process_group)
            self.comm_bytes += flat.numel() * flat.element_size()
            if owner == self.rank:
                flat.div_(self.world_size)
                grads.update(zip(members, _unflatten_dense_tensors(flat, local), strict=True))
        return grads

    def _broadcast_params(self, buckets: dict[tuple[int, bool, torch.dtype], list[tuple[int, int]]]) -> None:
        for (owner, _expert, _dtype), members in buckets.items():
            group, size = self._comm(members[0])
            if size == 1:
                continue
            params = [self._param(gi) for gi in members]
            flat = _flatten_dense_tensors([p.detach() for p in params])
            dist.broadcast(flat, src=self._global_rank(owner), group=group)
            self.comm_bytes += flat.numel() * flat.element_size()
            if owner != self.rank:
                for p, new in zip(params, _unflatten_dense_tensors(flat, params), strict=True):
                    p.copy_(new)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.comm_bytes = 0
        if self.expert and not self.sharded:
            raise RuntimeError(
                "DistributedMuon: expert-parallel shards need shard_gradients (an all-reduce over the world "
                "would average different experts together)"
            )
        active = self._active_flags()
        buckets = self._buckets(active)
        if self.sharded:  # already reduced to the owners (and averaged) during the backward
            grads = {
                (g, i): self._main[id(p)]
                for g, group in enumerate(self.param_groups)
                for i, p in enumerate(group["params"])
                if active[g][i] and self.owners[g][i] == self.rank
            }
        else:
            grads = self._reduce_grads(buckets)
        for (g, i), grad in grads.items():
            group = self.param_groups[g]
            p = group["params"][i]
            state = self.state[p]
            master = state.get("master")
            if master is None:
                apply_param_update_(p, grad, state, group)
            else:  # fp32 update of the master, its rounding back into the low-precision param
                apply_param_update_(master, grad.to(master.dtype), state, group)
                p.copy_(master)
        if self.world_size > 1:
            self._broadcast_params(buckets)
        self.clear_sharded_grads()
        return loss

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """This rank's shard (state of owned params only) + ``world_size``, ``rank``, ``ownership``."""
        sd = super().state_dict()
        sd["world_size"] = self.world_size
        sd["rank"] = self.rank
        sd["ownership"] = [list(o) for o in self.owners]
        sd["expert_parallel"], sd["ep_rank"] = self.expert_parallel, self.ep_rank
        sd["experts"] = [list(gi) for gi in sorted(self.expert)]
        return sd

    def load_resharded(self, shards: list[dict[str, Any]]) -> None:
        """Load the state saved by every rank of a run with another world size (``shards[r]`` = old rank
        r's ``state_dict()``): each param's state (momentum, Adam moments, fp32 master) moves from its old
        owner to its owner here. Every rank passes all shards; it keeps only what it owns."""
        if not shards:
            raise ValueError("load_resharded: no shards")
        for r, sd in enumerate(shards):
            for key in ("world_size", "rank", "ownership", "state", "param_groups"):
                if key not in sd:
                    raise ValueError(
                        f"load_resharded: shard {r} lacks '{key}'; expected a DistributedMuon shard"
                    )
            if sd["world_size"] != len(shards) or sd["rank"] != r:
                raise ValueError(
                    f"load_resharded: shard {r} says rank {sd['rank']} of {sd['world_size']}, expected rank {r} of "
                    f"{len(shards)} (pass every old rank's shard, in rank order)"
                )
        groups = shards[0]["param_groups"]
        shapes = [len(g["params"]) for g in groups]
        if shapes != [len(g["params"]) for g in self.param_groups]:
            raise ValueError(
                f"load_resharded: saved param groups hold {shapes} params, this optimizer "
                f"{[len(g['params']) for g in self.param_groups]} (model or trainable set changed)"
            )
        pid_at = {(g, i): pid for g, group in enumerate(groups) for i, pid in enumerate(group["params"])}
        experts = set(self.expert) | {tuple(gi) for sd in shards for gi in sd.get("experts", [])}
        expert_pids = {pid_at[gi] for gi in experts}
        merged: dict[Any, Any] = {}
        pieces: dict[Any, dict[int, dict[str, Any]]] = {}  # expert pid -> {old EP rank: its state}
        for r, sd in enumerate(shards):
            for pid, st in sd["state"].items():
                if pid in expert_pids:
                    ep_rank = int(sd.get("ep_rank", 0))
                    if ep_rank in pieces.setdefault(pid, {}):
                        raise ValueError(
                            f"load_resharded: expert param {pid} has state twice for EP rank {ep_rank}"
                        )
                    pieces[pid][ep_rank] = st
                    continue
                if pid in merged:
                    raise ValueError(
                        f"load_resharded: param {pid} has state in two shards (rank {r} and another)"
                    )
                merged[pid] = st
        for pid, by_rank in pieces.items():  # whole expert stacks from the old EP shards, in EP-rank order
            if sorted(by_rank) != list(range(len(by_rank))):
                raise ValueError(
                    f"load_resharded: expert param {pid} has state for EP ranks {sorted(by_rank)} only"
                )
            parts = [by_rank[k] for k in range(len(by_rank))]
            merged[pid] = {
                k: torch.cat([st[k] for st in parts]) if torch.is_tensor(v) and v.dim() >= 1 else v
                for k, v in parts[0].items()
            }
        mine = {}
        for (g, i), pid in pid_at.items():
            if self.owners[g][i] != self.rank or pid not in merged:
                continue
            st = merged[pid]
            if (g, i) in self.expert:  # this rank's experts of the whole stack
                st = {
                    k: v.chunk(self.expert_parallel)[self.ep_rank]
                    if torch.is_tensor(v) and v.dim() >= 1
                    else v
                    for k, v in st.items()
                }
            mine[pid] = st
        self.load_state_dict(
            {
                "state": mine,
                "param_groups": groups,
                "world_size": self.world_size,
                "rank": self.rank,
                "ownership": [list(o) for o in self.owners],
                "expert_parallel": self.expert_parallel,
                "ep_rank": self.ep_rank,
            }
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load this rank's shard; world size, rank and ownership map must match the saved ones."""
        sd = dict(state_dict)
        for key in ("world_size", "rank", "ownership"):
            if key not in sd:
                raise ValueError(f"state_dict: missing '{key}'; expected a DistributedMuon shard")
        world, rank, ownership = sd.pop("world_size"), sd.pop("rank"), sd.pop("ownership")
        ep = (int(sd.pop("expert_parallel", 1)), int(sd.pop("ep_rank", 0)))
        sd.pop("experts", None)
        if ep != (self.expert_parallel, self.ep_rank):
            raise ValueError(
                f"state_dict: saved as EP rank {ep[1]} of expert_parallel {ep[0]}, this optimizer is EP rank "
                f"{self.ep_rank} of {self.expert_parallel}; resharding goes through load_resharded"
            )
        if world != self.world_size:
            raise ValueError(
                f"state_dict: saved with world_size={world}, this optimizer has world_size="
                f"{self.world_size}; resharding is not supported"
            )
        if rank != self.rank:
            raise ValueError(f"state_dict: shard of rank {rank} loaded on rank {self.rank}")
        if [list(o) for o in ownership] != self.owners:
            raise ValueError(
                "state_dict: ownership map differs from this optimizer's (param groups or shapes changed)"
            )
        # torch casts floating state to the param's dtype on load: keep the saved (fp32) masters/moments
        saved = {
            pid: {k: v for k, v in st.items() if torch.is_tensor(v) and v.is_floating_point()}
            for pid, st in sd["state"].items()
        }
        super().load_state_dict(sd)
        ids = [pid for group in sd["param_groups"] for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, p in zip(ids, params, strict=True):
            for k, v in saved.get(pid, {}).items():
                self.state[p][k] = v.to(p.device)
        low = {(g, i) for g, i in self.low_precision}
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if self.owners[g][i] != self.rank:
                    continue
                has = "master" in self.state.get(p, {})
                if has != ((g, i) in low):
                    raise ValueError(
                        f"state_dict: param {(g, i)} {'has' if has else 'lacks'} an fp32 master but this optimizer "
                        f"holds it in {'fp32' if has else 'low precision'} (train.working_weights changed?)"
                    )
