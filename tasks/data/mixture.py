"""A data mixture as the recipe writes it: sources (tokenized datasets) with weights and share groups, an
optional linear schedule of one group's share, and the rules a mixture must satisfy (checked once, here,
for the recipe's phases and for the loader alike)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    # NaN/Infinity are never a meaningful weight or share (YAML spells them .nan/.inf)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class MixtureSource(_Strict):
    name: str = Field(
        description="tokenized dataset name produced by the data pipeline (e.g. 'caption', 'text')"
    )
    weight: float = Field(
        ge=0, description="relative sampling weight (of documents or tokens: the phase's weight_unit)"
    )
    group: str = Field(default="text", description="share group, e.g. 'text' or 'multimodal'")


class ShareSchedule(_Strict):
    """Linear change of one group's share (of documents or tokens: the phase's ``weight_unit``) over the
    phase's token budget."""

    group: str = Field(description="the group whose share changes (e.g. 'multimodal')")
    start: float = Field(ge=0, le=1, description="share at the first token of the phase")
    end: float = Field(ge=0, le=1, description="share at the token budget")


def check_mixture(
    sources: Sequence[Any], schedule: ShareSchedule | None, group_of: Callable[[Any], str]
) -> None:
    """Raise ``ValueError`` naming the field unless the mixture can be drawn: unique source names, some
    weight, and a share schedule of an existing group that has weight, beside another group with weight
    wherever the share is below 1. ``group_of(source)``: a source's share group."""
    names = [s.name for s in sources]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"sources: dataset {dup} listed twice; give each dataset one weight")
    if sum(s.weight for s in sources) <= 0:
        raise ValueError(f"sources: every weight is 0 in {names}; at least one must be > 0")
    if schedule is None:
        return
    groups = {group_of(s) for s in sources}
    if schedule.group not in groups:
        raise ValueError(
            f"share_schedule.group {schedule.group!r} is not a group of the sources {sorted(groups)}"
        )
    if len(groups) < 2:
        raise ValueError("a share_schedule needs sources in at least two groups")
    inside = sum(s.weight for s in sources if group_of(s) == schedule.group)
    outside = sum(s.weight for s in sources if group_of(s) != schedule.group)
    if inside <= 0:
        raise ValueError(f"share_schedule.group {schedule.group!r}: every source of that group has weight 0")
    if min(schedule.start, schedule.end) < 1 and outside <= 0:
        raise ValueError(
            f"share_schedule: a share below 1 needs a source outside group {schedule.group!r} with weight > 0"
        )
