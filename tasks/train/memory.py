"""Per-rank memory of a training phase (model states and activations), computed before anything is allocated.

What the engine (``tasks/train/engine.py``) keeps on each rank for the whole phase, from the phase's model
built on the meta device (no memory, exact parameter counts) and the same param groups and ownership the
optimizer uses:

- **weights**: every parameter in fp32, frozen ones included (bf16 runs autocast over fp32 parameters),
  except the frozen matmul weights under ``train.frozen_weights: bf16`` (2 bytes; a phase from scratch
  keeps them fp32);
- **gradients**: every trainable parameter in fp32 (ZeRO 0 and 1: whole on every rank; ZeRO 2: 1/world);
  with ``train.shard_gradients`` (muon) the fp32 main gradients of the matrices the busiest rank owns, plus
  two buckets in flight during the backward (``GRAD_BUCKET_BYTES`` or the largest matrix, whichever is
  larger: a bucket reduced while the next one fills);
- **optimizer state**: ``muon`` (``DistributedMuon``): the state of the parameters this rank owns (whole
  matrices, ``assign_owners``): 1 fp32 momentum per Muon element, 2 fp32 moments per AdamW element; the
  busiest rank is reported. ``adamw``: ``torch.optim.AdamW``'s 2 fp32 moments per trainable element;
  with DeepSpeed ZeRO 1/2 also its fp32 master partition, all three 1/world per rank (DeepSpeed's
  documented layout; ZeRO 0 is checked byte for byte against the engine, ZeRO 1/2 is not: DeepSpeed's
  gradient-partition buffers are internal);
- **autocast weight copies** (bf16 only): torch.autocast caches the bf16 copy of every trainable weight
  (leaf tensors that require grad) for the whole forward, 2 bytes per trainable parameter. Frozen weights
  are cast per use; without gradient checkpointing the copies backward needs are saved with the
  activations (not counted here).

With ``train.working_weights: bf16`` (``kimivl_model/precision.py``) the trainable matmul weights are held
in bf16 (2 bytes, and 2 for their gradients), their fp32 masters are optimizer state on the owner rank (+1
fp32 element per owned element), and autocast copies remain only for the trainable weights still in fp32.

With ``train.expert_parallel: N`` every count above holds 1/N of each routed-expert stack (a rank keeps its
EP shard only; ``kimivl_model/moe_ep.py``), and the experts' Muon owners are chosen among the world/N ranks
holding the same experts, as ``DistributedMuon.set_expert_params`` does; the busiest rank over all EP
positions is reported.

- **activations** (``tasks/train/activations.py``): what one worst-case micro-batch of the phase keeps for
  its backward (per layer, tensor by tensor, with or without gradient checkpointing), plus the backward's
  temporaries and the loss head's chunk; checked against autograd's saved tensors and MemTracker's CPU peaks.

Not included (said so wherever the numbers are shown): DeepSpeed's transient gradient-reduction buckets,
optimizer step counters, the CoCa text decoder's activations, the CUDA context and allocator fragmentation.
Model states are exact and activations are counted from the code, so a phase whose plan exceeds the
device's memory cannot run, and ``check_fits`` stops it before the model is built.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kimivl_model.moe import RoutedExperts
from kimivl_model.moe_ep import EXPERT_WEIGHTS
from kimivl_model.muon import build_param_groups
from kimivl_model.vlm import KimiVL
from tasks.train.activations import ActivationPlan, phase_activations
from tasks.train.distributed_muon import GRAD_BUCKET_BYTES, assign_owners
from tasks.train.engine_config import resolve_precision
from tasks.train.phase_model import start_weights_file

GIB = 1024**3
FP32, BF16 = 4, 2


class MemoryPlanError(ValueError):
    """A phase's model states and activations do not fit the device (raised before any model is built)."""


@dataclass(frozen=True)
class MemoryPlan:
    phase: str
    world: int
    precision: str
    optimizer: str
    zero_stage: int
    params: int  # every parameter of the model (unique tensors; with expert parallelism a rank holds fewer)
    trainable: int
    weights: int  # bytes per rank
    gradients: int
    optimizer_state: int
    autocast_copies: int
    bf16_working_params: int = 0  # trainable params held in bf16 (fp32 masters in the optimizer)
    expert_parallel: int = 1
    sequence_parallel: int = 1  # ranks sharing each packed sequence: the activations count one slice
    activation_parts: ActivationPlan | None = None  # one worst-case micro-batch (None: not planned)

    @property
    def states(self) -> int:
        """Model states: weights, gradients, optimizer state, autocast copies."""
        return self.weights + self.gradients + self.optimizer_state + self.autocast_copies

    @property
    def activations(self) -> int:
        return self.activation_parts.total if self.activation_parts is not None else 0

    @property
    def total(self) -> int:
        return self.states + self.activations

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["activation_parts"] = self.activation_parts.as_dict() if self.activation_parts else None
        return {**d, "states": self.states, "activations": self.activations, "total": self.total}


def _phase_model_groups(recipe: Any, phase: Any) -> tuple[KimiVL, list[dict[str, Any]]]:
    with torch.device("meta"):
        model = KimiVL(recipe.model.architecture(), with_coca=phase.objective == "coca")
    model.set_trainable(list(phase.trainable))
    return model, build_param_groups(model, lr=1.0)


def plan_phase(recipe: Any, phase: Any, world: int, device_type: str = "cuda") -> MemoryPlan:
    """Model-state bytes per rank of ``phase`` trained on ``world`` ranks of ``device_type``."""
    if world < 1:
        raise ValueError(f"world: expected >= 1, got {world}")
    train = recipe.train
    precision = resolve_precision(train.precision, device_type)
    model, groups = _phase_model_groups(recipe, phase)
    ep = train.expert_parallel
    if world % ep:
        raise ValueError(f"train.expert_parallel: {ep} does not divide the world size {world}")
    expert_ids = {
        id(getattr(m, w)) for m in model.modules() if isinstance(m, RoutedExperts) for w in EXPERT_WEIGHTS
    }

    def numel(p: torch.Tensor) -> int:  # what one rank holds of p
        return p.numel() // ep if id(p) in expert_ids else p.numel()

    unique = {id(p): p for p in model.parameters()}.values()
    params, params_here = sum(p.numel() for p in unique), sum(numel(p) for p in unique)
    trainable = sum(p.numel() for g in groups for p in g["params"])
    trainable_here = sum(numel(p) for g in groups for p in g["params"])
    low_ids: set[int] = set()
    if train.working_weights == "bf16" and precision == "bf16":
        from kimivl_model.precision import low_precision_weights

        low_ids = {id(p) for _, p in low_precision_weights(model)}
    low = sum(p.numel() for g in groups for p in g["params"] if id(p) in low_ids)
    low_here = sum(numel(p) for g in groups for p in g["params"] if id(p) in low_ids)
    frozen_low = 0  # frozen matmul weights held in bf16 (train.frozen_weights)
    from_scratch = start_weights_file(recipe, phase, Path(".")) is None  # frozen weights then stay fp32
    if train.frozen_weights == "bf16" and precision == "bf16" and not from_scratch:
        from kimivl_model.precision import frozen_matmul_weights

        frozen_low = sum(numel(p) for _, p in frozen_matmul_weights(model))
    grads = ((trainable_here - low_here) * FP32 + low_here * BF16) // (world if train.zero_stage >= 2 else 1)
    if train.optimizer == "muon":  # DistributedMuon: whole-matrix owners, the busiest rank
        numels = [[numel(p) for p in g["params"]] for g in groups]
        owned, per_rank = _muon_owned(groups, numels, world, ep, expert_ids, low_ids)
        if train.shard_gradients:  # fp32 main gradients of the owned matrices + the buckets in flight
            largest = max((n for g in numels for n in g), default=0) * FP32
            grads = max(owned) * FP32 + 2 * max(GRAD_BUCKET_BYTES, largest)
        opt = max(per_rank) * FP32
    elif train.zero_stage == 0:  # torch AdamW over the fp32 parameters: two moments
        opt = 2 * trainable_here * FP32
    else:  # DeepSpeed ZeRO 1/2: fp32 master partition + two moments, 1/world each (ceil: padding)
        opt = 3 * -(-trainable_here // world) * FP32
    return MemoryPlan(
        phase=phase.name,
        world=world,
        precision=precision,
        optimizer=train.optimizer,
        zero_stage=train.zero_stage,
        params=params,
        trainable=trainable,
        weights=(params_here - low_here - frozen_low) * FP32 + (low_here + frozen_low) * BF16,
        gradients=grads,
        optimizer_state=opt,
        autocast_copies=(trainable_here - low_here) * BF16 if precision == "bf16" else 0,
        bf16_working_params=low,
        expert_parallel=ep,
        sequence_parallel=phase.sequence_parallel,
        activation_parts=phase_activations(
            recipe.model.architecture(), phase, recipe.model.gradient_checkpointing, precision, device_type
        ),
    )


def _muon_owned(
    groups: list[dict[str, Any]],
    numels: list[list[int]],
    world: int,
    ep: int,
    expert_ids: set[int],
    low_ids: set[int],
) -> tuple[list[int], list[int]]:
    """DistributedMuon's ownership (``assign_owners``; expert shards among the ranks holding the same
    experts) seen from every EP position: per rank, the elements it owns and its optimizer-state elements
    (1 per Muon element, 2 per AdamW element, +1 per fp32 master)."""
    experts = {
        (g, i) for g, grp in enumerate(groups) for i, p in enumerate(grp["params"]) if id(p) in expert_ids
    }
    owned, per_rank = [0] * world, [0] * world
    for j in range(ep):
        ranks = [r for r in range(world) if r % ep == j]
        owners = assign_owners(numels, world, experts if ep > 1 else frozenset(), ranks if ep > 1 else None)
        for g, group in enumerate(groups):
            per_elem = 1 if group["use_muon"] else 2
            for i, n in enumerate(numels[g]):
                if (g, i) not in experts and j > 0:
                    continue  # the replicated params' owners are the same from every EP position
                r = owners[g][i]
                owned[r] += n
                master = 1 if id(group["params"][i]) in low_ids else 0
                per_rank[r] += (per_elem + master) * n
    return owned, per_rank


def plan_recipe(recipe: Any, world: int, device_type: str = "cuda") -> list[MemoryPlan]:
    return [plan_phase(recipe, p, world, device_type) for p in recipe.phases]


def check_fits(plan: MemoryPlan, device_bytes: int, where: str, ranks_sharing: int = 1) -> None:
    """Raise ``MemoryPlanError`` when ``ranks_sharing`` ranks' model states exceed ``device_bytes`` (one
    GPU: 1 rank; a CPU host: the ranks on it share its RAM)."""
    need = plan.total * ranks_sharing
    if need <= device_bytes:
        return
    per = f" ({ranks_sharing} ranks x {plan.total / GIB:.1f} GiB)" if ranks_sharing > 1 else ""
    raise MemoryPlanError(
        f"phase {plan.phase!r}: its model states and activations need {need / GIB:.1f} GiB{per} on {where}, "
        f"which has {device_bytes / GIB:.1f} GiB (per rank: weights {plan.weights / GIB:.1f}, gradients "
        f"{plan.gradients / GIB:.1f}, optimizer state {plan.optimizer_state / GIB:.1f}, bf16 autocast copies "
        f"{plan.autocast_copies / GIB:.1f}, activations of one micro-batch {plan.activations / GIB:.1f} GiB; "
        f"{plan.params:,} parameters, {plan.trainable:,} trainable, {plan.optimizer} with ZeRO "
        f"{plan.zero_stage} on {plan.world} ranks). `kimivl recipe memory` shows every phase; more ranks "
        "shrink only the optimizer state (and the gradients with ZeRO 2); gradient checkpointing "
        "(model.gradient_checkpointing) or a shorter seq_len shrinks the activations"
    )


def device_memory(device: torch.device, local_ranks: int = 1) -> tuple[int, str, int]:
    """(bytes, description, ranks sharing it) of the memory one rank's model states live in: its GPU, or
    the host's RAM, which the host's ``local_ranks`` CPU ranks share."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.total_memory, f"{props.name} (cuda:{device.index or 0})", 1
    import psutil

    return psutil.virtual_memory().total, "this host's RAM", local_ranks


def check_launch(recipe: Any, phases: list[Any], world: int, local_ranks: int) -> None:
    """Before launching ``world`` CPU ranks (``local_ranks`` on this host): every phase's model states must
    fit this host's RAM together (``MemoryPlanError`` naming the first that does not). With CUDA each rank
    checks its own GPU before building its model (``preflight``): querying the GPU here would create a
    CUDA context in the launching process, which holds GPU memory for as long as it runs."""
    if torch.cuda.is_available():
        return
    total, where, sharing = device_memory(torch.device("cpu"), local_ranks)
    for phase in phases:
        check_fits(plan_phase(recipe, phase, world, "cpu"), total, where, sharing)


def preflight(recipe: Any, phase: Any, log: Any = print) -> MemoryPlan:
    """Plan ``phase`` for this process's launch (``WORLD_SIZE``, the device it will train on), log it, and
    raise ``MemoryPlanError`` if the model states cannot fit; called before the model is built."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    plan = plan_phase(recipe, phase, world, device.type)
    total, where, sharing = device_memory(device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    log(
        f"[{phase.name}] memory per rank: {plan.total / GIB:.2f} GiB (weights {plan.weights / GIB:.2f}, "
        f"gradients {plan.gradients / GIB:.2f}, optimizer {plan.optimizer_state / GIB:.2f}, autocast copies "
        f"{plan.autocast_copies / GIB:.2f}, activations {plan.activations / GIB:.2f}) of {total / GIB:.1f} GiB "
        f"on {where}"
    )
    check_fits(plan, total, where, sharing)
    return plan
