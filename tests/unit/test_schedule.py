"""LR schedules (tasks/train/schedule.py) against hand-written formulas."""

import itertools
import math

import pytest
from pydantic import ValidationError

from tasks.train.schedule import LRScheduleConfig, lr_at

PEAK, MIN = 1e-3, 1e-4


def _cfg(**kw) -> LRScheduleConfig:
    base = {"peak_lr": PEAK, "min_lr": MIN, "warmup_steps": 10, "total_steps": 110}
    return LRScheduleConfig(**{**base, **kw})


def test_warmup_is_linear_and_never_zero():
    cfg = _cfg(type="warmup_cosine")
    assert lr_at(cfg, 0) == pytest.approx(PEAK / 10)  # first step: peak / warmup_steps, not 0
    for s in range(10):
        assert lr_at(cfg, s) == pytest.approx(PEAK * (s + 1) / 10)
    assert lr_at(cfg, 9) == pytest.approx(PEAK)


def test_warmup_cosine_shape():
    cfg = _cfg(type="warmup_cosine")
    assert lr_at(cfg, 10) == pytest.approx(PEAK)
    assert lr_at(cfg, 60) == pytest.approx((PEAK + MIN) / 2)  # half-way through the decay
    assert lr_at(cfg, 35) == pytest.approx(MIN + (PEAK - MIN) * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_at(cfg, 110) == pytest.approx(MIN)
    assert lr_at(cfg, 500) == pytest.approx(MIN)  # stays at the end value
    decay = [lr_at(cfg, s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(decay))


def test_cosine_has_no_warmup():
    cfg = _cfg(type="cosine", warmup_steps=0, total_steps=100)
    assert lr_at(cfg, 0) == pytest.approx(PEAK)
    assert lr_at(cfg, 50) == pytest.approx((PEAK + MIN) / 2)
    assert lr_at(cfg, 100) == pytest.approx(MIN)
    with pytest.raises(ValidationError, match="warmup_steps"):
        _cfg(type="cosine", warmup_steps=5)


def test_linear_and_constant():
    lin = _cfg(type="linear")
    assert lr_at(lin, 10) == pytest.approx(PEAK)
    assert lr_at(lin, 60) == pytest.approx((PEAK + MIN) / 2)
    assert lr_at(lin, 85) == pytest.approx(PEAK + (MIN - PEAK) * 0.75)
    assert lr_at(lin, 200) == pytest.approx(MIN)
    const = _cfg(type="constant")
    assert lr_at(const, 4) == pytest.approx(PEAK * 5 / 10)
    assert [lr_at(const, s) for s in (10, 50, 110, 1000)] == pytest.approx([PEAK] * 4)


@pytest.mark.parametrize("kind", ["warmup_cosine", "linear", "constant"])
@pytest.mark.parametrize("start", [0, 3, 10, 57, 110])
def test_continuation_equals_uninterrupted(kind, start):
    whole = _cfg(type=kind)
    cont = _cfg(type=kind, start_step=start)
    for k in range(0, 80, 7):
        assert lr_at(cont, k) == lr_at(whole, start + k)


def test_validation_names_the_field():
    for kw, field in (
        ({"peak_lr": -1.0}, "peak_lr"),
        ({"peak_lr": 0.0}, "peak_lr"),
        ({"min_lr": -1e-5}, "min_lr"),
        ({"min_lr": 2e-3}, "min_lr"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 200}, "warmup_steps"),
        ({"total_steps": 0}, "total_steps"),
        ({"start_step": -2}, "start_step"),
        ({"type": "step"}, "type"),
        ({"lr": 1.0}, "lr"),  # extra="forbid"
    ):
        with pytest.raises(ValidationError, match=field):
            _cfg(**kw)
    with pytest.raises(ValueError, match="step"):
        lr_at(_cfg(), -1)
