"""Format readers of the ingest step (``tasks/data/ingest.py``): each turns ``src`` into the parents
(for the skip rule) and a stream of ``Item``s, one per input row, whose ``build()`` returns a record or
raises ``Reject`` (see ``tasks/data/ingest_checks.py``). Whole-file problems raise ``DatasetError``.
The JSON formats (LLaVA, COCO captions, JSONL) live here; WebDataset tars and Parquet in
``tasks/data/ingest_binary.py``; shared helpers in ``tasks/data/ingest_common.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.data.ingest_binary import parquet_reader, webdataset_reader
from tasks.data.ingest_checks import Reject, check_messages, check_text, decode_text, image_from_file
from tasks.data.ingest_common import (
    IngestConfig,
    Item,
    check_path_name,
    content_parent,
    id_of,
    images_parent,
    input_files,
    load_json,
    make_record,
)
from tasks.data.io import DatasetError
from tasks.data.schema import IMAGE_TOKEN
from tasks.io.manifest import Parent

__all__ = ["READERS", "Item", "check_path_name"]

_LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def _llava(src: Path, cfg: IngestConfig) -> tuple[list[Parent], Iterator[Item]]:
    data = load_json(src, "a JSON list of LLaVA samples")
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
        return make_record(cfg, "sft", rid, images, meta, messages=msgs)

    def items() -> Iterator[Item]:
        for i, s in enumerate(data):
            where = f"{src.name}[row {i}]"
            if not isinstance(s, dict):
                err = Reject("bad_field", where, "<row>", f"expected a JSON object, got {type(s).__name__}")
                yield Item(where, None, dict, s, err)
                continue
            rid, err = id_of(s, where, required=True)
            yield Item(where, rid, lambda s=s, i=i, w=where, r=rid: build(s, i, w, r), s, err)

    return [content_parent([src], src), images_parent(root, rels)], items()


def _llava_paths(s: dict) -> list:
    v = s.get("images", s.get("image"))
    if v is None:
        return []
    return list(v) if isinstance(v, list) else [v]


def _coco(src: Path, cfg: IngestConfig) -> tuple[list[Parent], Iterator[Item]]:
    what = "a COCO captions object with 'images' and 'annotations' lists"
    data = load_json(src, what)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise DatasetError(f"{src}: expected {what}")
    reader = _CocoReader(src, cfg, data)
    rels = [im.get("file_name") for _, im in reader.by_id.values() if isinstance(im.get("file_name"), str)]
    return [content_parent([src], src), images_parent(reader.root, rels)], reader.items()


class _CocoReader:
    """The annotations of one COCO captions file as items, grouped by image (each image read once)."""

    def __init__(self, src: Path, cfg: IngestConfig, data: dict[str, Any]) -> None:
        self.src, self.cfg, self.anns = src, cfg, data["annotations"]
        self.root = (cfg.image_root or src.parent).resolve()
        self.by_id: dict[Any, tuple[int, dict]] = {}
        for pos, im in enumerate(data["images"]):
            if isinstance(im, dict) and "id" in im:
                if im["id"] in self.by_id:
                    raise DatasetError(f"{src}: image id {im['id']!r} appears twice in 'images'")
                self.by_id[im["id"]] = (pos, im)
        self.n_img = len(data["images"])
        self.cache: dict[str, Any] = {}

    def image_pos(self, a: Any) -> int:  # orphans last
        return (
            self.by_id[a["image_id"]][0]
            if isinstance(a, dict) and a.get("image_id") in self.by_id
            else self.n_img
        )

    def load(self, image_id: Any, where: str) -> tuple[dict, str]:
        cache = self.cache
        if cache.get("id") != image_id or "id" not in cache:
            cache.clear()
            cache["id"] = image_id
            try:
                rel = self.by_id[image_id][1].get("file_name")
                cache["ok"] = image_from_file(self.root, rel, where, "file_name", self.cfg.max_image_pixels)
            except Reject as r:
                cache["err"] = r
        if "err" in cache:  # the same image failed for an earlier caption: same reason, this row's place
            raise Reject(cache["err"].rule, where, "file_name", cache["err"].detail)
        return cache["ok"]

    def build(self, a: dict, k: int, where: str, rid: str) -> dict:
        for name in ("image_id", "caption"):
            if name not in a:
                raise Reject("missing_field", where, name, "required field is missing")
        cap = check_text(a["caption"], where, "caption")
        if a["image_id"] not in self.by_id:
            raise Reject(
                "missing_image", where, "image_id", f"no entry with id {a['image_id']!r} in 'images'"
            )
        img, rel = self.load(a["image_id"], where)
        meta = {
            "ingest": {
                "format": "coco",
                "file": self.src.name,
                "annotation": k,
                "image_id": a["image_id"],
                "file_name": rel,
            }
        }
        return make_record(self.cfg, "caption", rid, [img], meta, text=IMAGE_TOKEN + cap.strip())

    def items(self) -> Iterator[Item]:
        order = sorted(range(len(self.anns)), key=lambda k: (self.image_pos(self.anns[k]), k))
        for k in order:
            a, where = self.anns[k], f"{self.src.name}[annotation {k}]"
            if not isinstance(a, dict):
                yield Item(
                    where, None, dict, a, Reject("bad_field", where, "<row>", "expected a JSON object")
                )
                continue
            rid, err = id_of(a, where, required=False)
            rid = rid if rid is not None or err else f"{self.src.stem}-{k}"
            yield Item(where, rid, lambda a=a, k=k, w=where, r=rid: self.build(a, k, w, r), a, err)


def _jsonl(src: Path, cfg: IngestConfig) -> tuple[list[Parent], Iterator[Item]]:
    files = input_files(src, (".jsonl",))

    def build(obj: dict, f: Path, n: int, where: str, rid: str) -> dict:
        meta = obj.get("meta", {})
        if not isinstance(meta, dict):
            raise Reject("bad_field", where, "meta", f"expected a JSON object, got {type(meta).__name__}")
        meta = {**meta, "ingest": {"format": "jsonl", "file": f.name, "line": n}}
        if ("text" in obj) == ("messages" in obj):
            raise Reject("missing_field", where, "text", "exactly one of 'text' and 'messages' is required")
        if "text" in obj:
            return make_record(cfg, "text", rid, [], meta, text=check_text(obj["text"], where, "text"))
        msgs = [{"role": m["role"], "content": m["content"]} for m in check_messages(obj["messages"], where)]
        return make_record(cfg, "sft", rid, [], meta, messages=msgs)

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
                # JSONL lines are independent records: a line that is not a JSON object (a syntax error,
                # a truncated last line) is quarantined like any bad row, with its text, and the rest go on
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    detail = (
                        f"malformed JSON ({e.msg} at column {e.colno}); expected one JSON object per line"
                    )
                    yield Item(where, None, dict, line, Reject("bad_json", where, "<line>", detail))
                    continue
                if not isinstance(obj, dict):
                    detail = f"expected a JSON object, got a JSON {type(obj).__name__}"
                    yield Item(where, None, dict, line, Reject("bad_json", where, "<line>", detail))
                    continue
                rid, err = id_of(obj, where, required=False)
                rid = rid if rid is not None or err else f"{f.stem}-{n:07d}"
                yield Item(where, rid, lambda o=obj, f=f, n=n, w=where, r=rid: build(o, f, n, w, r), obj, err)

    return [content_parent(files, src)], items()


READERS = {
    "llava": _llava,
    "coco": _coco,
    "jsonl": _jsonl,
    "webdataset": webdataset_reader,
    "parquet": parquet_reader,
}
