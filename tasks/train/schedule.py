"""Learning-rate schedules as pure functions of the optimizer step.

The engine applies ``lr_at(cfg, step)`` to every optimizer param group before each optimizer step, instead
of a DeepSpeed scheduler: DeepSpeed's ``WarmupDecayLR`` warms up logarithmically by default and gives lr 0
on the first step (STACK.md), and a pure function makes a resumed or continued stage reproduce the LR of an
uninterrupted run by construction (no scheduler state to checkpoint).

Conventions (``step`` is the 0-based index of the optimizer step about to be taken; ``s = start_step + step``
is the position in the whole schedule):
- linear warm-up from 0 to ``peak_lr`` over ``warmup_steps``: ``lr(s) = peak_lr * (s + 1) / warmup_steps``
  for ``s < warmup_steps``, so the FIRST step already uses ``peak_lr / warmup_steps`` (never 0: a step with
  lr 0 would be wasted) and step ``warmup_steps - 1`` uses ``peak_lr``;
- then a decay over ``[warmup_steps, total_steps]`` with progress ``p = (s - warmup_steps) / (total_steps -
  warmup_steps)`` clipped to [0, 1]:
  ``warmup_cosine``/``cosine``: ``min_lr + (peak_lr - min_lr) * (1 + cos(pi p)) / 2`` (Moonlight: warm-up to
  4.2e-4, cosine to 4.2e-5; REFERENCE.md), ``linear``: ``peak_lr + (min_lr - peak_lr) * p``,
  ``constant``: ``peak_lr``; after ``total_steps`` the LR stays at the end value;
- ``cosine`` is ``warmup_cosine`` without warm-up (``warmup_steps`` must be 0);
- ``start_step`` continues a schedule from an earlier stage (e.g. joint pretraining continues the LR
  schedule, REFERENCE.md stage 3): ``lr_at(cfg(start_step=s), k) == lr_at(cfg(start_step=0), s + k)``.
  ``warmup_steps`` and ``total_steps`` always describe the WHOLE schedule, not the remainder.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ScheduleType = Literal["warmup_cosine", "cosine", "constant", "linear"]


class LRScheduleConfig(BaseModel):
    """A learning-rate schedule; see the module docstring for the exact formulas."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: ScheduleType = Field("warmup_cosine", description="shape of the schedule after the warm-up")
    peak_lr: float = Field(4.2e-4, gt=0, description="LR at the end of the warm-up (Moonlight: 4.2e-4)")
    min_lr: float = Field(4.2e-5, ge=0, description="LR at total_steps and after (cosine/linear)")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warm-up from 0 to peak_lr")
    total_steps: int = Field(1000, gt=0, description="length of the whole schedule in optimizer steps")
    start_step: int = Field(
        0, ge=0, description="offset into the schedule: continue a schedule begun by an earlier stage"
    )

    @model_validator(mode="after")
    def _check(self) -> LRScheduleConfig:
        if self.min_lr > self.peak_lr:
            raise ValueError(f"min_lr: must be <= peak_lr={self.peak_lr}, got {self.min_lr}")
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps: must be <= total_steps={self.total_steps}, got {self.warmup_steps}"
            )
        if self.type == "cosine" and self.warmup_steps != 0:
            raise ValueError(
                f"warmup_steps: type 'cosine' has no warm-up (got {self.warmup_steps}); use 'warmup_cosine'"
            )
        return self


def lr_at(cfg: LRScheduleConfig, step: int) -> float:
    """LR of the optimizer step with 0-based index ``step`` of this stage (position ``start_step + step``)."""
    if step < 0:
        raise ValueError(f"step: expected >= 0 (0-based optimizer step), got {step}")
    s = cfg.start_step + step
    if s < cfg.warmup_steps:
        return cfg.peak_lr * (s + 1) / cfg.warmup_steps
    if cfg.type == "constant":
        return cfg.peak_lr
    span = cfg.total_steps - cfg.warmup_steps
    p = 1.0 if span == 0 else min(1.0, (s - cfg.warmup_steps) / span)
    if cfg.type == "linear":
        return cfg.peak_lr + (cfg.min_lr - cfg.peak_lr) * p
    return cfg.min_lr + (cfg.peak_lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
