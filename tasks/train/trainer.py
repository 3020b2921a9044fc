"""The training loop of one phase, and the hooks everything else attaches to.

``Trainer.fit`` draws the phase's global batch, lets the engine take one optimizer step on this rank's
share of it, and hands the step to its callbacks in order, until the token budget is consumed
(``callbacks.tokens.TokenCounter``, the phase's clock). Everything around that (token accounting, the
router-bias update, metrics, tracking, checkpoint cadence, console progress) is a ``Callback``
(``tasks/train/callbacks/``); a callback's ``state_dict`` goes into every checkpoint and comes back on
resume, so a resumed phase continues the identical trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks import Log
from tasks.train.checkpoint import latest_checkpoint
from tasks.train.engine import StepResult, TrainEngine
from tasks.train.stages import PhaseConfig


@dataclass
class Step:
    """One optimizer step as the callbacks see it."""

    result: StepResult
    batches: list[Any]  # the whole global batch (every rank's micro-batches: token accounting counts all)
    metrics: dict[str, float] = field(default_factory=dict)  # filled by the callbacks, logged by tracking
    tokens: int = 0  # tokens of every modality in the global batch (callbacks.tokens)
    done: bool = False  # the phase's token budget is reached after this step


class Callback:
    """Hooks of the training loop; every one is a no-op here."""

    def on_start(self, trainer: Trainer) -> None:
        """After set-up and any resume, before the first step of this process."""

    def on_step(self, trainer: Trainer, step: Step) -> None:
        """After every optimizer step, in callback order."""

    def on_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        """After the phase's final checkpoint is written."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state saved with every checkpoint (keys shared by all callbacks)."""
        return {}

    def load_state_dict(self, state: dict[str, Any], trainer: Trainer) -> None:
        """Restore from a checkpoint's state (the union of every callback's ``state_dict``)."""


class Trainer:
    """One phase: ``fit`` trains until the clock (``budget``: a callback with ``done``) says stop."""

    def __init__(
        self,
        phase: PhaseConfig,
        engine: TrainEngine,
        loader: Any,
        callbacks: list[Callback],
        budget: Any,
        checkpoints: Path,
        log: Log = print,
        weights_only_resume: bool = False,
    ) -> None:
        self.phase, self.engine, self.loader = phase, engine, loader
        self.callbacks, self.budget, self.checkpoints, self.log = callbacks, budget, checkpoints, log
        self.weights_only_resume = weights_only_resume
        self.resumed_from: Path | None = None

    def resume(self) -> None:
        """Restore the last complete checkpoint of the phase, if any: engine, loader and callbacks."""
        last = latest_checkpoint(self.checkpoints)
        if last is None:
            return
        state = self.engine.load_checkpoint(last, weights_only_resume=self.weights_only_resume)
        self.loader.load_state_dict(state["loader"])
        self.resumed_from = last
        for cb in self.callbacks:
            cb.load_state_dict(state, self)
        self.log(f"[{self.phase.name}] resumed from {last.name} at {self.budget.total:,} tokens")

    def checkpoint_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"loader": self.loader.state_dict(), "phase": self.phase.name}
        for cb in self.callbacks:
            state.update(cb.state_dict())
        return state

    def fit(self, stop_after_steps: int | None = None) -> bool:
        """Train to the budget (True), or stop after ``stop_after_steps`` steps of this call (False: the
        phase stays unfinished and resumes on the next call; tests simulate interruptions with it)."""
        for cb in self.callbacks:
            cb.on_start(self)
        taken = 0
        while not self.budget.done:
            batches = [next(self.loader) for _ in range(self.phase.micro_batches_per_step)]
            result = self.engine.train_step(self.engine.local_batches(batches))
            step = Step(result, batches)
            for cb in self.callbacks:
                cb.on_step(self, step)
            taken += 1
            if stop_after_steps is not None and taken >= stop_after_steps and not step.done:
                return False
        return True

    def end(self, result: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_end(self, result)
