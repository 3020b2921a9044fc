"""Checkpoint cadence: every ``checkpoint_every_steps`` optimizer steps and when the budget is reached,
the engine's checkpoint with the trainer's state (loader position, every callback's state); only the
newest ``keep_checkpoints`` complete ones stay."""

from __future__ import annotations

import shutil
from pathlib import Path

from tasks.io.faults import crash_point
from tasks.train.checkpoint import CHECKSUM_FILE, checkpoint_path
from tasks.train.trainer import Callback, Step, Trainer


class Checkpointing(Callback):
    def __init__(self, every_steps: int, keep: int) -> None:
        self.every_steps, self.keep = every_steps, keep

    def on_step(self, trainer: Trainer, step: Step) -> None:
        crash_point(f"train:step:{trainer.phase.name}")
        n = trainer.engine.step
        if n % self.every_steps == 0 or step.done:
            trainer.engine.save_checkpoint(
                checkpoint_path(trainer.checkpoints, n), extra_state=trainer.checkpoint_state()
            )
            prune(trainer.checkpoints, self.keep)


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints under ``root``."""
    complete = sorted(p for p in root.glob("step-*") if (p / CHECKSUM_FILE).is_file())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
