"""The DeepSpeed training engine: one optimizer step per global batch of packed micro-batches.

What it does (DESIGN.md "distributed training"; STACK.md "DeepSpeed on CPU" for the facts it relies on):
- wraps ``deepspeed.initialize``; optimizer ``muon`` = ``DistributedMuon`` (Moonlight Muon, whole-matrix
  ownership, ZeRO-1-style sharded state) as DeepSpeed client optimizer under ZeRO 0 (ZeRO >= 1 flattens
  params to 1-D partitions, which breaks per-matrix Muon); optimizer ``adamw`` = DeepSpeed's own
  ``"type": "AdamW"`` with ``torch_adam`` (torch.optim.AdamW: no FusedAdam JIT build, needs no
  ``zero_allow_untested_optimizer``, runs on CPU and GPU) under ZeRO 0, 1 or 2;
- exact token-weighted gradients: the objective of a global step is
  ``sum over all target tokens of the global batch (CE) / N_global + mean over the step's micro-batches of
  extra_loss`` whatever the world size W and accumulation split G = micro_batches_per_step / W. Each
  micro-batch backpropagates ``loss_sum * (W * G / N_global) + extra_loss``; DeepSpeed divides by G in
  ``engine.backward`` and by W in its gradient all-reduce, which leaves exactly the objective above.
  ``N_global`` is all-reduced BEFORE the first backward (``count_tokens`` reads it from the batches);
- LR: our own pure schedule (``schedule.lr_at``), written into every param group before each optimizer
  step; no DeepSpeed scheduler (its WarmupDecayLR starts at lr 0);
- non-finite loss or gradient norm (checked on every rank and all-reduced, so all ranks agree): the
  optimizer step is skipped (grads dropped, no optimizer/param state change), counted in
  ``skipped_steps``; ``max_consecutive_nonfinite`` skips in a row raise ``DivergenceError``;
- bf16: ``torch.autocast`` through DeepSpeed's ``torch_autocast`` section; params, grads, optimizer state,
  buffers (router bias, RoPE tables) and frozen params stay fp32, so checkpoints and exports are full
  precision without gathering. (DeepSpeed's ``"bf16"`` section casts every module parameter to bf16, frozen
  ones included, so frozen weights would be rounded for good, and keeps the fp32 masters inside its
  optimizer wrappers (``FP16_UnfusedOptimizer`` at ZeRO 0, ZeRO partitions at 1/2), which every checkpoint
  and export would have to gather.) Model code must therefore tolerate autocast (fp32 params, bf16 matmuls).
  ``working_weights: bf16`` (muon only) is the exception, chosen per recipe: the trainable matmul weights
  (``kimivl_model/precision.py``) are held in bf16 with bf16 gradients, their fp32 masters are optimizer
  state on the owner rank (``DistributedMuon.hold_in_low_precision``); exports and checkpoints still write
  the fp32 masters (``full_state_dict`` gathers them), so lineage stays full precision.
- ``shard_gradients`` (muon): DeepSpeed's gradient all-reduce is off; DistributedMuon reduces each gradient
  to its owner during the backward (post-accumulate-grad hooks, fixed bucket order, zeros for gradients a
  rank's micro-batch did not produce) and keeps fp32 main gradients for its matrices only; the engine
  computes the global norm over the shards and clips them (DeepSpeed's rule), DeepSpeed's own clipping is
  off. 2 ranks equal 1 rank within 1e-5 (``tests/integration/test_sharded_gradients.py``);
- ``expert_parallel: N`` (muon + shard_gradients): the routed experts are split over groups of N consecutive
  ranks (``kimivl_model/moe_ep.py``: all-to-all token exchange); DistributedMuon owns each expert shard
  within the ranks that hold the same experts and reduces its gradient there only. DeepSpeed broadcasts every
  parameter from rank 0 when it initialises, so the shards are put back right after. Checkpoints and exports
  hold the whole expert stacks (gathered), so they load at any EP degree. 2 ranks with EP 2 equal 1 rank
  within 1e-5 (``tests/integration/test_expert_parallel.py``);
- ``sequence_parallel: N`` (per phase, LM/SFT): groups of N consecutive ranks share each packed sequence
  (``kimivl_model/sequence_parallel.py``, Ulysses all-to-all over heads); ``local_batches`` gives a rank its
  data-parallel group's micro-batches (world / N groups) cut to its slice (``KimiVL.shard_batch``). The
  objective above holds with W * G counting every rank's slices: each slice backpropagates its CE sum times
  W * G / N_global, and the extra (aux) loss, whole on every SP rank and reduced over the group with its
  gradient, comes out as the mean over micro-batches. 2 SP ranks equal 1 rank within 1e-5
  (``tests/integration/test_sequence_parallel_training.py``);
- checkpoints: ``tasks/train/checkpoint.py`` format (safetensors + weights_only ``.pt`` + checksums,
  staged then renamed), never DeepSpeed's pickle-based save.

The engine never updates the MoE router bias: ``StepResult.expert_load`` (summed over all ranks) is for
the caller (``KimiLM.update_router_bias``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kimivl_model.muon import build_param_groups, param_group_summary
from tasks.train import checkpoint as ckpt
from tasks.train.checkpoint import CheckpointError, DivergenceError
from tasks.train.distributed_muon import DistributedMuon
from tasks.train.engine_config import EngineConfig, build_ds_config
from tasks.train.engine_parts import (
    LossFn,
    LossModule,
    LossResult,
    StepResult,
    StepSums,
    count_target_tokens,
    install_step_guard,
    seed_everything,
    to_device,
)
from tasks.train.engine_weights import EngineWeights
from tasks.train.launch import init_distributed_if_needed
from tasks.train.schedule import lr_at

__all__ = [
    "CheckpointError",
    "DivergenceError",
    "EngineConfig",
    "LossResult",
    "StepResult",
    "TrainEngine",
    "build_ds_config",
    "count_target_tokens",
]

log = logging.getLogger(__name__)


class TrainEngine(EngineWeights):
    """DeepSpeed engine + exact token-weighted steps + non-finite guard + pickle-free checkpoints.

    ``model``: the full model (frozen params have ``requires_grad=False`` and are never touched);
    ``loss_fn(model, micro_batch) -> LossResult``; ``tracker``: when the engine is driven directly (a
    library user, tests), it records ``describe()`` once and each step's loss/LR/grad norm there (the
    phase trainer passes none: its tracking callback records richer per-step metrics); ``count_tokens(micro_batch) -> int`` target tokens
    (default: ``labels != -100``; must agree with ``LossResult.num_tokens``); ``before_step(engine)`` is
    called after the gradients are final (reduced, before clipping) and before the optimizer step (under
    ZeRO 0 they are in ``p.grad``; ZeRO 1/2 keep them partitioned inside DeepSpeed; with
    ``shard_gradients`` they are DistributedMuon's fp32 main gradients on the owner ranks, already clipped).
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: EngineConfig,
        loss_fn: LossFn,
        *,
        tracker: Any = None,
        count_tokens: Callable[[Any], int] = count_target_tokens,
        before_step: Callable[[TrainEngine], None] | None = None,
        frozen_source: Path | None = None,
    ) -> None:
        self.rank, self.world_size = init_distributed_if_needed()  # also sets TORCH_EXTENSIONS_DIR
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.cfg = cfg
        self.gas = cfg.check_world_size(self.world_size)
        self.device_type = get_accelerator().device_name()
        self.precision = cfg.resolved_precision(self.device_type)
        self.model = model
        self.count_tokens = count_tokens
        self.before_step = before_step
        self.tracker = tracker
        self.step = 0  # optimizer steps taken (incl. skipped)
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        seed_everything(cfg.seed + self.rank)

        self.sp_group: Any = None
        self.sp_rank, self.dp_rank = 0, self.rank
        if cfg.sequence_parallel > 1:
            self._set_up_sequence_parallel()
        self._muon: DistributedMuon | None = None
        self._ep: tuple[Any, Any, list[int]] | None = None  # (EP group, expert-DP group, its ranks)
        if cfg.expert_parallel > 1:
            self._shard_experts()
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("model: no parameter has requires_grad=True; nothing to train")
        self._wrapper = LossModule(model, loss_fn)
        self.ds_config = build_ds_config(cfg, self.world_size, self.device_type)
        optimizer = self._client_optimizer()
        self.low_precision_params = 0
        if cfg.working_weights == "bf16":
            self._hold_working_weights_in_bf16()
        self.frozen_source = frozen_source
        self.frozen_low: set[str] = set()  # state-dict names of frozen weights held in bf16
        self._frozen_file: Any = None  # their fp32 source (tasks.io.weights.SafetensorsFile)
        if cfg.frozen_weights == "bf16":
            self._hold_frozen_weights_in_bf16()
        shards = {n: p.detach().clone() for n, p in self._expert_params().items()}
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=self._wrapper,
            optimizer=optimizer,
            model_parameters=self.trainable if optimizer is None else None,
            config=self.ds_config,
        )
        self.device = self.ds.device
        with torch.no_grad():  # DeepSpeed broadcast rank 0's parameters, its expert shards included
            for name, p in self._expert_params().items():
                p.copy_(shards.pop(name))
        if cfg.shard_gradients:  # DistributedMuon reduces to the owners during the backward
            assert self._muon is not None
            self.ds.enable_backward_allreduce = False
            self._muon.shard_gradients([p for p in reversed(list(model.parameters())) if p.requires_grad])
        if cfg.zero_stage == 0:
            install_step_guard(self.optimizer)
        self.ds.train()
        if self.rank == 0 and tracker is not None:
            tracker.log_params(self.describe())

    def _set_up_sequence_parallel(self) -> None:
        """``sequence_parallel``: groups of consecutive ranks share each packed sequence
        (``kimivl_model/sequence_parallel.py``); the model reads its group from ``sequence_parallel_group``."""
        from kimivl_model.sequence_parallel import sequence_parallel_groups

        if not hasattr(self.model, "shard_batch"):
            raise ValueError(
                f"sequence_parallel: {type(self.model).__name__} cannot split its micro-batches (no shard_batch)"
            )
        self.sp_group, self.sp_rank, self.dp_rank = sequence_parallel_groups(self.cfg.sequence_parallel)
        self.model.sequence_parallel_group = self.sp_group

    def is_local_micro_batch(self, index: int) -> bool:
        """Whether micro-batch ``index`` of a global batch is one this rank trains on (``local_batches``)."""
        return index % (self.world_size // self.cfg.sequence_parallel) == self.dp_rank

    def local_batches(self, global_batch: list[Any]) -> list[Any]:
        """This rank's micro-batches of a global batch: those of its data-parallel group (every
        world / sequence_parallel-th, from its index) and, under sequence parallelism, its slice of each."""
        sp = self.cfg.sequence_parallel
        mine = list(global_batch[self.dp_rank :: self.world_size // sp])
        if sp == 1:
            return mine
        return [self.model.shard_batch(mb, self.sp_rank, sp) for mb in mine]

    def _shard_experts(self) -> None:
        """``expert_parallel``: this rank keeps its experts only (``kimivl_model.moe_ep``)."""
        from kimivl_model.moe_ep import expert_parallel_groups, expert_shards, shard_experts

        ep = self.cfg.expert_parallel
        if self.world_size % ep:
            raise ValueError(f"expert_parallel: {ep} does not divide the world size {self.world_size}")
        self._ep = expert_parallel_groups(ep)
        try:
            shard_experts(self.model, self._ep[0])
        except ValueError as e:  # experts not divisible by ep
            raise ValueError(f"expert_parallel: {e}") from e
        if not expert_shards(self.model):
            raise ValueError("expert_parallel: the model has no routed experts to shard")

    def _client_optimizer(self) -> DistributedMuon | None:
        """Muon: ``DistributedMuon`` over the model's Muon/AdamW groups; AdamW: None (DeepSpeed's own)."""
        cfg = self.cfg
        if cfg.optimizer != "muon":
            self._optimizer_params = {"optimizer.adamw_params": sum(p.numel() for p in self.trainable)}
            return None
        groups = build_param_groups(
            self.model,
            lr=cfg.schedule.peak_lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.muon_momentum,
            ns_steps=cfg.muon_ns_steps,
            ns_dtype=cfg.muon_ns_dtype,
            adamw_betas=tuple(cfg.adamw_betas),
            adamw_eps=cfg.adamw_eps,
        )
        self._optimizer_params = {f"optimizer.{k}": v for k, v in param_group_summary(groups).items()}
        self._muon = DistributedMuon(groups, grads_are_averaged=True)
        if self._ep is not None:
            from kimivl_model.moe_ep import expert_shards

            ep_rank = next(iter(expert_shards(self.model).values())).rank
            trainable = [p for p in self._expert_params().values() if p.requires_grad]
            self._muon.set_expert_params(
                trainable, self._ep[1], self._ep[2], self.cfg.expert_parallel, ep_rank
            )
        return self._muon

    def describe(self) -> dict[str, Any]:
        """What this engine is, as tracking params: its config, world size, resolved precision, trainable
        and bf16-held parameter counts, and how the optimizer grouped the parameters."""
        return {
            "engine": self.cfg.model_dump(mode="json"),
            "world_size": self.world_size,
            "precision_resolved": self.precision,
            "trainable_params": sum(p.numel() for p in self.trainable),
            "bf16_working_params": self.low_precision_params,
            **self._optimizer_params,
        }

    def _hold_working_weights_in_bf16(self) -> None:
        """``working_weights: bf16``: the trainable matmul weights (``kimivl_model.precision``) become bf16,
        their fp32 masters live in DistributedMuon on the owner rank (validated in ``EngineConfig``)."""
        from kimivl_model.precision import low_precision_weights

        if self.precision != "bf16":
            raise ValueError(
                f"working_weights: 'bf16' needs bf16 autocast, but precision {self.cfg.precision!r} resolved to "
                f"{self.precision!r} on {self.device_type}; set precision: bf16"
            )
        assert self._muon is not None
        chosen = [p for _, p in low_precision_weights(self.model)]
        self._muon.hold_in_low_precision(chosen, torch.bfloat16)
        self.low_precision_params = sum(p.numel() for p in chosen)

    def _hold_frozen_weights_in_bf16(self) -> None:
        """``frozen_weights: bf16``: the frozen matmul weights become bf16; saves read them from
        ``frozen_source`` (the phase's starting checkpoint, checked here to hold each of them). A phase from
        scratch (no source) keeps them in fp32: there is no exact copy to save them from."""
        from kimivl_model.precision import frozen_matmul_weights
        from tasks.io.weights import SafetensorsFile

        if self.precision != "bf16":
            raise ValueError(
                f"frozen_weights: 'bf16' needs bf16 autocast, but precision {self.cfg.precision!r} resolved to "
                f"{self.precision!r} on {self.device_type}; set precision: bf16"
            )
        chosen = frozen_matmul_weights(self.model)
        if not chosen:
            return
        if self.frozen_source is None:  # from scratch: nothing exact to save them from, so they stay fp32
            log.info("frozen_weights bf16: this phase starts from scratch; its frozen weights stay fp32")
            return
        if not Path(self.frozen_source).is_file():
            raise ValueError(
                f"frozen_weights: the phase's starting checkpoint {self.frozen_source} is missing"
            )
        source = SafetensorsFile(self.frozen_source)  # reads the header only
        experts = self._expert_params()
        for name, p in chosen:
            shape = tuple(p.shape)
            if name in experts:  # the file holds the whole stack of an expert shard
                shape = (shape[0] * self.cfg.expert_parallel, *shape[1:])
            if name not in source or source.meta(name)[0] != shape:
                raise ValueError(
                    f"frozen_weights: {self.frozen_source} has no tensor {name!r} of shape {shape}; "
                    "it must be the checkpoint this phase started from"
                )
        self._frozen_file = source
        with torch.no_grad():
            for name, p in chosen:
                p.data = p.data.to(torch.bfloat16)
                self.frozen_low.add(name)

    # ------------------------------------------------------------------------------- collectives
    def _all_reduce(self, values: list[float], op: dist.ReduceOp = dist.ReduceOp.SUM) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=op)
        return t.tolist()

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _zero0_grad_norm(self) -> float:
        grads = [p.grad for p in self.trainable if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack([g.detach().float().norm() for g in grads])))

    # ------------------------------------------------------------------------------- training
    def train_step(self, micro_batches: list[Any]) -> StepResult:
        """One optimizer step from this rank's ``micro_batches`` (its slice of the global batch)."""
        mbs = list(micro_batches)
        if len(mbs) != self.gas:
            raise ValueError(
                f"micro_batches: expected {self.gas} on this rank (micro_batches_per_step="
                f"{self.cfg.micro_batches_per_step} / world_size={self.world_size}), got {len(mbs)}"
            )
        lr = lr_at(self.cfg.schedule, self.step)
        self._set_lr(lr)
        counts = [int(self.count_tokens(mb)) for mb in mbs]
        (n_global,) = self._all_reduce([float(sum(counts))])
        tokens = int(n_global)
        self._wrapper.token_scale = self.world_size * self.gas / max(tokens, 1)  # W * G / N_global
        sums = StepSums()
        for i, mb in enumerate(mbs):
            last = i == len(mbs) - 1
            self.ds.set_gradient_accumulation_boundary(last)
            loss = self.ds(to_device(mb, self.device))
            sums.add(self._take_result(i, counts[i]))
            if last:
                self._reduce(sums)  # one collective: step statistics + "some rank saw a non-finite loss"
                if sums.nonfinite:
                    # poison the gradients so every ZeRO stage's non-finite-norm check skips the step
                    loss = loss * float("nan")
            self.ds.backward(loss)
            if self._muon is not None:
                self._muon.finish_backward()  # sharded gradients: reduce what this rank left waiting
            if not last:
                self.ds.step()  # not a boundary: advances DeepSpeed's micro-step counter only
        grad_norm, skipped = self._optimizer_step(bool(sums.nonfinite))
        return self._step_result(sums, lr, tokens, grad_norm, skipped)

    def _take_result(self, i: int, counted: int) -> LossResult:
        res, self._wrapper.last = self._wrapper.last, None
        assert res is not None
        if int(res.num_tokens) != counted:
            raise ValueError(
                f"loss_fn: LossResult.num_tokens={int(res.num_tokens)} but count_tokens gave {counted} "
                f"for micro-batch {i}; they must agree (the loss is normalised by the counted tokens)"
            )
        return res

    def _reduce(self, sums: StepSums) -> None:
        keys = sorted(sums.metrics)
        red = self._all_reduce([sums.loss, sums.extra, sums.nonfinite, *(sums.metrics[k] for k in keys)])
        sums.loss, sums.extra, sums.nonfinite = red[0], red[1], red[2]
        sums.metrics = dict(zip(keys, red[3:], strict=True))

    def _step_result(
        self, sums: StepSums, lr: float, tokens: int, grad_norm: float, skipped: bool
    ) -> StepResult:
        load = sums.load
        if load is not None and self.world_size > 1:
            load = load.to(self.device)
            dist.all_reduce(load)
        self.step += 1
        # per-micro-batch values (extra loss, metrics) are the same on every rank of an SP group
        m = self.cfg.micro_batches_per_step * self.cfg.sequence_parallel
        metrics = {k: v / m for k, v in sums.metrics.items()}
        metrics["extra_loss"] = sums.extra / m
        result = StepResult(
            step=self.step,
            lr=lr,
            loss=sums.loss / max(tokens, 1),
            grad_norm=grad_norm,
            skipped=skipped,
            tokens=tokens,
            metrics=metrics,
            expert_load=None if load is None else load.cpu(),
        )
        self._after_step(result)
        return result

    def _optimizer_step(self, nonfinite_loss: bool) -> tuple[float, bool]:
        """Boundary: check, clip (DeepSpeed), step; returns (pre-clip grad norm, skipped)."""
        if self.cfg.shard_gradients:
            assert self._muon is not None
            norm = self._muon.grad_norm()  # the same on every rank (one all-reduce)
            bad = nonfinite_loss or not math.isfinite(norm)
            self.optimizer.skip_next = bad
            clip = self.cfg.grad_clip
            if not bad and clip > 0 and norm + 1e-6 > clip:  # DeepSpeed's clip_grad_norm_ rule
                self._muon.scale_grads(clip / (norm + 1e-6))
            if self.before_step is not None:
                self.before_step(self)
            self.ds.step()  # calls the (guarded) optimizer; DeepSpeed has nothing to clip or reduce
            self._muon.clear_sharded_grads()
            return norm, bad
        if self.cfg.zero_stage == 0:
            norm = self._zero0_grad_norm()
            (bad,) = self._all_reduce([float(nonfinite_loss or not math.isfinite(norm))], dist.ReduceOp.MAX)
            self.optimizer.skip_next = bool(bad)
            if self.before_step is not None:
                self.before_step(self)
            self.ds.step()  # DeepSpeed clips, calls the (guarded) optimizer, then drops the grads
            return norm, bool(bad)
        if self.before_step is not None:
            self.before_step(self)
        self.ds.step()  # ZeRO 1/2: DeepSpeed computes the global norm and skips non-finite steps itself
        skipped = bool(getattr(self.optimizer, "overflow", False))
        norm = self.ds.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        return norm, skipped or not math.isfinite(norm)

    def _after_step(self, r: StepResult) -> None:
        if r.skipped:
            self.skipped_steps += 1
            self.consecutive_nonfinite += 1
        else:
            self.consecutive_nonfinite = 0
        if self.rank == 0 and self.tracker is not None:
            self.tracker.log_metrics(
                {
                    "loss": r.loss,
                    "lr": r.lr,
                    "grad_norm": r.grad_norm,
                    "tokens": float(r.tokens),
                    "skipped": float(r.skipped),
                    "skipped_steps": float(self.skipped_steps),
                    **{f"metrics.{k}": v for k, v in r.metrics.items()},
                },
                step=r.step,
            )
        if r.skipped:
            log.warning(
                "step %d skipped: non-finite loss or gradient (%d in a row)",
                r.step,
                self.consecutive_nonfinite,
            )
        if self.consecutive_nonfinite >= self.cfg.max_consecutive_nonfinite:
            raise DivergenceError(
                f"step {r.step}: {self.consecutive_nonfinite} consecutive steps with a non-finite loss or "
                f"gradient (max_consecutive_nonfinite={self.cfg.max_consecutive_nonfinite}; "
                f"{self.skipped_steps} skipped in all); parameters were left at their last finite values, "
                "resume from the last checkpoint with a lower LR or fixed data"
            )

    # ------------------------------------------------------------------------------- state
    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def save_checkpoint(self, directory: Path, extra_state: dict[str, Any] | None = None) -> Path:
        """Collective: write a checkpoint to ``directory`` (staged, renamed when complete); ``extra_state``
        (JSON-serialisable, e.g. loader state and token counters) comes back from ``load_checkpoint``."""
        return ckpt.save_engine_checkpoint(self, Path(directory), dict(extra_state or {}))

    def load_checkpoint(self, directory: Path, *, weights_only_resume: bool = False) -> dict[str, Any]:
        """Restore weights, optimizer, RNG and counters; returns the caller's ``extra_state``.

        ``weights_only_resume=True`` restores weights, counters and extra_state only (fresh optimizer state
        and RNG): the only way to continue on a different world size.
        """
        return ckpt.load_engine_checkpoint(self, Path(directory), weights_only_resume=weights_only_resume)
