"""Where a pipeline run's seconds go: inside the step functions both ``bench.overhead`` contenders call,
or around them (orchestration).

Wall-clock samples of a whole tiny run spread by +-20% on a shared machine, more than the <= 10%
overhead ``bench.overhead`` has to resolve. Both contenders call the very same step functions (the data
steps of ``tasks.data.pipeline``, ``tasks.train.runner.run_phase``, ``tasks.eval.points.run_point``),
which are nearly all of the time; what differs is everything around them. ``WorkClock`` times, in the
contender's own process, the seconds spent inside those functions (``work_s``) and, within them, the
seconds spent in the calls that differ between the contenders, the ``tracker`` (JSONL vs MLflow) and the
``log`` callable (no-op vs Prefect's run logger) passed in (``bookkeeping_s``). The parent then has

    outside = wall - (work - bookkeeping)

per run: imports, Prefect's server and state bookkeeping, MLflow writes and artifacts for the flow;
imports alone for the direct path. ``outside_flow - outside_direct`` is the orchestration overhead in
seconds, measured on a ~10-30 s quantity rather than as the small difference of two noisy ~180 s ones.

What it does not see (``bench.overhead`` reports it beside, as ``work_ratio``): CPU that the flow's
background work (Prefect's server process, MLflow's writer) takes from the step functions while they
run, which makes the flow's ``work`` slower rather than its ``outside`` longer.

Only the contender processes install a clock; nothing in the product imports this module.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# (module, attribute) of the step functions both contenders call, patched before either imports them
WORK_FUNCTIONS = [
    ("tasks.data.pipeline", "step_sources"),
    ("tasks.data.pipeline", "step_filter"),
    ("tasks.data.pipeline", "step_dedup"),
    ("tasks.data.pipeline", "step_validate"),
    ("tasks.data.pipeline", "step_tokenizer"),
    ("tasks.data.pipeline", "step_tokenize"),
    ("tasks.train.runner", "run_phase"),
    ("tasks.eval.points", "run_point"),
]


class _Timed:
    """A tracker whose every method call counts as bookkeeping (attributes pass through)."""

    def __init__(self, inner: Any, clock: WorkClock) -> None:
        self._inner, self._clock = inner, clock

    def __getattr__(self, name: str) -> Any:
        v = getattr(self._inner, name)
        return self._clock.bookkeeping(v) if callable(v) else v


class WorkClock:
    def __init__(self) -> None:
        self.work_s = 0.0
        self.bookkeeping_s = 0.0
        self.calls: dict[str, int] = {}
        self._tl = threading.local()

    def bookkeeping(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` timed as bookkeeping when called (on this thread) inside a work function."""

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not getattr(self._tl, "work", 0) or getattr(self._tl, "book", 0):
                return fn(*args, **kwargs)  # outside work: already "outside"; nested: counted once
            self._tl.book = 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.bookkeeping_s += time.perf_counter() - t0
                self._tl.book = 0

        return timed

    def work(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` timed as work; its ``tracker`` and ``log`` arguments are timed as bookkeeping."""
        sig = inspect.signature(fn)
        name = fn.__name__

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if getattr(self._tl, "work", 0):
                return fn(*args, **kwargs)
            bound = sig.bind(*args, **kwargs)
            if bound.arguments.get("tracker") is not None:
                bound.arguments["tracker"] = _Timed(bound.arguments["tracker"], self)
            if callable(bound.arguments.get("log")):
                bound.arguments["log"] = self.bookkeeping(bound.arguments["log"])
            self.calls[name] = self.calls.get(name, 0) + 1
            self._tl.work = 1
            t0 = time.perf_counter()
            try:
                return fn(*bound.args, **bound.kwargs)
            finally:
                self.work_s += time.perf_counter() - t0
                self._tl.work = 0

        return timed

    def install(self, functions: list[tuple[str, str]] = WORK_FUNCTIONS) -> WorkClock:
        """Patch the step functions in their modules. Call it before the contender imports them by name
        (``from tasks.train.runner import run_phase`` copies whatever is there at that moment)."""
        for mod_name, attr in functions:
            mod = importlib.import_module(mod_name)
            setattr(mod, attr, self.work(getattr(mod, attr)))
        return self

    def report(self) -> dict[str, Any]:
        return {"work_s": self.work_s, "bookkeeping_s": self.bookkeeping_s, "calls": dict(self.calls)}

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.report(), sort_keys=True))
