"""Console progress: where the phase trains (device, ranks, CPU threads per rank), then one line every 10
optimizer steps and at the end of the phase."""

from __future__ import annotations

import torch

from tasks.train.trainer import Callback, Step, Trainer


class Console(Callback):
    def __init__(self, every_steps: int = 10) -> None:
        self.every_steps = every_steps

    def on_start(self, trainer: Trainer) -> None:
        e = trainer.engine
        trainer.log(
            f"[{trainer.phase.name}] training on {e.device_type}: {e.world_size} rank(s), "
            f"{torch.get_num_threads()} CPU threads per rank, {e.precision}"
        )

    def on_step(self, trainer: Trainer, step: Step) -> None:
        n = trainer.engine.step
        if n % self.every_steps == 0 or step.done:
            r, total = step.result, trainer.budget.total
            trainer.log(
                f"[{trainer.phase.name}] step {n} loss {r.loss:.4f} lr {r.lr:.2e} tokens {total:,}/"
                f"{trainer.phase.token_budget:,}"
            )
