"""Per-row checks shared by the ingest readers (``tasks/data/ingest.py``).

A failed check raises ``Reject``, whose ``reason`` reads ``<rule>: <where> field '<field>': <detail>``, e.g.
``missing_image: train.json[row 3] field 'image': 'imgs/a.png' does not exist under /data/imgs``. Rules:

- ``missing_field``, ``bad_field`` (wrong type/shape), ``bad_role``, ``bad_turns`` (role order);
- ``path_traversal`` (absolute path, or a path that resolves outside the image root, symlinks included),
  ``missing_image``, ``bad_image`` (undecodable/truncated, or declared size differs), ``oversized_image``;
- ``bad_utf8`` (bytes that are not UTF-8, or lone surrogates from JSON escapes, in text, id or meta),
  ``empty_text``; ``bad_field`` also covers a ``meta`` holding NaN/Infinity (not JSON);
- ``placeholder_mismatch`` (``<image>`` count != images, or a video without exactly one ``<video>``);
- ``duplicate_id``, ``bad_json`` (a malformed JSON member inside a sample, or a JSONL line that is not a
  JSON object), ``unsupported``.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from tasks.data.images import ImageDecodeError, decode_image, encode_image
from tasks.data.schema import IMAGE_TOKEN, KINDS, MEDIA_KINDS, ROLES, VIDEO_TOKEN

_PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}


class Reject(Exception):
    """A row that goes to quarantine; ``reason`` names the rule, the row, the field and the value."""

    def __init__(self, rule: str, where: str, field: str, detail: str):
        self.rule, self.field, self.detail = rule, field, detail
        self.reason = f"{rule}: {where} field '{field}': {detail}"
        super().__init__(self.reason)


def check_text(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise Reject("bad_field", where, field, f"expected a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Reject(
            "bad_utf8", where, field, f"not valid UTF-8 ({e.reason} at character {e.start})"
        ) from None
    if not value.strip():
        raise Reject("empty_text", where, field, "text is empty or whitespace only")
    return value


def decode_text(data: bytes, where: str, field: str) -> str:
    """Strict UTF-8 decoding of raw bytes; the reason names the first bad byte and its offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = data[e.start : e.start + 1].hex()
        raise Reject(
            "bad_utf8", where, field, f"invalid UTF-8 byte 0x{bad} at byte offset {e.start}"
        ) from None


def image_from_bytes(data: bytes, where: str, field: str, max_pixels: int) -> dict[str, Any]:
    """Validate encoded bytes (header size cap, then a full decode) -> ``IMAGE_STRUCT`` dict.

    PNG/JPEG/WebP bytes are kept as they are (no re-encoding loss); other formats become PNG.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                (w, h), pil_fmt = probe.size, probe.format
    except Image.DecompressionBombError as e:
        raise Reject("oversized_image", where, field, str(e)) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise Reject("bad_image", where, field, f"unreadable image ({type(e).__name__}: {e})") from None
    if w * h > max_pixels:
        raise Reject(
            "oversized_image", where, field, f"{w}x{h} = {w * h} pixels exceeds max_image_pixels={max_pixels}"
        )
    try:
        img = decode_image(data, max_pixels=max_pixels)
    except ImageDecodeError as e:
        raise Reject("bad_image", where, field, str(e)) from None
    fmt = _PIL_FORMATS.get(pil_fmt or "")
    if fmt is None:
        return encode_image(img, "png")
    return {"data": data, "width": w, "height": h, "format": fmt}


def image_from_file(
    root: Path, rel: Any, where: str, field: str, max_pixels: int
) -> tuple[dict[str, Any], str]:
    """Load ``root / rel`` after checking it stays inside ``root`` (``root`` must be resolved)."""
    if not isinstance(rel, str) or not rel.strip():
        raise Reject("bad_field", where, field, f"expected a relative image path, got {rel!r}")
    check_utf8(rel, where, field)
    if "\0" in rel:
        raise Reject("bad_field", where, field, f"image path {rel!r} contains a NUL byte")
    p = Path(rel)
    if p.is_absolute():
        raise Reject(
            "path_traversal", where, field, f"absolute path {rel!r} not allowed (must be relative to {root})"
        )
    resolved = (root / p).resolve()
    if not resolved.is_relative_to(root):
        raise Reject(
            "path_traversal", where, field, f"{rel!r} resolves to {resolved}, outside the image root {root}"
        )
    if not resolved.is_file():
        raise Reject("missing_image", where, field, f"{rel!r} does not exist under {root}")
    return image_from_bytes(resolved.read_bytes(), where, field, max_pixels), rel


def check_messages(msgs: Any, where: str, field: str = "messages") -> list[dict[str, str]]:
    """ChatML turns: optional system first, then user/assistant alternating, at least one answer."""
    if not isinstance(msgs, list) or not msgs:
        raise Reject("bad_field", where, field, f"expected a non-empty list of turns, got {_short(msgs)}")
    out = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise Reject("bad_field", where, f"{field}[{k}]", f"expected {{role, content}}, got {_short(m)}")
        if m["role"] not in ROLES:
            raise Reject("bad_role", where, f"{field}[{k}].role", f"{m['role']!r} is not one of {ROLES}")
        out.append({"role": m["role"], "content": check_text(m["content"], where, f"{field}[{k}].content")})
    roles = [m["role"] for m in out]
    body = roles[1:] if roles[0] == "system" else roles
    for k, r in enumerate(body):
        want = "user" if k % 2 == 0 else "assistant"
        if r != want:
            raise Reject(
                "bad_turns", where, field, f"turn roles {roles} must be [system], user, assistant, ..."
            )
    if "assistant" not in body:
        raise Reject("bad_turns", where, field, f"turn roles {roles} contain no assistant answer")
    return out


def validate_record(rec: dict[str, Any], where: str) -> None:
    """Record-level rules every accepted row satisfies, whatever its format."""
    if rec["kind"] not in KINDS:
        raise Reject("bad_field", where, "kind", f"{rec['kind']!r} is not one of {KINDS}")
    if rec["media_kind"] not in MEDIA_KINDS:
        raise Reject("bad_field", where, "media_kind", f"{rec['media_kind']!r} is not one of {MEDIA_KINDS}")
    if (rec["text"] is None) == (rec["messages"] is None):
        raise Reject("bad_field", where, "text", "exactly one of text and messages must be set")
    if rec["text"] is not None:
        strings = [check_text(rec["text"], where, "text")]
    else:
        strings = [m["content"] for m in check_messages(rec["messages"], where)]
    n_img = sum(s.count(IMAGE_TOKEN) for s in strings)
    n_vid = sum(s.count(VIDEO_TOKEN) for s in strings)
    n = len(rec["images"])
    if rec["media_kind"] == "video":
        if n_vid != 1 or n_img != 0 or n == 0:
            raise Reject(
                "placeholder_mismatch",
                where,
                "text",
                f"a video needs one {VIDEO_TOKEN} and >= 1 frame; "
                f"found {n_vid} {VIDEO_TOKEN}, {n_img} {IMAGE_TOKEN}, {n} frames",
            )
    else:
        if n_img != n or n_vid:
            raise Reject(
                "placeholder_mismatch",
                where,
                "text",
                f"found {n_img} {IMAGE_TOKEN} placeholders and {n_vid} {VIDEO_TOKEN} for {n} images",
            )
        if rec["media_kind"] != ("image" if n else "none"):
            raise Reject("bad_field", where, "media_kind", f"{rec['media_kind']!r} with {n} images")
    check_utf8(rec["id"], where, "id")
    check_utf8(rec["meta"], where, "meta")
    try:
        meta = json.loads(rec["meta"], parse_constant=_no_constant)
    except (TypeError, ValueError) as e:
        raise Reject("bad_field", where, "meta", f"not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise Reject("bad_field", where, "meta", f"expected a JSON object, got {type(meta).__name__}")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value (NaN and Infinity are not allowed)")


def check_utf8(value: Any, where: str, field: str) -> None:
    """A string that cannot be stored as UTF-8 (lone surrogates, e.g. from a ``\\ud800`` JSON escape)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise Reject(
                "bad_utf8", where, field, f"not valid UTF-8 ({e.reason} at character {e.start})"
            ) from None


def _short(v: Any, n: int = 80) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def excerpt(v: Any, n: int = 2000) -> str:
    """An ASCII-safe excerpt of a raw input (bytes shown as their size) for quarantine ``meta``."""
    if isinstance(v, bytes):
        return v[:n].decode("utf-8", "backslashreplace")
    s = json.dumps(
        v,
        ensure_ascii=True,
        sort_keys=True,
        default=lambda o: f"<{type(o).__name__} {len(o)}>" if hasattr(o, "__len__") else repr(o),
    )
    return s[:n]
