"""Parquet dataset directories: sharded, schema-checked, committed atomically.

Layout of a dataset directory::

    DIR/part-00000.parquet ...         accepted rows (RECORD_SCHEMA; tokenized rows: Lance, row_store.py)
    DIR/quarantine/part-00000.parquet  rows set aside, with ``reason`` and ``step`` (QUARANTINE_SCHEMA)
    DIR/duplicates/part-00000.parquet  rows found to repeat another, with ``duplicate_of`` (dedup only)
    DIR/manifest.json                  lineage + counts (tasks/io/manifest.py), written last

A step writes into a hidden staging directory beside ``DIR`` and renames it into place only after its
manifest is written (``tasks.io.files.staged_dir``), so a killed step never leaves a complete-looking ``DIR``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

DEFAULT_ROWS_PER_SHARD = 2048


class DatasetError(ValueError):
    """Unreadable or mis-shaped dataset; the message names the file and what was expected."""


class RowBuffer:
    """Buffers rows (dicts) of a fixed schema and hands every ``rows_per_shard`` of them to
    ``write_table`` as one Arrow table (subclasses: where the table goes)."""

    def __init__(self, directory: Path, schema: pa.Schema, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD):
        if rows_per_shard <= 0:
            raise ValueError(f"rows_per_shard must be > 0, got {rows_per_shard}")
        self.directory = Path(directory)
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self._rows: list[dict[str, Any]] = []
        self.count = 0

    def write(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        self.count += 1
        if len(self._rows) >= self.rows_per_shard:
            self.flush()

    def write_many(self, rows: Iterable[dict[str, Any]]) -> None:
        for r in rows:
            self.write(r)

    def flush(self) -> None:
        if not self._rows:
            return
        try:
            table = pa.Table.from_pylist(self._rows, schema=self.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError, TypeError, UnicodeError) as e:
            raise DatasetError(f"{self.directory}: a row does not fit the schema ({e})") from None
        self.write_table(table)
        self._rows = []

    def write_table(self, table: pa.Table) -> None:
        raise NotImplementedError

    def close(self) -> int:
        self.flush()
        return self.count


class ShardWriter(RowBuffer):
    """Writes ``part-NNNNN.parquet`` shards of a fixed schema."""

    _shard = 0

    def write_table(self, table: pa.Table) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, self.directory / f"part-{self._shard:05d}.parquet", compression="zstd")
        self._shard += 1


def shard_files(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("part-*.parquet"))


def iter_rows(
    directory: Path, schema: pa.Schema | None = None, batch_size: int = 512
) -> Iterator[dict[str, Any]]:
    """Rows of every shard in order, as dicts; a shard with the wrong schema is an error naming it."""
    for f in shard_files(directory):
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetError(f"{f}: not a readable Parquet file ({e})") from None
        if schema is not None and not pf.schema_arrow.equals(schema, check_metadata=False):
            missing = sorted(set(schema.names) - set(pf.schema_arrow.names))
            raise DatasetError(
                f"{f}: schema differs from the expected one (missing columns {missing}; got {pf.schema_arrow.names})"
            )
        for batch in pf.iter_batches(batch_size=batch_size):
            yield from batch.to_pylist()


def read_table(directory: Path, schema: pa.Schema | None = None) -> pa.Table:
    files = shard_files(directory)
    if not files:
        return (schema or pa.schema([])).empty_table()
    tables = []
    for f in files:
        try:
            t = pq.read_table(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetError(f"{f}: not a readable Parquet file ({e})") from None
        if schema is not None and not t.schema.equals(schema, check_metadata=False):
            raise DatasetError(f"{f}: schema differs from the expected one (got {t.schema.names})")
        tables.append(t)
    return pa.concat_tables(tables)


def count_rows(directory: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in shard_files(directory))
