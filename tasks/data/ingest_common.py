"""Shared pieces of the ingest step: ``IngestConfig``, and for the readers (``tasks/data/ingest_readers.py``, ``ingest_binary.py``): the
``Item`` each reader yields per input row, file listing and name checks, the parents' content hashes
(for the skip rule), strict JSON loading, and the record/id helpers every format uses.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.data.images import MAX_PIXELS
from tasks.data.ingest_checks import Reject, check_utf8
from tasks.data.io import DEFAULT_ROWS_PER_SHARD, DatasetError
from tasks.data.schema import KINDS
from tasks.io.manifest import Parent, sha256_file


class IngestConfig(BaseModel):
    """How to read one user dataset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["llava", "coco", "jsonl", "webdataset", "parquet"] = Field(description="input format")
    source: str = Field(
        "user",
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9_.\-]+$",
        description="dataset name written to each record's `source`",
    )
    kind: str | None = Field(
        None, description="record kind; None = the format's default (parquet: keep each row's)"
    )
    image_root: Path | None = Field(
        None, description="folder image paths are relative to (llava/coco); None = the JSON's folder"
    )
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, le=MAX_PIXELS, description="images with more pixels are quarantined"
    )
    rows_per_shard: int = Field(DEFAULT_ROWS_PER_SHARD, ge=1, description="rows per Parquet shard")

    @field_validator("kind")
    @classmethod
    def _kind_known(cls, v: str | None) -> str | None:
        if v is not None and v not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {v!r}")
        return v


@dataclass
class Item:
    """One input row: where it is, its id (or why it has none), and how to build its record."""

    where: str
    id: str | None
    build: Callable[[], dict[str, Any]]
    raw: Any
    id_error: Reject | None = None


def check_path_name(path: Path, what: str = "file") -> None:
    """File names end up in records' ``meta`` and in quarantine reasons, which are UTF-8: refuse others."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        try:  # show the file system's bytes (b'caf\xe9' -> caf\xe9)
            shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            shown = str(path).encode("utf-8", "backslashreplace").decode("utf-8")
        raise DatasetError(f"{shown}: {what} name is not valid UTF-8; rename it") from None


def input_files(src: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if src.is_file():
        return [src]
    files = sorted(p for p in src.iterdir() if p.is_file() and p.name.lower().endswith(suffixes))
    if not files:
        raise DatasetError(f"{src}: no input files ending in {suffixes}")
    for f in files:
        check_path_name(f)
    return files


def content_parent(files: list[Path], uri: Path) -> Parent:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return Parent(uri=str(uri.resolve()), content_hash=h.hexdigest())


def images_parent(root: Path, rels: list[str]) -> Parent:
    h = hashlib.sha256()
    for rel in sorted(set(rels)):
        p = root / rel
        st = p.stat() if isinstance(rel, str) and p.is_file() else None
        line = f"{rel}\0{st.st_size if st else -1}\0{st.st_mtime_ns if st else -1}\n"
        h.update(line.encode("utf-8", "surrogatepass"))  # a bad path is quarantined later, not a crash here
    return Parent(uri=str(root), content_hash=f"stat:{h.hexdigest()}")


def load_json(path: Path, expected: str) -> Any:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 (bad byte at offset {e.start}); expected {expected}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg}); expected {expected}"
        ) from None


def make_record(
    cfg: IngestConfig, kind: str, rid: str, images: list, meta: dict, *, text=None, messages=None
) -> dict:
    return {
        "id": rid,
        "kind": cfg.kind or kind,
        "source": cfg.source,
        "text": text,
        "messages": messages,
        "images": images,
        "media_kind": "image" if images else "none",
        "meta": json.dumps(meta, sort_keys=True, ensure_ascii=False),
    }


def id_of(obj: dict, where: str, required: bool) -> tuple[str | None, Reject | None]:
    v = obj.get("id")
    if v is None or v == "":
        return None, Reject("missing_field", where, "id", "required field is missing") if required else None
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        return None, Reject("bad_field", where, "id", f"expected a string or integer, got {type(v).__name__}")
    try:
        check_utf8(v, where, "id")
    except Reject as r:  # an id that cannot be stored is no id: the row is quarantined under its place
        return None, r
    return str(v), None
