"""Token accounting of a phase: every token of the global batch counted once, by modality, by mixture
source and by share group (``tasks.train.phase_data``); the budget check that ends the phase; the step's
token metrics (totals, throughput, each group's share of the step)."""

from __future__ import annotations

import time
from typing import Any

from tasks.train.phase_data import batch_tokens, batch_tokens_by_source, by_group
from tasks.train.stages import PhaseConfig
from tasks.train.trainer import Callback, Step, Trainer


class TokenCounter(Callback):
    """The phase's clock: ``done`` once the tokens drawn reach the phase's token budget."""

    def __init__(self, phase: PhaseConfig, source_names: list[str]) -> None:
        self.phase = phase
        self.tokens = {"text": 0, "image": 0, "video": 0}
        # per mixture source; None: a checkpoint written before this accounting existed was resumed
        self.by_source: dict[str, int] | None = dict.fromkeys(source_names, 0)
        self._t0, self._base = 0.0, 0

    @property
    def total(self) -> int:
        return sum(self.tokens.values())

    @property
    def done(self) -> bool:
        return self.total >= self.phase.token_budget

    def on_start(self, trainer: Trainer) -> None:
        self._t0, self._base = time.perf_counter(), self.total

    def on_step(self, trainer: Trainer, step: Step) -> None:
        groups = dict.fromkeys(by_group(self.phase, {}), 0)
        for b in step.batches:
            for k, v in batch_tokens(b).items():  # counted once, by the packer (or the caption loader)
                self.tokens[k] += v
                step.tokens += v
            src = batch_tokens_by_source(self.phase, b, trainer.loader.source_names)
            for g, v in by_group(self.phase, src).items():
                groups[g] += v
            if self.by_source is not None:
                for k, v in src.items():
                    self.by_source[k] += v
        step.done = self.done
        elapsed = time.perf_counter() - self._t0
        step.metrics.update(
            {
                **{f"tokens_{k}": float(v) for k, v in self.tokens.items()},
                "tokens_total": float(self.total),
                "tokens_per_s": (self.total - self._base) / max(elapsed, 1e-9),
                # this step's token share per group: the mixture's (scheduled) shares as actually trained on
                **{f"share.{g}": v / max(step.tokens, 1) for g, v in groups.items()},
                **{f"tokens_source.{k}": float(v) for k, v in (self.by_source or {}).items()},
            }
        )

    def state_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, **({"tokens_by_source": self.by_source} if self.by_source else {})}

    def load_state_dict(self, state: dict[str, Any], trainer: Trainer) -> None:
        self.tokens = state["tokens"]
        self.by_source = state.get("tokens_by_source")
        if self.by_source is None:
            name = trainer.resumed_from.name if trainer.resumed_from else "the checkpoint"
            trainer.log(
                f"[{self.phase.name}] {name} predates per-source token accounting: not reported for this phase"
            )

    def result(self) -> dict[str, Any]:
        """The phase result's token fields."""
        out: dict[str, Any] = {"tokens": {**self.tokens, "total": self.total}}
        if self.by_source is not None:
            out["tokens_by_source"] = dict(self.by_source)
            out["tokens_by_group"] = by_group(self.phase, self.by_source)
        return out
