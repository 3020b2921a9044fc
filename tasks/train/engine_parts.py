"""The engine's small parts: the loss/step result types, the default token counter, the module DeepSpeed
wraps, the ZeRO-0 step guard, device transfer and seeding (``tasks/train/engine.py`` re-exports them)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from kimivl_model.lm import IGNORE_INDEX  # the model's label contract


@dataclass
class LossResult:
    """What ``loss_fn(model, micro_batch)`` returns for one micro-batch."""

    loss_sum: torch.Tensor  # () summed (not averaged) CE over the micro-batch's target tokens
    num_tokens: int  # target tokens of the micro-batch (labels != -100)
    extra_loss: torch.Tensor | float = 0.0  # () added as is, e.g. MoE aux loss (averaged over micro-batches)
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. separate loss terms (step mean reported)
    expert_load: torch.Tensor | None = None  # (num_moe_layers, E) tokens per expert (step sum reported)


@dataclass
class StepResult:
    step: int  # optimizer steps taken so far (incl. skipped ones), i.e. 1-based index of this step
    lr: float  # LR used by this step
    loss: float  # global token-mean CE: sum(loss_sum) / tokens over all ranks
    grad_norm: float  # global grad L2 norm before clipping (inf/nan when skipped)
    skipped: bool  # non-finite loss/grad: no update
    tokens: int  # global target tokens of the step
    metrics: dict[str, float]  # means over the step's micro-batches (all ranks), incl. "extra_loss"
    expert_load: torch.Tensor | None  # (num_moe_layers, E) summed over all micro-batches of all ranks


@dataclass
class StepSums:
    """This rank's sums over a step's micro-batches (all-reduced at the last one): loss and extra-loss sums,
    "a loss was non-finite", the loss_fn's metrics, the expert load."""

    loss: float = 0.0
    extra: float = 0.0
    nonfinite: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    load: torch.Tensor | None = None

    def add(self, res: LossResult) -> None:
        ls = float(res.loss_sum.detach())
        ex = (
            float(res.extra_loss.detach())
            if isinstance(res.extra_loss, torch.Tensor)
            else float(res.extra_loss)
        )
        self.loss += ls
        self.extra += ex
        if not (math.isfinite(ls) and math.isfinite(ex)):
            self.nonfinite = 1.0
        for k, v in res.metrics.items():
            self.metrics[k] = self.metrics.get(k, 0.0) + float(v)
        if res.expert_load is not None:
            el = res.expert_load.detach().float()
            self.load = el if self.load is None else self.load + el


LossFn = Callable[[nn.Module, Any], LossResult]


def count_target_tokens(micro_batch: Any) -> int:
    """Default token counter: ``labels != -100`` of a mapping (or object) with ``labels``."""
    labels = (
        micro_batch.get("labels")
        if isinstance(micro_batch, Mapping)
        else getattr(micro_batch, "labels", None)
    )
    if not isinstance(labels, torch.Tensor):
        raise TypeError(
            "count_tokens: the default counter needs micro-batches with a 'labels' tensor; "
            "pass TrainEngine(count_tokens=...) for other batch types"
        )
    return int((labels != IGNORE_INDEX).sum())


class LossModule(nn.Module):
    """What DeepSpeed wraps: forward(micro_batch) -> the scalar that this micro-batch backpropagates."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.token_scale = 1.0
        self.last: LossResult | None = None

    def forward(self, micro_batch: Any) -> torch.Tensor:
        res = self.loss_fn(self.model, micro_batch)
        if not isinstance(res, LossResult):
            raise TypeError(f"loss_fn: expected a LossResult, got {type(res).__name__}")
        if not isinstance(res.loss_sum, torch.Tensor) or res.loss_sum.dim() != 0:
            raise TypeError("loss_fn: LossResult.loss_sum must be a 0-dim tensor (summed over target tokens)")
        self.last = res
        return res.loss_sum.float() * self.token_scale + res.extra_loss


def install_step_guard(optimizer: torch.optim.Optimizer) -> None:
    """Let the engine veto the next ``optimizer.step()`` (non-finite step) under ZeRO 0, where DeepSpeed
    calls the optimizer directly; DeepSpeed reads ``optimizer.overflow`` afterwards (skipped-step count)."""
    inner = optimizer.step

    def step(closure: Callable[[], float] | None = None) -> float | None:
        optimizer.overflow = optimizer.skip_next
        optimizer.skip_next = False
        return None if optimizer.overflow else inner(closure)

    optimizer.skip_next = False
    optimizer.overflow = False
    optimizer.step = step


def to_device(batch: Any, device: torch.device) -> Any:
    """The tensors of a micro-batch (nested dicts, lists, tuples) on ``device``; loaders yield CPU tensors."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if type(batch) in (list, tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
