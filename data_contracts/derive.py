"""Per-row derived columns: what the expectation suites actually validate.

A record (``tasks/data/schema.RECORD_SCHEMA``) holds nested data (messages, image structs, a JSON ``meta``
string). Great Expectations works best on flat columns, so every record is first reduced to one row of
simple values (``derive_row``); the suites (``suites.py``) then stay plain row-level expectations such as
"``placeholders_match`` is in {True}" or "``text_chars`` is between 3 and 4000".

Conventions of the derived columns:

- a column that does not apply to a row is ``None`` (GX column-map expectations skip nulls), e.g.
  ``image_min_side`` of a text-only row, ``last_role`` of a ``text`` row, ``boxes_in_range`` of a caption;
- a check that applies but fails is ``False`` (never ``None``), so it cannot slip through as "missing";
- ``row`` is the record's 0-based position in the input; GX reports failing rows by this column.

Ground truth read from ``meta`` (JSON object):

- ``answer_verified`` (cot, synthetic_qa): the flag ``meta["verified"]`` (or
  ``meta["verification"]["verified"]``) is not False, and for ``cot`` with ``meta["answer"]`` the normalised
  answer appears in the last assistant turn after ``◁/think▷`` (the final answer, not the reasoning);
  without an answer the flag must be True;
- ``boxes_in_range`` (grounding): ``meta["boxes"]`` (else the ``box`` of each ``meta["objects"]`` entry) is
  a non-empty list of ``[x1, y1, x2, y2]`` (or dicts with ``box``/``bbox``) with ``x1 < x2``, ``y1 < y2``,
  inside the image. ``meta["box_format"]``: ``"xyxy_1000"`` (integers in [0, 1000], Kimi-VL's grounding
  convention and the default), ``"xyxy_norm"`` ([0, 1], assumed when every coordinate is <= 1) or
  ``"xyxy_pixel"`` (inside the first image's width/height).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from tasks.data.images import ImageDecodeError, decode_image, image_size
from tasks.data.schema import IMAGE_TOKEN, MEDIA_KINDS, ROLES, VIDEO_TOKEN
from tasks.data.special_tokens import SPECIAL_TOKENS, THINK_END, THINK_START

IMAGE_FORMATS = ("png", "jpeg", "webp")
# special-token strings a document must never contain literally (they would inject control tokens);
# the think markers are legitimate text of long-CoT traces
RESERVED_TOKENS = tuple(t for t in SPECIAL_TOKENS if t not in (THINK_START, THINK_END))

DERIVED_COLUMNS = (
    "row",
    "id",
    "kind",
    "source",
    "content_form",  # "text" | "messages" | "both" | "neither"
    "text_chars",  # characters of text / all message contents, placeholders removed
    "num_images",
    "num_image_placeholders",
    "num_video_placeholders",
    "placeholders_match",
    "media_kind",
    "num_frames",  # video rows only
    "image_min_side",
    "image_max_aspect",
    "image_max_pixels",
    "images_well_formed",  # bytes present, format known, not truncated, header size == declared size
    "meta_is_json_object",
    "has_reserved_tokens",
    "control_chars",  # control characters / U+FFFD in the text
    "num_turns",
    "roles_valid",
    "turns_nonempty",
    "last_role",
    "answer_verified",
    "boxes_in_range",
)

# C0/C1 controls except tab/newline/carriage return, and U+FFFD (a decoding failure upstream)
_CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd]")
_PLACEHOLDER_RE = re.compile(re.escape(IMAGE_TOKEN) + "|" + re.escape(VIDEO_TOKEN))


def normalize_answer(s: str) -> str:
    """Lower-case, strip punctuation at the ends, collapse whitespace (shared by contracts and QA)."""
    s = " ".join(str(s).lower().split())
    return s.strip(" .,;:!?\"'`()[]{}")


def parse_meta(meta: Any) -> dict[str, Any] | None:
    """``meta`` as a dict, or ``None`` when it is not a JSON object."""
    if isinstance(meta, dict):
        return meta
    if not isinstance(meta, str):
        return None
    try:
        obj = json.loads(meta)
    except (json.JSONDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _contents(record: dict[str, Any]) -> list[str]:
    out: list[str] = []
    text = record.get("text")
    if isinstance(text, str):
        out.append(text)
    for m in record.get("messages") or []:
        c = m.get("content") if isinstance(m, dict) else None
        if isinstance(c, str):
            out.append(c)
    return out


def _content_form(record: dict[str, Any]) -> str:
    has_text = record.get("text") is not None
    has_messages = record.get("messages") is not None
    if has_text and has_messages:
        return "both"
    if has_text:
        return "text"
    return "messages" if has_messages else "neither"


def _roles_valid(messages: list[Any]) -> bool:
    """Roles in ROLES; system only first; then user/assistant alternating, starting with user."""
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if not roles or any(r not in ROLES for r in roles):
        return False
    body = roles[1:] if roles[0] == "system" else roles
    if not body:
        return False
    expected = ("user", "assistant")
    return all(r == expected[i % 2] for i, r in enumerate(body))


def _placeholders_match(media_kind: Any, n_images: int, n_img_ph: int, n_vid_ph: int) -> bool:
    if media_kind == "none":
        return n_images == 0 and n_img_ph == 0 and n_vid_ph == 0
    if media_kind == "image":
        return n_images >= 1 and n_img_ph == n_images and n_vid_ph == 0
    if media_kind == "video":
        return n_images >= 1 and n_vid_ph == 1 and n_img_ph == 0
    return False


def complete_encoding(data: bytes, fmt: str) -> bool:
    """Cheap truncation check without decoding: the format's end marker / declared length is intact."""
    if fmt == "png":
        return data.startswith(b"\x89PNG") and data.endswith(b"IEND\xaeB`\x82")
    if fmt == "jpeg":
        return data.startswith(b"\xff\xd8") and data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if fmt == "webp":
        size = int.from_bytes(data[4:8], "little") + 8
        return data[:4] == b"RIFF" and data[8:12] == b"WEBP" and size <= len(data) <= size + 1
    return False


def _image_stats(images: list[Any], full_decode: bool) -> dict[str, Any]:
    if not images:
        return {
            "image_min_side": None,
            "image_max_aspect": None,
            "image_max_pixels": None,
            "images_well_formed": True,
        }
    sides, aspects, pixels, ok = [], [], [], True
    for im in images:
        if not isinstance(im, dict):
            ok = False
            continue
        w, h, data, fmt = im.get("width"), im.get("height"), im.get("data"), im.get("format")
        if not isinstance(w, int) or not isinstance(h, int) or w <= 0 or h <= 0:
            ok = False
            sides.append(0)
            continue
        sides.append(min(w, h))
        aspects.append(max(w, h) / min(w, h))
        pixels.append(w * h)
        if not data or fmt not in IMAGE_FORMATS or not complete_encoding(data, fmt):
            ok = False
            continue
        try:
            ok = ok and image_size(data) == (w, h)
            if full_decode:
                decode_image(data)
        except ImageDecodeError:
            ok = False
    return {
        "image_min_side": min(sides) if sides else 0,
        "image_max_aspect": max(aspects) if aspects else None,
        "image_max_pixels": max(pixels) if pixels else None,
        "images_well_formed": ok,
    }


def verified_flag(meta: dict[str, Any]) -> bool | None:
    """``meta["verified"]`` or ``meta["verification"]["verified"]`` (None when neither is there)."""
    if isinstance(meta.get("verified"), bool):
        return meta["verified"]
    v = meta.get("verification")
    if isinstance(v, dict) and isinstance(v.get("verified"), bool):
        return v["verified"]
    return None


def final_answer_text(record: dict[str, Any]) -> str | None:
    """The last assistant turn after the ``◁/think▷`` marker (the answer, not the reasoning)."""
    msgs = [m for m in record.get("messages") or [] if isinstance(m, dict) and m.get("role") == "assistant"]
    if not msgs or not isinstance(msgs[-1].get("content"), str):
        return None
    return msgs[-1]["content"].split(THINK_END)[-1]


def _answer_verified(record: dict[str, Any], meta: dict[str, Any] | None) -> bool:
    """Verified flag not False, answer (when in meta) present in the final answer, and at least one of them."""
    if meta is None:
        return False
    flag = verified_flag(meta)
    if flag is False:
        return False
    if "answer" in meta and record.get("kind") == "cot":
        final = final_answer_text(record)
        want = normalize_answer(str(meta["answer"]))
        pat = r"(?<![\w.])" + re.escape(want) + r"(?![\w]|\.\d)"
        return final is not None and bool(want) and re.search(pat, normalize_answer(final)) is not None
    return flag is True


def _box(b: Any) -> list[float] | None:
    if isinstance(b, dict):
        b = b.get("box", b.get("bbox"))
    if not isinstance(b, list | tuple) or len(b) != 4:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in b):
        return None
    return [float(v) for v in b]


BOX_RANGES = {"xyxy_norm": 1.0, "xyxy_1000": 1000.0}


def boxes_in_range(meta: dict[str, Any] | None, images: list[Any]) -> bool:
    """Every box of ``meta["boxes"]`` (else of ``meta["objects"][*]["box"]``) well-formed and inside the image."""
    if meta is None:
        return False
    raw = meta.get("boxes")
    if raw is None and isinstance(meta.get("objects"), list):
        raw = [o for o in meta["objects"] if isinstance(o, dict) and ("box" in o or "bbox" in o)]
    if not isinstance(raw, list) or not raw:
        return False
    boxes = [_box(b) for b in raw]
    if any(b is None for b in boxes):
        return False
    fmt = meta.get("box_format")
    if fmt is None:
        fmt = "xyxy_norm" if all(v <= 1.0 for b in boxes for v in b) else "xyxy_1000"  # type: ignore[union-attr]
    if fmt in BOX_RANGES:
        w = h = BOX_RANGES[fmt]
    elif fmt == "xyxy_pixel" and images and isinstance(images[0], dict):
        w, h = float(images[0].get("width") or 0), float(images[0].get("height") or 0)
    else:
        return False
    return all(0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h for b in boxes)  # type: ignore[index]


def derive_row(record: dict[str, Any], row: int, *, full_decode: bool = False) -> dict[str, Any]:
    """One flat row of ``DERIVED_COLUMNS`` for ``record`` (never raises on malformed input).

    ``full_decode`` also decodes every image (``images.decode_image``); by default images are checked by
    header size and end marker only (the filter step decodes them fully)."""
    contents = _contents(record)
    images = record.get("images")
    images = images if isinstance(images, list) else []
    messages = record.get("messages")
    meta = parse_meta(record.get("meta"))
    media_kind = record.get("media_kind")
    n_img_ph = sum(c.count(IMAGE_TOKEN) for c in contents)
    n_vid_ph = sum(c.count(VIDEO_TOKEN) for c in contents)
    kind = record.get("kind")
    out: dict[str, Any] = {
        "row": row,
        "id": None if record.get("id") is None else str(record.get("id")),
        "kind": kind,
        "source": None if record.get("source") is None else str(record.get("source")),
        "content_form": _content_form(record),
        "text_chars": sum(len(_PLACEHOLDER_RE.sub("", c).strip()) for c in contents),
        "num_images": len(images),
        "num_image_placeholders": n_img_ph,
        "num_video_placeholders": n_vid_ph,
        "placeholders_match": _placeholders_match(media_kind, len(images), n_img_ph, n_vid_ph),
        "media_kind": media_kind
        if media_kind in MEDIA_KINDS
        else (str(media_kind) if media_kind else "missing"),
        "num_frames": len(images) if media_kind == "video" else None,
        **_image_stats(images, full_decode),
        "meta_is_json_object": meta is not None,
        "has_reserved_tokens": any(t in c for c in contents for t in RESERVED_TOKENS),
        "control_chars": sum(len(_CONTROL_RE.findall(c)) for c in contents),
        "num_turns": len(messages) if isinstance(messages, list) else None,
        "roles_valid": _roles_valid(messages) if isinstance(messages, list) else None,
        "turns_nonempty": (
            all(isinstance(m, dict) and str(m.get("content") or "").strip() for m in messages)
            if isinstance(messages, list)
            else None
        ),
        "last_role": (
            (messages[-1].get("role") if isinstance(messages[-1], dict) else None) or "missing"
            if isinstance(messages, list) and messages
            else None
        ),
        "answer_verified": _answer_verified(record, meta) if kind in ("cot", "synthetic_qa") else None,
        "boxes_in_range": boxes_in_range(meta, images) if kind == "grounding" else None,
    }
    return out
