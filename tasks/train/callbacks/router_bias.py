"""Aux-loss-free balancing (REFERENCE.md, router): after every applied step, the MoE router's per-expert
correction bias moves by the sign of each expert's load error, from the load summed over all ranks."""

from __future__ import annotations

import torch

from tasks.train.trainer import Callback, Step, Trainer


class RouterBias(Callback):
    def on_step(self, trainer: Trainer, step: Step) -> None:
        r = step.result
        if (
            r.skipped
            or not trainer.phase.router_bias_update
            or r.expert_load is None
            or not r.expert_load.numel()
        ):
            return
        with torch.no_grad():
            trainer.engine.model.language_model.update_router_bias(r.expert_load.to(torch.float32))
