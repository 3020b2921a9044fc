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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from kimivl_model.muon import DEFAULTS, apply_param_update_, validate_param_group


def assign_owners(numels: list[list[int]], world_size: int) -> list[list[int]]:
    """Greedy deterministic ownership: by numel descending, then (group, index), to the least-loaded rank.

    ``numels[g][i]`` is the element count of param i of group g; returns owner ranks in the same layout.
    """
    if world_size < 1:
        raise ValueError(f"world_size: expected >= 1, got {world_size}")
    order = sorted(
        ((n, g, i) for g, group in enumerate(numels) for i, n in enumerate(group)),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    load = [0] * world_size
    owners = [[0] * len(group) for group in numels]
    for n, g, i in order:
        rank = min(range(world_size), key=lambda r: (load[r], r))
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
        super().__init__(params, {**DEFAULTS, **defaults, "lr": lr})

    # ------------------------------------------------------------------ ownership
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        validate_param_group(self.param_groups[-1])
        numels = [[p.numel() for p in g["params"]] for g in self.param_groups]
        self.owners = assign_owners(numels, self.world_size)

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
        so no rank ever holds more than one extra param on the device."""
        out: dict[int, Tensor] = {}
        for g, i in self.low_precision:
            p = self.param_groups[g]["params"][i]
            owner = self.owners[g][i]
            t = self.state[p]["master"] if owner == self.rank else torch.empty_like(p, dtype=torch.float32)
            if self.world_size > 1:
                dist.broadcast(t, src=self._global_rank(owner), group=self.process_group)
            if dst is None or dst == self.rank:
                out[id(p)] = t.detach().to("cpu", copy=True)
        return out

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

    # ------------------------------------------------------------------ comm helpers
    def _active_flags(self) -> list[list[bool]]:
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

    def _buckets(self, active: list[list[bool]]) -> dict[tuple[int, torch.dtype], list[tuple[int, int]]]:
        """(owner, dtype) -> [(group, index)] of active params, in a deterministic order on every rank."""
        buckets: dict[tuple[int, torch.dtype], list[tuple[int, int]]] = {}
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if active[g][i]:
                    buckets.setdefault((self.owners[g][i], p.dtype), []).append((g, i))
        return dict(sorted(buckets.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))))

    def _param(self, gi: tuple[int, int]) -> Tensor:
        return self.param_groups[gi[0]]["params"][gi[1]]

    def _reduce_grads(self, buckets: dict[tuple[int, torch.dtype], list[tuple[int, int]]]) -> dict:
        """Owner-side averaged grads {(group, index): grad} of this rank's active params."""
        grads: dict[tuple[int, int], Tensor] = {}
        for (owner, _dtype), members in buckets.items():
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

    def _broadcast_params(self, buckets: dict[tuple[int, torch.dtype], list[tuple[int, int]]]) -> None:
        for (owner, _dtype), members in buckets.items():
            params = [self._param(gi) for gi in members]
            flat = _flatten_dense_tensors([p.detach() for p in params])
            dist.broadcast(flat, src=self._global_rank(owner), group=self.process_group)
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
        active = self._active_flags()
        buckets = self._buckets(active)
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
        return loss

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """This rank's shard (state of owned params only) + ``world_size``, ``rank``, ``ownership``."""
        sd = super().state_dict()
        sd["world_size"] = self.world_size
        sd["rank"] = self.rank
        sd["ownership"] = [list(o) for o in self.owners]
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load this rank's shard; world size, rank and ownership map must match the saved ones."""
        sd = dict(state_dict)
        for key in ("world_size", "rank", "ownership"):
            if key not in sd:
                raise ValueError(f"state_dict: missing '{key}'; expected a DistributedMuon shard")
        world, rank, ownership = sd.pop("world_size"), sd.pop("rank"), sd.pop("ownership")
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
