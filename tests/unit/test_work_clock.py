"""bench.work_clock: seconds inside the step functions vs the tracker/log bookkeeping they call. A fake
clock advanced by the fake steps makes the accounting exact (no sleeping, no timing)."""

from __future__ import annotations

import json
import sys
import types

import pytest

from bench import work_clock
from bench.work_clock import WorkClock

NOW = [0.0]


def _spend(seconds: float) -> None:
    NOW[0] += seconds


class _Tracker:
    run_id = "r1"

    def log_metrics(self, metrics: dict, step: int) -> None:
        _spend(0.5)
        self.flush()  # nested bookkeeping: counted once

    def flush(self) -> None:
        _spend(0.25)


def _step(x: int, tracker=None, log=print) -> int:
    _spend(10.0)
    if tracker is not None:
        assert tracker.run_id == "r1"  # attributes pass through the timing proxy
        tracker.log_metrics({"loss": 1.0}, step=x)
    log(f"step {x}")
    return x + 1


@pytest.fixture
def fake_module(monkeypatch):
    NOW[0] = 0.0
    monkeypatch.setattr(work_clock.time, "perf_counter", lambda: NOW[0])
    mod = types.ModuleType("fake_steps")
    mod.step = _step
    monkeypatch.setitem(sys.modules, "fake_steps", mod)
    return mod


def test_work_and_bookkeeping_are_separated(fake_module):
    clock = WorkClock().install([("fake_steps", "step")])
    from fake_steps import step  # imported by name after install: the patched one

    assert step(1, tracker=_Tracker(), log=lambda msg: _spend(2.0)) == 2
    assert step(2, log=lambda msg: None) == 3
    r = clock.report()
    assert r["calls"] == {"_step": 2}
    assert r["bookkeeping_s"] == pytest.approx(0.5 + 0.25 + 2.0)  # tracker (incl. nested flush) + log
    assert r["work_s"] == pytest.approx(10.0 + 2.75 + 10.0)


def test_calls_outside_work_and_nested_work_are_not_counted_twice(fake_module):
    clock = WorkClock().install([("fake_steps", "step")])
    clock.bookkeeping(_Tracker().log_metrics)({"x": 1.0}, step=0)  # outside a step: not bookkeeping
    assert clock.bookkeeping_s == 0.0

    outer = clock.work(lambda: fake_module.step(5))  # a work function calling another: one span
    assert outer() == 6
    assert clock.calls == {"<lambda>": 1} and clock.work_s == pytest.approx(10.0)


def test_report_is_written_as_json(tmp_path, fake_module):
    clock = WorkClock().install([("fake_steps", "step")])
    fake_module.step(0)
    clock.write(tmp_path / "c.json")
    got = json.loads((tmp_path / "c.json").read_text())
    assert got == {"calls": {"_step": 1}, "work_s": 10.0, "bookkeeping_s": 0.0}
