"""Tokenized datasets as Lance datasets: random access to any document, on local disk or on S3.

Why Lance (https://lancedb.github.io/lance/): the loader draws documents one by one from a per-source,
per-epoch permutation (``tasks.data.loader``), so it needs ``take(row indices)`` that reads only those rows
(and only the columns asked for) from a file or an object store. Lance's file format is built for that
(random access by row, columnar projection, object-store native through Rust's ``object_store``);
Parquet reads whole row groups; MosaicML ``streaming`` / WebDataset shards are sequential and shuffle by
shard, which does not fit the mixture's per-document draws and per-phase share schedules.

Layout of a tokenized dataset directory (``tasks.data.tokenize``)::

    DIR/rows.lance/...                the accepted rows (TOKENIZED_SCHEMA), a Lance dataset
    DIR/quarantine/part-00000.parquet rows set aside (``tasks.data.io``)
    DIR/manifest.json                 lineage + counts, written last

``DIR`` is a local path or an ``s3://bucket/prefix`` URI (the same directory uploaded with
``tasks.io.storage.put_dir``, e.g. by ``kimivl data publish``). S3 settings come from the environment as for
every other S3 access (``tasks.io.s3.S3Settings``: ``KIMIVL_S3_ENDPOINT_URL``/``AWS_ENDPOINT_URL``,
``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``); the options
handed to Lance are never logged.

Content hash: Lance names its data files with random UUIDs and stamps its version files, so a hash of
the files would differ between two identical runs. The manifest's ``content_hash`` of a tokenized dataset
is therefore the hash of its ROWS (``RowWriter.content_hash``: sha256 of the Arrow IPC stream of the row
batches, in order), which identical inputs reproduce; the manifest still lists every file with its sha256
for the integrity check on read.

Threads: Lance runs its own CPU and I/O thread pools; ``LANCE_CPU_THREADS`` / ``LANCE_IO_THREADS`` bound
them (``tasks.train.threads`` sets them with the other per-process thread counts).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from tasks.data.io import DatasetError, RowBuffer

ROWS_DIR = "rows.lance"
os.environ.setdefault("LANCE_LOG", "error")  # Lance warns on every new dataset it creates


def is_uri(path: str | os.PathLike) -> bool:
    return str(path).startswith("s3://")


def data_location(value: str | os.PathLike) -> str | Path:
    """A data root or dataset as given on a command line: an ``s3://`` URI stays a string (a ``Path`` would
    fold its ``//``), anything else is a local path."""
    return str(value) if is_uri(value) else Path(value)


def join(base: str | os.PathLike, *parts: str) -> str | Path:
    """``base/parts...`` for a local path (a Path) or an ``s3://`` URI (a string)."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return Path(base).joinpath(*parts)


def storage_options(uri: str) -> dict[str, str] | None:
    """Lance's ``object_store`` options for ``uri``: the project's S3 settings and credentials from the
    environment (None for a local path). Contains secrets: never log it."""
    if not is_uri(uri):
        return None
    from tasks.io.s3 import S3Settings

    s = S3Settings.from_env()
    opts = {
        "connect_timeout": f"{s.connect_timeout}s",
        "timeout": f"{s.read_timeout}s",
        # object_store retries 5xx, timeouts and connection errors with backoff; bound it like boto3's
        # attempts, and the whole retrying of one request by the same number of read timeouts
        "client_max_retries": str(max(0, s.max_attempts - 1)),
        "client_retry_timeout": str(int(s.max_attempts * (s.read_timeout + s.connect_timeout))),
        "download_retry_count": str(max(0, s.max_attempts - 1)),
    }
    if s.endpoint_url:
        opts["aws_endpoint"] = s.endpoint_url
        opts["aws_virtual_hosted_style_request"] = "false"
        if s.endpoint_url.startswith("http://"):
            opts["allow_http"] = "true"
    if s.region:
        opts["aws_region"] = s.region
    for env, key in (
        ("AWS_ACCESS_KEY_ID", "aws_access_key_id"),
        ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
        ("AWS_SESSION_TOKEN", "aws_session_token"),
    ):
        if os.environ.get(env):
            opts[key] = os.environ[env]
    return opts


class RowWriter(RowBuffer):
    """Streams rows (dicts of one schema) into ``DIR/rows.lance``, one fragment per ``rows_per_shard``
    rows, and keeps the rows' content hash. Memory holds one fragment's rows."""

    def __init__(self, directory: Path, schema: pa.Schema, rows_per_shard: int = 2048) -> None:
        super().__init__(directory, schema, rows_per_shard)
        self._dataset: Any = None
        self._hash = hashlib.sha256(schema.to_string().encode())

    def write_table(self, table: pa.Table) -> None:
        import lance

        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self.schema) as w:
            w.write_table(table)
        self._hash.update(sink.getvalue().to_pybytes())
        mode = "append" if self._dataset is not None else "create"
        self._dataset = lance.write_dataset(
            table, str(self.directory / ROWS_DIR), schema=self.schema, mode=mode
        )

    def close(self) -> int:
        """Write what is buffered; an empty dataset is still created (0 rows)."""
        self.flush()
        if self._dataset is None:
            self.write_table(self.schema.empty_table())
        return self.count

    @property
    def content_hash(self) -> str:
        return self._hash.hexdigest()


class RowStore:
    """Read side of ``DIR/rows.lance``: row count, ``take`` of chosen rows and columns, ordered scans."""

    def __init__(self, directory: str | os.PathLike, schema: pa.Schema | None = None) -> None:
        import lance

        self.uri = str(join(directory, ROWS_DIR))
        if not is_uri(directory) and not Path(self.uri).is_dir():
            raise DatasetError(f"{directory}: no {ROWS_DIR} (not a tokenized dataset of this version)")
        try:
            self.dataset = lance.dataset(self.uri, storage_options=storage_options(self.uri))
        except (OSError, ValueError) as e:
            raise DatasetError(f"{self.uri}: not a readable Lance dataset ({_brief(e)})") from None
        if schema is not None and not self.dataset.schema.equals(schema, check_metadata=False):
            missing = sorted(set(schema.names) - set(self.dataset.schema.names))
            raise DatasetError(
                f"{self.uri}: schema differs from the expected one (missing columns {missing}; got "
                f"{self.dataset.schema.names})"
            )
        self.num_rows = self.dataset.count_rows()

    def take(self, rows: Iterable[int], columns: list[str] | None = None) -> pa.Table:
        """The rows at ``rows`` (in that order, repeats allowed), only ``columns`` when given."""
        rows = [int(r) for r in rows]
        bad = [r for r in rows if not 0 <= r < self.num_rows]
        if bad:
            raise IndexError(f"{self.uri}: rows {bad[:5]} outside [0, {self.num_rows})")
        if not rows:
            schema = self.dataset.schema
            return (pa.schema([schema.field(c) for c in columns]) if columns else schema).empty_table()
        unique = sorted(set(rows))
        try:
            table = self.dataset.take(unique, columns=columns)
        except (OSError, ValueError) as e:
            raise DatasetError(f"{self.uri}: reading rows failed ({_brief(e)})") from None
        where = {r: i for i, r in enumerate(unique)}
        return table.take(pa.array([where[r] for r in rows], type=pa.int64()))

    def iter_rows(self, batch_size: int = 512, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
        """Every row in order, as dicts."""
        for batch in self.dataset.to_batches(batch_size=batch_size, columns=columns, scan_in_order=True):
            yield from batch.to_pylist()

    def to_table(self, columns: list[str] | None = None) -> pa.Table:
        """Every row in order (all in memory: for tests and small datasets)."""
        return self.dataset.to_table(columns=columns, scan_in_order=True)


def read_rows(directory: str | os.PathLike, schema: pa.Schema | None = None) -> pa.Table:
    """All rows of ``directory``'s Lance dataset, in order."""
    return RowStore(directory, schema).to_table()


def iter_rows(directory: str | os.PathLike, schema: pa.Schema | None = None) -> Iterator[dict[str, Any]]:
    """The rows of ``directory``'s Lance dataset in order, as dicts (one batch in memory)."""
    return RowStore(directory, schema).iter_rows()


def _brief(e: BaseException) -> str:
    """An exception's first line (Lance's errors carry long backtraces), secrets scrubbed."""
    from tasks.io.s3 import scrub_secrets

    text = scrub_secrets(str(e)).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
