"""The phase trainer's callbacks (``tasks.train.trainer.Callback``), in the order ``standard_callbacks``
gives them: step metrics, token accounting (the phase's clock), router-bias update, loss history, MFU,
tracking, checkpoint cadence, console progress."""

from __future__ import annotations

from typing import Any

from tasks.train.callbacks.checkpointing import Checkpointing
from tasks.train.callbacks.console import Console
from tasks.train.callbacks.metrics import LossHistory, Mfu, StepMetrics
from tasks.train.callbacks.router_bias import RouterBias
from tasks.train.callbacks.tokens import TokenCounter
from tasks.train.callbacks.tracking import Tracking

__all__ = [
    "Checkpointing",
    "Console",
    "LossHistory",
    "Mfu",
    "RouterBias",
    "StepMetrics",
    "TokenCounter",
    "Tracking",
    "standard_callbacks",
]


def standard_callbacks(counter: TokenCounter, losses: LossHistory, **parts: Any) -> list[Any]:
    """The callbacks of a recipe phase, in order (``parts``: mfu, tracking, checkpointing, console)."""
    return [
        StepMetrics(),
        counter,
        RouterBias(),
        losses,
        parts["mfu"],
        parts["tracking"],
        parts["checkpointing"],
        parts["console"],
    ]
