"""Ingest readers of the binary formats: WebDataset tar shards (consecutive members sharing a key are
one sample) and Parquet files in ``RECORD_SCHEMA`` (schema checked per file before any row is read).
Same contract as the JSON readers in ``tasks/data/ingest_readers.py``.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.data.ingest_checks import Reject, check_text, decode_text, image_from_bytes
from tasks.data.ingest_common import IngestConfig, Item, content_parent, id_of, input_files, make_record
from tasks.data.io import DatasetError
from tasks.data.schema import IMAGE_TOKEN, RECORD_SCHEMA
from tasks.io.manifest import Parent

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def webdataset_reader(src: Path, cfg: IngestConfig) -> tuple[list[Parent], Iterator[Item]]:
    files = input_files(src, (".tar",))

    def items() -> Iterator[Item]:
        for tar in files:
            for key, members in _wds_samples(tar):
                shown = key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                where = f"{tar.name}[key {shown}]"
                err = None
                if shown != key:  # tarfile maps undecodable name bytes to surrogates: no usable id
                    err = Reject("bad_utf8", where, "key", "member name is not valid UTF-8")
                build = lambda m=members, t=tar, k=key, w=where: _wds_record(m, t, k, w, cfg)  # noqa: E731
                yield Item(where, None if err else key, build, sorted(members), err)

    return [content_parent(files, src)], items()


def _wds_record(members: dict[str, bytes], tar: Path, key: str, where: str, cfg: IngestConfig) -> dict:
    """One WebDataset sample (an image member + a .txt or .json caption) as a caption record."""
    imgs = [e for e in members if e.lower() in IMAGE_EXTS]
    if not imgs:
        raise Reject(
            "missing_field", where, "image", f"no .jpg/.jpeg/.png/.webp member (have {sorted(members)})"
        )
    if len(imgs) > 1:
        raise Reject("bad_field", where, "image", f"several image members {sorted(imgs)}; expected one")
    if "txt" in members:
        cap = check_text(decode_text(members["txt"], where, "txt"), where, "txt")
    elif "json" in members:
        try:
            obj = json.loads(decode_text(members["json"], where, "json"))
        except json.JSONDecodeError as e:
            raise Reject("bad_json", where, "json", f"malformed JSON ({e.msg} at column {e.colno})") from None
        field = next((k for k in ("caption", "text") if isinstance(obj, dict) and k in obj), None)
        if field is None:
            raise Reject("missing_field", where, "json", "no 'caption' or 'text' key")
        cap = check_text(obj[field], where, f"json.{field}")
    else:
        raise Reject("missing_field", where, "txt", "no .txt or .json caption member")
    img = image_from_bytes(members[imgs[0]], where, imgs[0], cfg.max_image_pixels)
    meta = {"ingest": {"format": "webdataset", "file": tar.name, "key": key, "members": sorted(members)}}
    return make_record(cfg, "caption", key, [img], meta, text=IMAGE_TOKEN + cap.strip())


def _wds_samples(tar: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of consecutive members sharing a key (the WebDataset convention)."""
    key, members = None, {}
    try:
        with tarfile.open(tar, mode="r:*") as tf:
            for m in tf:
                base = posixpath.basename(m.name)
                if not m.isfile() or base.startswith(".") or "." not in base:
                    continue  # directories, links and hidden files are not sample members
                stem, ext = base.split(".", 1)
                k = posixpath.join(posixpath.dirname(m.name), stem)
                if k != key and key is not None:
                    yield key, members
                    members = {}
                key = k
                members[ext.lower()] = tf.extractfile(m).read()  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DatasetError(f"{tar}: not a readable tar archive ({type(e).__name__}: {e})") from None
    if key is not None:
        yield key, members


def _loose(t: pa.DataType) -> pa.DataType:
    """The type with every nested field nullable (nullability is not part of the schema check)."""
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _loose(f.type)) for f in t])
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.list_(_loose(t.value_type))
    return t


def parquet_reader(src: Path, cfg: IngestConfig) -> tuple[list[Parent], Iterator[Item]]:
    files = input_files(src, (".parquet",))
    want = {f.name: _loose(f.type) for f in RECORD_SCHEMA}
    for f in files:
        try:
            schema = pq.read_schema(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetError(f"{f}: not a readable Parquet file ({e})") from None
        missing, extra = sorted(set(want) - set(schema.names)), sorted(set(schema.names) - set(want))
        if missing or extra:
            raise DatasetError(f"{f}: not in RECORD_SCHEMA: missing columns {missing}, extra columns {extra}")
        for fld in schema:
            if _loose(fld.type) != want[fld.name]:
                raise DatasetError(f"{f}: column '{fld.name}' has type {fld.type}, expected {want[fld.name]}")

    def build(row: dict, f: Path, n: int, where: str) -> dict:
        images = []
        for k, im in enumerate(row["images"] or []):
            if not isinstance(im, dict):
                raise Reject("bad_field", where, f"images[{k}]", "null image entry")
            got = image_from_bytes(im["data"] or b"", where, f"images[{k}]", cfg.max_image_pixels)
            if (got["width"], got["height"], got["format"]) != (im["width"], im["height"], im["format"]):
                raise Reject(
                    "bad_image",
                    where,
                    f"images[{k}]",
                    f"declared {im['width']}x{im['height']} {im['format']}, "
                    f"decodes as {got['width']}x{got['height']} {got['format']}",
                )
            images.append(got)
        try:
            meta = json.loads(row["meta"] or "{}")
        except json.JSONDecodeError as e:
            raise Reject("bad_field", where, "meta", f"not JSON ({e.msg})") from None
        if not isinstance(meta, dict):
            raise Reject("bad_field", where, "meta", f"expected a JSON object, got {type(meta).__name__}")
        meta["ingest"] = {"format": "parquet", "file": f.name, "row": n}
        return {
            **row,
            "kind": cfg.kind or row["kind"],
            "source": row["source"] or cfg.source,
            "images": images,
            "meta": json.dumps(meta, sort_keys=True, ensure_ascii=False),
        }

    def items() -> Iterator[Item]:
        for f in files:
            n = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    where = f"{f.name}[row {n}]"
                    rid, err = id_of(row, where, required=True)
                    raw = {k: v for k, v in row.items() if k != "images"}
                    yield Item(where, rid, lambda r=row, f=f, n=n, w=where: build(r, f, n, w), raw, err)
                    n += 1

    return [content_parent(files, src)], items()
