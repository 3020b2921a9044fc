"""Typed settings of the training engine and the DeepSpeed config generated from them.

One packed sequence per micro-batch (``train_micro_batch_size_per_gpu=1``); ``micro_batches_per_step`` is the
GLOBAL count, so each of W ranks accumulates ``micro_batches_per_step / W`` micro-batches per step. No
DeepSpeed scheduler: the engine writes ``schedule.lr_at`` into the param groups itself (STACK.md: DeepSpeed's
WarmupDecayLR starts at lr 0). bf16 is ``torch.autocast`` via DeepSpeed's ``torch_autocast`` section over
fp32 params (see ``engine.py`` for why not DeepSpeed's ``"bf16"`` section).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kimivl_model.muon import DEFAULTS as MUON
from tasks.train.schedule import LRScheduleConfig


class OptimizerSettings(BaseModel):
    """What the recipe's ``train:`` section and the engine share: the optimizer and its hyper-parameters,
    ZeRO stage, precision, clipping, divergence guard, seed. Defined, defaulted and checked here only (the
    Muon/AdamW defaults are the model library's, ``kimivl_model.muon.DEFAULTS``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    optimizer: Literal["muon", "adamw"] = Field(
        "muon", description="muon: Moonlight Muon (AdamW for embeddings/head/vectors); adamw: AdamW for all"
    )
    zero_stage: int = Field(0, ge=0, le=2, description="DeepSpeed ZeRO stage (muon requires 0)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU (bf16 is ~20x slower there)"
    )
    working_weights: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: trainable matmul weights held in bf16 with fp32 masters in the optimizer (owner "
        "rank); needs optimizer muon and precision bf16. fp32: fp32 weights under autocast",
    )
    frozen_weights: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: frozen matmul weights (e.g. the LM in the vit/align phases) held in bf16 (autocast "
        "casts them at every use anyway); checkpoints take them from the phase's starting checkpoint file. "
        "Needs precision bf16",
    )
    shard_gradients: bool = Field(
        False,
        description="muon: reduce each gradient to its owner rank during the backward and free it elsewhere "
        "(ZeRO-2 style; a rank keeps fp32 gradients of the matrices it owns only)",
    )
    expert_parallel: int = Field(
        1,
        ge=1,
        description="routed experts split over groups of this many consecutive ranks (all-to-all token "
        "exchange); must divide the world size and the expert count; needs muon with shard_gradients",
    )
    checkpoint_format: Literal["gathered", "sharded"] = Field(
        "gathered",
        description="gathered: rank 0 writes the whole fp32 model to one safetensors file, each rank its "
        "optimizer shard; sharded: every rank writes its share of weights and optimizer state through "
        "torch.distributed.checkpoint (nothing gathered; resumes at any world size); needs zero_stage 0",
    )
    weight_decay: float = Field(
        MUON["weight_decay"], ge=0, description="decoupled weight decay (Moonlight: 0.1)"
    )
    adamw_betas: tuple[float, float] = Field(
        MUON["adamw_betas"], description="AdamW betas (also Muon's AdamW part)"
    )
    adamw_eps: float = Field(MUON["adamw_eps"], gt=0, description="AdamW epsilon")
    muon_momentum: float = Field(MUON["momentum"], ge=0, lt=1, description="Muon momentum (Nesterov)")
    muon_ns_steps: int = Field(MUON["ns_steps"], ge=1, description="Newton-Schulz iterations")
    muon_ns_dtype: Literal["fp32", "bf16"] = Field(
        MUON["ns_dtype"],
        description="Newton-Schulz arithmetic (bf16: the reference implementations' choice, ~2x on GPUs)",
    )
    grad_clip: float = Field(1.0, ge=0, description="max global gradient L2 norm; 0 disables clipping")
    max_consecutive_nonfinite: int = Field(
        3, ge=1, description="consecutive skipped (non-finite) steps that raise DivergenceError"
    )
    seed: int = Field(0, ge=0, description="seed of python/numpy/torch RNGs (rank r uses seed + r)")

    @model_validator(mode="after")
    def _check(self) -> OptimizerSettings:
        if self.optimizer == "muon" and self.zero_stage != 0:
            raise ValueError(
                f"zero_stage: optimizer 'muon' requires zero_stage=0, got {self.zero_stage}: DeepSpeed ZeRO >= 1 "
                "flattens params into 1-D partitions, so the client optimizer cannot see whole matrices for "
                "Newton-Schulz; DistributedMuon shards its own state (ZeRO-1 style) instead"
            )
        if self.working_weights == "bf16" and (self.optimizer != "muon" or self.precision == "fp32"):
            raise ValueError(
                f"working_weights: 'bf16' needs optimizer 'muon' (its owners keep the fp32 masters) and bf16 "
                f"autocast (precision bf16 or auto on CUDA), got optimizer={self.optimizer!r}, "
                f"precision={self.precision!r}"
            )
        if self.frozen_weights == "bf16" and self.precision == "fp32":
            raise ValueError(
                "frozen_weights: 'bf16' needs bf16 autocast (precision bf16, or auto on CUDA), got precision 'fp32'"
            )
        if self.shard_gradients and self.optimizer != "muon":
            raise ValueError(
                f"shard_gradients: needs optimizer 'muon' (DistributedMuon's owners keep the shards), got "
                f"{self.optimizer!r}; with adamw use zero_stage 2"
            )
        if self.expert_parallel > 1 and not (self.optimizer == "muon" and self.shard_gradients):
            raise ValueError(
                f"expert_parallel: {self.expert_parallel} needs optimizer 'muon' with shard_gradients: true (expert "
                "shards are reduced only over the ranks holding the same experts, which DistributedMuon does "
                f"and DeepSpeed's all-reduce does not), got optimizer={self.optimizer!r}, "
                f"shard_gradients={self.shard_gradients}"
            )
        if self.checkpoint_format == "sharded" and self.zero_stage != 0:
            raise ValueError(
                f"checkpoint_format: 'sharded' needs zero_stage 0 (DeepSpeed's ZeRO {self.zero_stage} partitions "
                "are not plain per-parameter state), got zero_stage {self.zero_stage}"
            )
        b1, b2 = self.adamw_betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"adamw_betas: each must be in [0, 1), got {self.adamw_betas}")
        return self


class EngineConfig(OptimizerSettings):
    """Typed engine settings; ``build_ds_config`` turns them into the DeepSpeed config dict."""

    schedule: LRScheduleConfig = Field(default_factory=LRScheduleConfig, description="LR schedule")
    micro_batches_per_step: int = Field(
        1,
        ge=1,
        description="GLOBAL micro-batches (packed sequences) per optimizer step; divisible by the data-parallel "
        "degree world / sequence_parallel",
    )
    sequence_parallel: int = Field(
        1,
        ge=1,
        description="ranks that share each packed sequence (Ulysses); consecutive ranks, divides world",
    )

    @classmethod
    def for_phase(cls, train: Any, phase: Any, schedule: LRScheduleConfig) -> EngineConfig:
        """The engine of a recipe phase: the recipe's ``train`` settings (every field the engine shares with
        it), the phase's global batch and its LR schedule."""
        shared = {k: getattr(train, k) for k in OptimizerSettings.model_fields}
        return cls(
            **shared,
            schedule=schedule,
            micro_batches_per_step=phase.micro_batches_per_step,
            sequence_parallel=phase.sequence_parallel,
        )

    def check_world_size(self, world_size: int) -> int:
        """Gradient-accumulation steps per rank (micro-batches per data-parallel group); raises naming the
        field when the world cannot be split."""
        sp = self.sequence_parallel
        if world_size < 1 or world_size % sp:
            raise ValueError(f"sequence_parallel: {sp} must divide the world size {world_size}")
        if self.micro_batches_per_step % (world_size // sp):
            raise ValueError(
                f"micro_batches_per_step: must be divisible by the data-parallel degree {world_size // sp} "
                f"(world size {world_size} / sequence_parallel {sp}), got {self.micro_batches_per_step}"
            )
        if world_size % self.expert_parallel:
            raise ValueError(
                f"expert_parallel: {self.expert_parallel} must divide the world size {world_size}"
            )
        return self.micro_batches_per_step * sp // world_size

    def resolved_precision(self, device_type: str) -> Literal["fp32", "bf16"]:
        return resolve_precision(self.precision, device_type)


def resolve_precision(precision: str, device_type: str) -> Literal["fp32", "bf16"]:
    """``auto``: bf16 autocast on CUDA, fp32 elsewhere (the recipe's ``train.precision`` too)."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return precision  # type: ignore[return-value]


def build_ds_config(cfg: EngineConfig, world_size: int, device_type: str = "cpu") -> dict[str, Any]:
    """The DeepSpeed config dict for ``cfg`` (one packed sequence per micro-batch, no DS scheduler)."""
    gas = cfg.check_world_size(world_size)
    bf16 = cfg.resolved_precision(device_type) == "bf16"
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": gas,
        # DeepSpeed counts every rank's micro-batches: under sequence parallelism the SP ranks' slices
        "train_batch_size": gas * world_size,
        # sharded gradients: the engine clips over the owners' shards itself (DeepSpeed would see no grads)
        "gradient_clipping": 0.0 if cfg.shard_gradients else float(cfg.grad_clip),
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": False},
        # fp32 params/grads/optimizer state, bf16 compute; grads reduced in fp32 (no lower-precision comm);
        # working_weights bf16: the bf16 matmul weights' grads are bf16 (accumulated and reduced in bf16)
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16", "lower_precision_safe_modules": []},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if cfg.optimizer == "adamw":
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": cfg.schedule.peak_lr,
                "betas": list(cfg.adamw_betas),
                "eps": cfg.adamw_eps,
                "weight_decay": cfg.weight_decay,
                "torch_adam": True,
            },
        }
    return ds
