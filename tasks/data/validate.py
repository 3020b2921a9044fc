"""Data-contract validation step: every row passes its kind's Great Expectations suite or is quarantined.

``run_validate(in_dir, out_dir, cfg)`` reads a record dataset, validates it with ``data_contracts``
(one suite per kind; ``kind="auto"`` checks each row against its own kind), and writes

- ``out_dir/part-*.parquet``: accepted rows, unchanged and in input order;
- ``out_dir/quarantine/part-*.parquet``: the other rows with ``reason`` = every failed expectation
  (``"expect_column_values_to_be_in_set(placeholders_match): value False not in [True]; ..."``) and
  ``step = "validate"``;
- ``out_dir/gx_results.json``: the GX validation results (deterministic: no run ids or timestamps);
- ``out_dir/manifest.json`` with counts ``{input, accepted, quarantined, by_expectation}``.

Rows are read twice (once to derive the small per-row columns GX validates, once to copy them out), so
memory holds the derived table, not the images. Great Expectations is imported on first use only.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from data_contracts.specs import BOUNDED_COLUMNS, Bound
from tasks.data.io import DEFAULT_ROWS_PER_SHARD, ShardWriter, iter_rows
from tasks.data.schema import KINDS, QUARANTINE_SCHEMA, RECORD_SCHEMA
from tasks.io.files import staged_dir
from tasks.io.manifest import Manifest, is_up_to_date, read_manifest, write_manifest

STEP = "validate"
GX_RESULTS = "gx_results.json"


class ValidateConfig(BaseModel):
    """Which suite(s) to apply and how to override their bounds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field(
        "auto", description="suite to apply to every row, or 'auto' = each row against its own kind's suite"
    )
    bounds: dict[str, dict[str, Bound]] = Field(
        default_factory=dict,
        description=(
            "inclusive [min, max] overrides (null = unbounded) per kind ('*' = all kinds) and derived column, "
            f"e.g. {{'caption': {{'text_chars': [5, 500]}}}}; columns: {', '.join(BOUNDED_COLUMNS)}"
        ),
    )
    decode_images: bool = Field(
        False, description="also fully decode every image (slow); by default header + end-marker checks only"
    )
    rows_per_shard: int = Field(DEFAULT_ROWS_PER_SHARD, ge=1, description="rows per output Parquet shard")

    @field_validator("kind")
    @classmethod
    def _check_kind(cls, v: str) -> str:
        if v != "auto" and v not in KINDS:
            raise ValueError(f"kind must be 'auto' or one of {KINDS}, got {v!r}")
        return v

    @field_validator("bounds")
    @classmethod
    def _check_bounds(cls, v: dict[str, dict[str, Bound]]) -> dict[str, dict[str, Bound]]:
        for kind, cols in v.items():
            if kind != "*" and kind not in KINDS:
                raise ValueError(f"bounds: unknown kind {kind!r}, expected '*' or one of {KINDS}")
            for col, (lo, hi) in cols.items():
                if col not in BOUNDED_COLUMNS:
                    raise ValueError(
                        f"bounds[{kind!r}]: unknown column {col!r}, expected one of {BOUNDED_COLUMNS}"
                    )
                if lo is not None and hi is not None and lo > hi:
                    raise ValueError(f"bounds[{kind!r}][{col!r}]: min {lo} > max {hi}")
        return v


def run_validate(in_dir: Path, out_dir: Path, cfg: ValidateConfig) -> Manifest:
    """Validate ``in_dir`` into accepted rows + quarantine + GX results; accepted + quarantined == input."""
    from data_contracts.derive import derive_row
    from data_contracts.validate import validate_derived

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise FileNotFoundError(
            f"validate input dataset {in_dir} does not exist (expected a dataset directory)"
        )
    parents = [read_manifest(in_dir).parent_of(in_dir)]
    if is_up_to_date(out_dir, config=cfg, parents=parents):
        return read_manifest(out_dir)

    rows = iter_rows(in_dir, RECORD_SCHEMA)
    derived = [derive_row(r, i, full_decode=cfg.decode_images) for i, r in enumerate(rows)]
    result = validate_derived(derived, cfg.kind, cfg.bounds)
    with staged_dir(out_dir) as stage:
        acc = ShardWriter(stage, RECORD_SCHEMA, cfg.rows_per_shard)
        quar = ShardWriter(stage / "quarantine", QUARANTINE_SCHEMA, cfg.rows_per_shard)
        n_in = 0
        for i, row in enumerate(iter_rows(in_dir, RECORD_SCHEMA)):
            n_in += 1
            reason = result.quarantined.get(i)
            if reason is None:
                acc.write(row)
            else:
                quar.write({**row, "reason": reason, "step": STEP})
        n_acc, n_q = acc.close(), quar.close()
        if n_in != len(derived) or n_acc + n_q != n_in:
            raise AssertionError(f"validate lost rows: {n_acc} accepted + {n_q} quarantined != {n_in} input")
        (stage / GX_RESULTS).write_text(json.dumps(result.gx_result, indent=1, sort_keys=True) + "\n")
        counts = {
            "input": n_in,
            "accepted": n_acc,
            "quarantined": n_q,
            "by_expectation": result.by_expectation,
        }
        manifest = write_manifest(
            stage,
            kind="dataset",
            step=STEP,
            config=cfg,
            parents=parents,
            counts=counts,
            extra={"gx_results": GX_RESULTS, "gx_success": result.success},
        )
    return manifest
