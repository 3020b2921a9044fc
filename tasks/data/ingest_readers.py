"""Format readers of the ingest step (``tasks/data/ingest.py``): each turns ``src`` into the parents
(for the skip rule) and a stream of ``Item``s, one per input row, whose ``build()`` returns a record or
raises ``Reject`` (see ``tasks/data/ingest_checks.py``). Whole-file problems raise ``DatasetError``.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.data.ingest_checks import (
    Reject,
    check_messages,
    check_text,
    check_utf8,
    decode_text,
    image_from_bytes,
    image_from_file,
)
from tasks.data.io import DatasetError
from tasks.data.schema import IMAGE_TOKEN, RECORD_SCHEMA
from tasks.manifest import Parent, sha256_file

if TYPE_CHECKING:
    from tasks.data.ingest import IngestConfig

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


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


def _files(src: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if src.is_file():
        return [src]
    files = sorted(p for p in src.iterdir() if p.is_file() and p.name.lower().endswith(suffixes))
    if not files:
        raise DatasetError(f"{src}: no input files ending in {suffixes}")
    for f in files:
        check_path_name(f)
    return files


def _content_parent(files: list[Path], uri: Path) -> Parent:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return Parent(uri=str(uri.resolve()), content_hash=h.hexdigest())


def _images_parent(root: Path, rels: list[str]) -> Parent:
    h = hashlib.sha256()
    for rel in sorted(set(rels)):
        p = root / rel
        st = p.stat() if isinstance(rel, str) and p.is_file() else None
        line = f"{rel}\0{st.st_size if st else -1}\0{st.st_mtime_ns if st else -1}\n"
        h.update(line.encode("utf-8", "surrogatepass"))  # a bad path is quarantined later, not a crash here
    return Parent(uri=str(root), content_hash=f"stat:{h.hexdigest()}")


def _load_json(path: Path, expected: str) -> Any:
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


def _record(
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


def _id_of(obj: dict, where: str, required: bool) -> tuple[str | None, Reject | None]:
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


# ---------------------------------------------------------------------------------------------- readers


def _llava(src: Path, cfg: IngestConfig) -> tuple[list[Parent], Iterator[Item]]:
    data = _load_json(src, "a JSON list of LLaVA samples")
    if not isinstance(data, list):
        raise DatasetError(f"{src}: expected a JSON list of LLaVA samples, got a JSON {type(data).__name__}")
    root = (cfg.image_root or src.parent).resolve()
    rels = [r for s in data if isinstance(s, dict) for r in _llava_paths(s) if isinstance(r, str)]

    def build(s: dict, i: int, where: str, rid: str) -> dict:
        if "video" in s:
            raise Reject("unsupported", where, "video", "video samples are not supported by the llava reader")
        conv = s.get("conversations")
        if conv is None:
            raise Reject("missing_field", where, "conversations", "required field is missing")
        if not isinstance(conv, list) or not conv:
            raise Reject("bad_field", where, "conversations", "expected a non-empty list of turns")
        msgs = []
        for k, turn in enumerate(conv):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise Reject(
                    "bad_field", where, f"conversations[{k}]", "expected an object with 'from' and 'value'"
                )
            role = _LLAVA_ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
            if role is None:
                raise Reject(
                    "bad_role",
                    where,
                    f"conversations[{k}].from",
                    f"{turn['from']!r}; expected human, gpt or system",
                )
            msgs.append(
                {"role": role, "content": check_text(turn["value"], where, f"conversations[{k}].value")}
            )
        if "image" in s and "images" in s:
            raise Reject("bad_field", where, "image", "both 'image' and 'images' are set")
        paths = _llava_paths(s)
        field = "images" if "images" in s else "image"
        images = []
        for k, p in enumerate(paths):
            name = f"{field}[{k}]" if len(paths) > 1 else field
            images.append(image_from_file(root, p, where, name, cfg.max_image_pixels)[0])
        meta: dict[str, Any] = {
            "ingest": {"format": "llava", "file": src.name, "row": i, "image_files": paths}
        }
        if images and not any(IMAGE_TOKEN in m["content"] for m in msgs):
            first_user = next((m for m in msgs if m["role"] == "user"), None)
            if first_user is not None:  # (no user turn: check_messages rejects it below)
                first_user["content"] = IMAGE_TOKEN * len(images) + "\n" + first_user["content"]
                meta["ingest"]["placeholders_added"] = len(images)
        return _record(cfg, "sft", rid, images, meta, messages=msgs)

    def items() -> Iterator[Item]:
        for i, s in enumerate(data):
            where = f"{src.name}[row {i}]"
            if not isinstance(s, dict):
                err = Reject("bad_field", where, "<row>", f"expected a JSON object, got {type(s).__name__}")
                yield Item(where, None, dict, s, err)
                continue
            rid, err = _id_of(s, where, required=True)
            yield Item(where, rid, lambda s=s, i=i, w=where, r=rid: build(s, i, w, r), s, err)

    return [_content_parent([src], src), _images_parent(root, rels)], items()


def _llava_paths(s: dict) -> list:
    v = s.get("images", s.get("image"))
    if v is None:
        return []
    return list(v) if isinstance(v, list) else [v]


def _coco(src: Path, cfg: IngestConfig) -> tuple[list[Parent], Iterator[Item]]:
    what = "a COCO captions object with 'images' and 'annotations' lists"
    data = _load_json(src, what)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise DatasetError(f"{src}: expected {what}")
    root = (cfg.image_root or src.parent).resolve()
    by_id: dict[Any, tuple[int, dict]] = {}
    for pos, im in enumerate(data["images"]):
        if isinstance(im, dict) and "id" in im:
            if im["id"] in by_id:
                raise DatasetError(f"{src}: image id {im['id']!r} appears twice in 'images'")
            by_id[im["id"]] = (pos, im)
    anns = data["annotations"]
    n_img = len(data["images"])

    def image_pos(a: Any) -> int:  # group annotations by image (each image is read once); orphans last
        return by_id[a["image_id"]][0] if isinstance(a, dict) and a.get("image_id") in by_id else n_img

    order = sorted(range(len(anns)), key=lambda k: (image_pos(anns[k]), k))
    rels = [im.get("file_name") for _, im in by_id.values() if isinstance(im.get("file_name"), str)]
    cache: dict[str, Any] = {}

    def load(image_id: Any, where: str) -> tuple[dict, str]:
        if cache.get("id") != image_id or "id" not in cache:
            cache.clear()
            cache["id"] = image_id
            try:
                cache["ok"] = image_from_file(
                    root, by_id[image_id][1].get("file_name"), where, "file_name", cfg.max_image_pixels
                )
            except Reject as r:
                cache["err"] = r
        if "err" in cache:  # the same image failed for an earlier caption: same reason, this row's place
            raise Reject(cache["err"].rule, where, "file_name", cache["err"].detail)
        return cache["ok"]

    def build(a: dict, k: int, where: str, rid: str) -> dict:
        if "image_id" not in a:
            raise Reject("missing_field", where, "image_id", "required field is missing")
        if "caption" not in a:
            raise Reject("missing_field", where, "caption", "required field is missing")
        cap = check_text(a["caption"], where, "caption")
        if a["image_id"] not in by_id:
            raise Reject(
                "missing_image", where, "image_id", f"no entry with id {a['image_id']!r} in 'images'"
            )
        img, rel = load(a["image_id"], where)
        meta = {
            "ingest": {
                "format": "coco",
                "file": src.name,
                "annotation": k,
                "image_id": a["image_id"],
                "file_name": rel,
            }
        }
        return _record(cfg, "caption", rid, [img], meta, text=IMAGE_TOKEN + cap.strip())

    def items() -> Iterator[Item]:
        for k in order:
            a, where = anns[k], f"{src.name}[annotation {k}]"
            if not isinstance(a, dict):
                yield Item(
                    where, None, dict, a, Reject("bad_field", where, "<row>", "expected a JSON object")
                )
                continue
            rid, err = _id_of(a, where, required=False)
            rid = rid if rid is not None or err else f"{src.stem}-{k}"
            yield Item(where, rid, lambda a=a, k=k, w=where, r=rid: build(a, k, w, r), a, err)

    return [_content_parent([src], src), _images_parent(root, rels)], items()


def _jsonl(src: Path, cfg: IngestConfig) -> tuple[list[Parent], Iterator[Item]]:
    files = _files(src, (".jsonl",))

    def build(obj: dict, f: Path, n: int, where: str, rid: str) -> dict:
        meta = obj.get("meta", {})
        if not isinstance(meta, dict):
            raise Reject("bad_field", where, "meta", f"expected a JSON object, got {type(meta).__name__}")
        meta = {**meta, "ingest": {"format": "jsonl", "file": f.name, "line": n}}
        if ("text" in obj) == ("messages" in obj):
            raise Reject("missing_field", where, "text", "exactly one of 'text' and 'messages' is required")
        if "text" in obj:
            return _record(cfg, "text", rid, [], meta, text=check_text(obj["text"], where, "text"))
        msgs = [{"role": m["role"], "content": m["content"]} for m in check_messages(obj["messages"], where)]
        return _record(cfg, "sft", rid, [], meta, messages=msgs)

    def items() -> Iterator[Item]:
        for f in files:
            with open(f, "rb") as fh:
                lines = list(enumerate(fh, start=1))
            for n, line in lines:
                line = line.rstrip(b"\r\n")
                if not line.strip():
                    continue
                where = f"{f.name}:line {n}"
                try:
                    text = decode_text(line, where, "<line>")
                except Reject as r:
                    yield Item(where, None, dict, line, r)
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DatasetError(
                        f"{f}: line {n}: malformed JSON ({e.msg} at column {e.colno}); expected one JSON object per line"
                    ) from None
                if not isinstance(obj, dict):
                    raise DatasetError(
                        f"{f}: line {n}: expected a JSON object, got a JSON {type(obj).__name__}"
                    )
                rid, err = _id_of(obj, where, required=False)
                rid = rid if rid is not None or err else f"{f.stem}-{n:07d}"
                yield Item(where, rid, lambda o=obj, f=f, n=n, w=where, r=rid: build(o, f, n, w, r), obj, err)

    return [_content_parent(files, src)], items()


def _webdataset(src: Path, cfg: IngestConfig) -> tuple[list[Parent], Iterator[Item]]:
    files = _files(src, (".tar",))

    def build(members: dict[str, bytes], tar: Path, key: str, where: str) -> dict:
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
                raise Reject(
                    "bad_json", where, "json", f"malformed JSON ({e.msg} at column {e.colno})"
                ) from None
            field = next((k for k in ("caption", "text") if isinstance(obj, dict) and k in obj), None)
            if field is None:
                raise Reject("missing_field", where, "json", "no 'caption' or 'text' key")
            cap = check_text(obj[field], where, f"json.{field}")
        else:
            raise Reject("missing_field", where, "txt", "no .txt or .json caption member")
        img = image_from_bytes(members[imgs[0]], where, imgs[0], cfg.max_image_pixels)
        meta = {"ingest": {"format": "webdataset", "file": tar.name, "key": key, "members": sorted(members)}}
        return _record(cfg, "caption", key, [img], meta, text=IMAGE_TOKEN + cap.strip())

    def samples(tar: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
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

    def items() -> Iterator[Item]:
        for tar in files:
            for key, members in samples(tar):
                shown = key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                where = f"{tar.name}[key {shown}]"
                err = None
                if shown != key:  # tarfile maps undecodable name bytes to surrogates: no usable id
                    err = Reject("bad_utf8", where, "key", "member name is not valid UTF-8")
                yield Item(
                    where,
                    None if err else key,
                    lambda m=members, t=tar, k=key, w=where: build(m, t, k, w),
                    sorted(members),
                    err,
                )

    return [_content_parent(files, src)], items()


def _loose(t: pa.DataType) -> pa.DataType:
    """The type with every nested field nullable (nullability is not part of the schema check)."""
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _loose(f.type)) for f in t])
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.list_(_loose(t.value_type))
    return t


def _parquet(src: Path, cfg: IngestConfig) -> tuple[list[Parent], Iterator[Item]]:
    files = _files(src, (".parquet",))
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
                    rid, err = _id_of(row, where, required=True)
                    raw = {k: v for k, v in row.items() if k != "images"}
                    yield Item(where, rid, lambda r=row, f=f, n=n, w=where: build(r, f, n, w), raw, err)
                    n += 1

    return [_content_parent(files, src)], items()


READERS = {"llava": _llava, "coco": _coco, "jsonl": _jsonl, "webdataset": _webdataset, "parquet": _parquet}
