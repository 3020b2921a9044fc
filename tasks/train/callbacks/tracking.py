"""What a phase reports to its tracker (rank 0 only): at a fresh start the phase config, the engine's
description and the memory plan as params, lineage tags; every step's metrics; the final checkpoint as an
artifact."""

from __future__ import annotations

from typing import Any

from tasks.tracking.base import Tracker
from tasks.train.trainer import Callback, Step, Trainer


class Tracking(Callback):
    def __init__(self, tracker: Tracker, memory_plan: dict[str, Any], parent_uri: str | None) -> None:
        self.tracker, self.memory_plan, self.parent_uri = tracker, memory_plan, parent_uri

    def on_start(self, trainer: Trainer) -> None:
        if trainer.engine.rank != 0 or trainer.resumed_from is not None:
            return  # a resumed phase logged these when it started
        phase = trainer.phase
        self.tracker.log_params(
            {"phase": phase.model_dump(mode="json"), **trainer.engine.describe(), "memory": self.memory_plan}
        )
        self.tracker.set_tags(
            {"phase": phase.name, "stage": phase.stage, "parent_checkpoint": self.parent_uri or "scratch"}
        )

    def on_step(self, trainer: Trainer, step: Step) -> None:
        if trainer.engine.rank == 0:
            self.tracker.log_metrics(step.metrics, step=trainer.engine.step)

    def on_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        if trainer.engine.rank == 0:
            from pathlib import Path

            self.tracker.log_artifact(Path(result["checkpoint"]), name=f"{trainer.phase.name}-final")
