"""Per-step metrics of the optimizer step itself (loss, LR, gradient norm, skipped steps, the loss
terms, expert balance), the loss history (for the phase's first/final loss) and the MFU estimate."""

from __future__ import annotations

import math
import time
from typing import Any

from tasks.train.flops import MfuMeter
from tasks.train.trainer import Callback, Step, Trainer


class StepMetrics(Callback):
    def on_step(self, trainer: Trainer, step: Step) -> None:
        r = step.result
        step.metrics.update(
            {
                "loss": r.loss,
                "lr": r.lr,
                "grad_norm": r.grad_norm if math.isfinite(r.grad_norm) else -1.0,
                "skipped_steps": float(trainer.engine.skipped_steps),
                **{k: float(v) for k, v in r.metrics.items()},
            }
        )
        if r.expert_load is not None and r.expert_load.numel():
            load = r.expert_load.float()
            step.metrics["expert_load_max_over_mean"] = float(
                (load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9)).mean()
            )


class LossHistory(Callback):
    """Every step's loss (checkpointed): the phase's first and final loss are means over a few steps."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_step(self, trainer: Trainer, step: Step) -> None:
        self.losses.append(step.result.loss)

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses}

    def load_state_dict(self, state: dict[str, Any], trainer: Trainer) -> None:
        self.losses = state["losses"]

    def result(self) -> dict[str, float]:
        k = max(1, min(5, len(self.losses) // 4))
        return {
            "final_loss": sum(self.losses[-k:]) / k,
            "first_loss": sum(self.losses[:k]) / k,
        }


class Mfu(Callback):
    """Achieved model FLOP/s and the MFU estimate from the step's tokens (``tasks.train.flops``). The meter
    (whose peak probe draws random matrices once per process) is made when training starts, after any
    resume has restored the RNG state."""

    def __init__(self, cfg: Any, objective: str) -> None:
        self.cfg, self.objective = cfg, objective
        self.meter: MfuMeter | None = None

    def on_start(self, trainer: Trainer) -> None:
        self.meter = MfuMeter(self.cfg, self.objective, device=trainer.engine.device_type)

    def on_step(self, trainer: Trainer, step: Step) -> None:
        assert self.meter is not None
        step.metrics.update(self.meter.update(step.tokens, time.perf_counter()))
