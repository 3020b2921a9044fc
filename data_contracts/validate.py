"""Validate records against the suites and say, for every failing row, every expectation it broke.

``validate_records(rows, kind)`` derives one flat row per record (``derive.py``), runs the kind's
Great Expectations suite on the resulting DataFrame (``result_format="COMPLETE"`` with the explicit ``row``
column as the unexpected-index column, so every failure maps back to an input position), and returns a
``ContractResult``: accepted indices, ``{index: "expectation_type(column): detail; ..."}`` for the rest,
and a JSON-safe, deterministic summary of the GX results (no run ids or timestamps, so it can sit among
hashed step outputs).

``kind="auto"`` validates each row against its own kind's suite, rows of an unknown kind against the base
rules (which they fail on ``kind``). In both modes id uniqueness is checked across the whole input by a
one-expectation dataset suite, so the per-kind suites (cached, ~0.3 s of GX overhead per run) are shared.

The GX context is ephemeral, built once per process and cached with its suites and validation
definitions (importing GX costs ~4 s once; a validation of 100k derived rows ~0.2 s).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import great_expectations as gx
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig

from data_contracts.derive import DERIVED_COLUMNS, derive_row
from data_contracts.specs import DATASET_SUITE, UNKNOWN_KIND_SUITE, Bound
from data_contracts.suites import build_dataset_suite, build_suite, build_unknown_kind_suite
from tasks.data.schema import KINDS

RESULT_FORMAT = {"result_format": "COMPLETE", "unexpected_index_column_names": ["row"]}


class ContractError(RuntimeError):
    """An expectation could not be evaluated (a bug in the suite or the derived columns), not a bad row."""


@dataclass
class ContractResult:
    kind: str
    accepted_indices: list[int]
    quarantined: dict[int, str]  # row index -> "type(column): detail; type(column): detail"
    gx_result: dict[str, Any]  # JSON-serialisable, deterministic
    by_expectation: dict[str, int] = field(default_factory=dict)  # "type(column)" -> failing rows

    @property
    def success(self) -> bool:
        return not self.quarantined


class _GX:
    """The cached ephemeral context: one pandas asset, one whole-dataframe batch, one VD per suite."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ctx = gx.get_context(mode="ephemeral")
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        asset = self.ctx.data_sources.add_pandas("records").add_dataframe_asset("derived")
        self.batch = asset.add_batch_definition_whole_dataframe("whole")
        self.defs: dict[str, tuple[gx.ValidationDefinition, list[Any]]] = {}

    def definition(self, key: str, make_suite: Any) -> tuple[gx.ValidationDefinition, list[Any]]:
        """(validation definition, expectations in suite order) for the suite ``make_suite(name)``."""
        if key not in self.defs:
            name = f"{key.split('|')[0]}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
            suite = self.ctx.suites.add(make_suite(name))
            vd = self.ctx.validation_definitions.add(
                gx.ValidationDefinition(name=name, data=self.batch, suite=suite)
            )
            self.defs[key] = (vd, list(suite.expectations))
        return self.defs[key]


_STATE: _GX | None = None
_STATE_LOCK = threading.Lock()


def _gx() -> _GX:
    global _STATE
    with _STATE_LOCK:
        if _STATE is None:
            _STATE = _GX()
        return _STATE


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item") and not isinstance(v, str | bytes):  # numpy scalars
        return _json_safe(v.item())
    return v


def _label(exp: Any) -> str:
    return f"{exp.expectation_type}({exp.column})"


def _detail(exp: Any, value: Any) -> str:
    t = exp.expectation_type
    if t == "expect_column_values_to_not_be_null":
        return "value is null"
    if t == "expect_column_values_to_be_unique":
        return f"value {value!r} is not unique"
    if t == "expect_column_values_to_be_in_set":
        return f"value {value!r} not in {list(exp.value_set)!r}"
    if t == "expect_column_values_to_be_between":
        v = round(value, 4) if isinstance(value, float) else value
        return f"value {v!r} not in [{exp.min_value}, {exp.max_value}]"
    if t == "expect_column_value_lengths_to_be_between":
        return f"length {len(str(value))} of {value!r} not in [{exp.min_value}, {exp.max_value}]"
    return f"value {value!r}"


def _kwargs(exp: Any) -> dict[str, Any]:
    kw = exp.configuration.kwargs
    return {k: _json_safe(v) for k, v in sorted(kw.items()) if k != "batch_id" and v is not None}


def _run_suite(
    state: _GX, key: str, make_suite: Any, df: pd.DataFrame, derived: Sequence[dict[str, Any]], failures: dict
) -> dict[str, Any]:
    with state.lock:  # the GX context is shared by every caller in the process
        vd, expectations = state.definition(key, make_suite)
        res = vd.run(batch_parameters={"dataframe": df}, result_format=RESULT_FORMAT)
    by_id = {r.expectation_config.id: r for r in res.results}
    out = []
    for exp in expectations:
        r = by_id[exp.id]
        label = _label(exp)
        idx = r.result.get("unexpected_index_list")
        if not r.success and idx is None:
            msg = (
                (r.exception_info or {}).get("exception_message")
                if isinstance(r.exception_info, dict)
                else None
            )
            raise ContractError(f"{label} could not be evaluated on suite {key!r}: {msg or r.exception_info}")
        rows = sorted(int(d["row"]) for d in idx or [])
        for i in rows:
            failures.setdefault(i, []).append(f"{label}: {_detail(exp, derived[i][exp.column])}")
        out.append(
            {
                "expectation": label,
                "kwargs": _kwargs(exp),
                "success": bool(r.success),
                "element_count": len(df),
                "unexpected_count": len(rows),
                "unexpected": [{"row": i, "value": _json_safe(derived[i][exp.column])} for i in rows],
            }
        )
    return {
        "suite": key.split("|")[0],
        "rows": len(df),
        "success": all(e["success"] for e in out),
        "evaluated_expectations": len(out),
        "unsuccessful_expectations": sum(not e["success"] for e in out),
        "expectations": out,
    }


def _bounds_key(bounds: Mapping[str, Mapping[str, Bound]] | None) -> str:
    return json.dumps(
        {k: {c: list(b) for c, b in v.items()} for k, v in (bounds or {}).items()}, sort_keys=True
    )


def validate_derived(
    derived: Sequence[dict[str, Any]], kind: str, bounds: Mapping[str, Mapping[str, Bound]] | None = None
) -> ContractResult:
    """Validate rows already reduced by ``derive_row`` (``derived[i]["row"] == i``)."""
    if kind != "auto" and kind not in KINDS:
        raise ValueError(f"kind must be 'auto' or one of {KINDS}, got {kind!r}")
    state = _gx()
    bkey = _bounds_key(bounds)
    df = pd.DataFrame(list(derived), columns=list(DERIVED_COLUMNS))
    failures: dict[int, list[str]] = {}
    # id uniqueness is a dataset-wide rule: one small suite over every row; then each row against its
    # kind's suite (one suite for all rows when ``kind`` is given), so both modes share cached suites
    suites = [_run_suite(state, f"{DATASET_SUITE}|", build_dataset_suite, df, derived, failures)]
    if kind != "auto":
        groups = pd.Series(kind, index=df.index)
    else:
        groups = df["kind"].where(df["kind"].isin(KINDS), other=UNKNOWN_KIND_SUITE)
    for k in [*KINDS, UNKNOWN_KIND_SUITE]:
        part = df[groups == k]
        if part.empty and not (k == kind and df.empty):
            continue
        if k == UNKNOWN_KIND_SUITE:
            key, make = f"{k}|", build_unknown_kind_suite
        else:
            key = f"{k}|{bkey}"
            make = lambda name, k=k: build_suite(k, bounds, dataset_level=False, name=name)  # noqa: E731
        suites.append(_run_suite(state, key, make, part, derived, failures))
    quarantined = {i: "; ".join(failures[i]) for i in sorted(failures)}
    by_expectation: dict[str, int] = {}
    for reasons in failures.values():
        for label in sorted({r.split(": ", 1)[0] for r in reasons}):
            by_expectation[label] = by_expectation.get(label, 0) + 1
    gx_result = {
        "great_expectations_version": gx.__version__,
        "mode": kind,
        "rows": len(df),
        "success": not quarantined,
        "suites": suites,
    }
    return ContractResult(
        kind=kind,
        accepted_indices=[i for i in range(len(derived)) if i not in failures],
        quarantined=quarantined,
        gx_result=gx_result,
        by_expectation=dict(sorted(by_expectation.items())),
    )


def validate_records(
    rows: Sequence[dict[str, Any]], kind: str, bounds: Mapping[str, Mapping[str, Bound]] | None = None
) -> ContractResult:
    """Validate records (``RECORD_SCHEMA`` dicts) against ``kind``'s suite, or each its own (``"auto"``)."""
    return validate_derived([derive_row(r, i) for i, r in enumerate(rows)], kind, bounds)
