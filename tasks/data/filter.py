"""Filter step: rule-based quality filtering of record datasets (accepted / quarantined, nothing dropped).

Every record is checked against ``QualityRules`` (optionally overridden per record kind) in a fixed order;
the FIRST failed rule rejects it and its reason names the rule, the measured value and the threshold,
e.g. ``"text.min_chars: 3 < 8"``. The rule name is the part before the first ``":"``.

Rule order (cheap structural checks first, image decoding last):

1. structure: ``structure.kind`` (kind in KINDS), ``structure.media_kind``, ``structure.text_xor_messages``
   (exactly one of text/messages), ``structure.meta_json`` (meta is a JSON object), ``structure.roles`` and
   ``structure.assistant_turn`` (when messages are set: roles in ROLES, at least one assistant turn),
   ``structure.no_media`` / ``structure.image_placeholders`` / ``structure.video_placeholder``
   (media_kind none: no images, no placeholders; image: one ``<image>`` per image and no ``<video>``;
   video: exactly one ``<video>``, at least one frame, no ``<image>``).
2. text, measured on the document text with the ``<image>``/``<video>`` placeholders removed (for
   ``messages`` records: the contents joined by newlines): ``text.empty``, ``text.min_chars``,
   ``text.max_chars``, ``text.dup_line_frac`` (lines repeating an earlier line / non-empty lines; Gopher,
   Rae et al. 2021, App. A), ``text.top_ngram_frac`` (share of word positions covered by the most common
   word n-gram, when it occurs at least twice; Gopher's repetition rule), ``text.min_alpha_frac``
   (alphabetic / non-whitespace characters), ``text.control_frac`` (Unicode "Other" characters except
   tab/newline/CR / all characters).
3. image, for every image (video frames included): ``image.decode`` (header readable),
   ``image.declared_size`` (declared width/height == the real size), ``image.max_pixels``,
   ``image.min_side``, ``image.max_aspect``, then ``image.decode`` again for the full decode with
   ``decode_image`` (so truncated or corrupt data is rejected, never a crash).

A numeric rule set to ``None`` (or a boolean rule set to ``False``) is disabled.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from tasks.data.images import ImageDecodeError, decode_image, image_size
from tasks.data.io import DEFAULT_ROWS_PER_SHARD, ShardWriter, iter_rows
from tasks.data.schema import (
    IMAGE_TOKEN,
    KINDS,
    MEDIA_KINDS,
    QUARANTINE_SCHEMA,
    RECORD_SCHEMA,
    ROLES,
    VIDEO_TOKEN,
)
from tasks.io.files import staged_dir
from tasks.io.manifest import Manifest, is_up_to_date, read_manifest, write_manifest

STEP = "filter"
_KEEP_CONTROL = frozenset("\t\n\r")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class QualityRules(BaseModel):
    """Thresholds of every quality rule; ``None`` / ``False`` disables a rule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # structure
    check_kind: bool = Field(True, description="kind must be one of schema.KINDS")
    check_media_kind: bool = Field(True, description="media_kind must be one of schema.MEDIA_KINDS")
    check_text_xor_messages: bool = Field(True, description="exactly one of text / messages is set")
    check_meta_json: bool = Field(True, description="meta must parse as a JSON object")
    check_messages: bool = Field(
        True, description="when messages are set: every role in schema.ROLES and at least one assistant turn"
    )
    check_placeholders: bool = Field(
        True,
        description="'<image>' count == len(images) for media_kind image; exactly one '<video>' and >= 1 frame "
        "for video; no media and no placeholders for none",
    )
    # text
    reject_empty_text: bool = Field(True, description="reject a document whose text is empty after strip")
    min_chars: int | None = Field(8, ge=0, description="minimum characters of the stripped document text")
    max_chars: int | None = Field(
        100_000, ge=1, description="maximum characters of the stripped document text"
    )
    max_dup_line_frac: float | None = Field(
        0.3, ge=0.0, le=1.0, description="maximum fraction of non-empty lines that repeat an earlier line"
    )
    ngram_n: int = Field(3, ge=1, le=10, description="word n-gram size of the top-n-gram repetition rule")
    ngram_min_words: int = Field(
        50, ge=1, description="the top-n-gram rule applies to texts of >= this many words"
    )
    max_top_ngram_frac: float | None = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="maximum share of word positions covered by the most common word n-gram",
    )
    min_alpha_frac: float | None = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="minimum fraction of alphabetic characters among non-whitespace ones",
    )
    max_control_frac: float | None = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="maximum fraction of non-printable (Unicode 'Other', except \\t\\n\\r) chars",
    )
    # images
    check_decode: bool = Field(True, description="every image must fully decode with images.decode_image")
    check_declared_size: bool = Field(
        True, description="declared width/height must equal the image's real size"
    )
    min_side: int | None = Field(
        28, ge=1, description="minimum image side in pixels (28 = one merged 2x2 patch)"
    )
    max_aspect: float | None = Field(20.0, ge=1.0, description="maximum aspect ratio long side / short side")
    max_pixels: int | None = Field(4096 * 4096, ge=1, description="maximum width * height of one image")


def _default_per_kind() -> dict[str, dict[str, Any]]:
    return {
        "long_doc": {"max_chars": 2_000_000},  # 128K-token documents
        # rendered digits / codes / single words are valid OCR
        "ocr": {"min_alpha_frac": 0.0, "min_chars": 1},
        "grounding": {"min_alpha_frac": 0.1},  # box coordinates are mostly digits
        "cot": {"min_alpha_frac": 0.1},  # math traces are mostly digits and symbols
        "video_haystack": {"reject_empty_text": False, "min_chars": None, "min_alpha_frac": None},
    }


class FilterConfig(BaseModel):
    """Configuration of ``run_filter``: base rules plus per-kind overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: QualityRules = Field(default_factory=QualityRules, description="rules applied to every kind")
    per_kind: dict[str, dict[str, Any]] = Field(
        default_factory=_default_per_kind,
        description="kind -> {rule field: value} overriding `rules` for records of that kind",
    )
    rows_per_shard: int = Field(DEFAULT_ROWS_PER_SHARD, ge=1, description="rows per output Parquet shard")

    _resolved: dict[str, QualityRules] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _resolve_per_kind(self) -> FilterConfig:
        base = self.rules.model_dump()
        for kind, override in self.per_kind.items():
            if kind not in KINDS:
                raise ValueError(f"per_kind: unknown kind {kind!r}, expected one of {KINDS}")
            unknown = sorted(set(override) - set(QualityRules.model_fields))
            if unknown:
                raise ValueError(f"per_kind[{kind!r}]: unknown rule fields {unknown}")
            self._resolved[kind] = QualityRules.model_validate({**base, **override})
        return self

    def rules_for(self, kind: str) -> QualityRules:
        """The rules that apply to records of ``kind``."""
        return self._resolved.get(kind, self.rules)


# ---------------------------------------------------------------- measurements


def document_text(row: dict[str, Any]) -> str:
    """The document's text: ``text``, or the ``messages`` contents joined by newlines."""
    if row.get("messages") is not None:
        return "\n".join(m["content"] for m in row["messages"])
    return row.get("text") or ""


def strip_placeholders(text: str) -> str:
    return text.replace(IMAGE_TOKEN, " ").replace(VIDEO_TOKEN, " ")


def dup_line_frac(text: str) -> float:
    """Fraction of non-empty (stripped) lines that repeat an earlier line."""
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if len(lines) < 2:
        return 0.0
    return (len(lines) - len(set(lines))) / len(lines)


def top_ngram_frac(words: list[str], n: int) -> float:
    """Share of word positions covered by the most frequent word n-gram (0 when no n-gram repeats)."""
    if len(words) < n:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    top, count = Counter(grams).most_common(1)[0]
    if count < 2:
        return 0.0
    covered = bytearray(len(words))
    for i, g in enumerate(grams):
        if g == top:
            covered[i : i + n] = b"\x01" * n
    return sum(covered) / len(words)


def alpha_frac(text: str) -> float:
    chars = "".join(text.split())
    if not chars:
        return 1.0
    return sum(c.isalpha() for c in chars) / len(chars)


def control_frac(text: str) -> float:
    if not text:
        return 0.0
    if text.translate({9: None, 10: None, 13: None}).isprintable():
        return 0.0  # fast path: no "Other"/separator characters at all
    bad = sum(1 for c in text if c not in _KEEP_CONTROL and unicodedata.category(c)[0] == "C")
    return bad / len(text)


# ---------------------------------------------------------------- rules


def _check_structure(row: dict[str, Any], r: QualityRules) -> str | None:
    kind, media_kind = row.get("kind"), row.get("media_kind")
    if r.check_kind and kind not in KINDS:
        return f"structure.kind: {kind!r} not in KINDS"
    if r.check_media_kind and media_kind not in MEDIA_KINDS:
        return f"structure.media_kind: {media_kind!r} not in {MEDIA_KINDS}"
    has_text, has_msgs = row.get("text") is not None, row.get("messages") is not None
    if r.check_text_xor_messages and has_text == has_msgs:
        return f"structure.text_xor_messages: {'both' if has_text else 'neither'} set, expected exactly one"
    if r.check_meta_json:
        try:
            meta = json.loads(row.get("meta") or "")
        except (json.JSONDecodeError, TypeError) as e:
            return f"structure.meta_json: not JSON ({e})"
        if not isinstance(meta, dict):
            return f"structure.meta_json: {type(meta).__name__} is not a JSON object"
    if r.check_messages and has_msgs:
        roles = [m["role"] for m in row["messages"]]
        bad = [x for x in roles if x not in ROLES]
        if bad:
            return f"structure.roles: {bad[0]!r} not in {ROLES}"
        if "assistant" not in roles:
            return f"structure.assistant_turn: 0 assistant turns < 1 (roles {roles})"
    if r.check_placeholders:
        text = document_text(row)
        n_img, n_vid, n = text.count(IMAGE_TOKEN), text.count(VIDEO_TOKEN), len(row.get("images") or [])
        if media_kind == "none" and (n or n_img or n_vid):
            return (
                f"structure.no_media: media_kind none with {n} images, {n_img} '<image>', {n_vid} '<video>'"
            )
        if media_kind == "image" and (n_img != n or n_vid):
            return f"structure.image_placeholders: {n_img} '<image>' and {n_vid} '<video>' != {n} images"
        if media_kind == "video" and (n_vid != 1 or n < 1 or n_img):
            return f"structure.video_placeholder: {n_vid} '<video>' (want 1), {n} frames (want >= 1), {n_img} '<image>'"
    return None


def _check_text(row: dict[str, Any], r: QualityRules) -> str | None:
    text = strip_placeholders(document_text(row)).strip()
    if r.reject_empty_text and not text:
        return "text.empty: 0 characters after strip"
    n = len(text)
    if r.min_chars is not None and n < r.min_chars:
        return f"text.min_chars: {n} < {r.min_chars}"
    if r.max_chars is not None and n > r.max_chars:
        return f"text.max_chars: {n} > {r.max_chars}"
    if r.max_dup_line_frac is not None and (v := dup_line_frac(text)) > r.max_dup_line_frac:
        return f"text.dup_line_frac: {v:.3f} > {r.max_dup_line_frac}"
    if r.max_top_ngram_frac is not None:
        words = text.lower().split()
        if len(words) >= r.ngram_min_words and (v := top_ngram_frac(words, r.ngram_n)) > r.max_top_ngram_frac:
            return f"text.top_ngram_frac: {v:.3f} > {r.max_top_ngram_frac} (top {r.ngram_n}-gram)"
    if r.min_alpha_frac is not None and text and (v := alpha_frac(text)) < r.min_alpha_frac:
        return f"text.min_alpha_frac: {v:.3f} < {r.min_alpha_frac}"
    if r.max_control_frac is not None and (v := control_frac(text)) > r.max_control_frac:
        return f"text.control_frac: {v:.3f} > {r.max_control_frac}"
    return None


def _error_text(e: Exception) -> str:
    """The error message without object addresses (``<_io.BytesIO object at 0x...>``): reasons are data,
    and must be identical across runs for outputs to hash identically."""
    msg = _ADDRESS.sub("", str(e))
    return msg if isinstance(e, ImageDecodeError) else f"{type(e).__name__}: {msg}"


def _check_images(row: dict[str, Any], r: QualityRules) -> str | None:
    images = row.get("images") or []
    sizes: list[tuple[int, int]] = []
    for i, im in enumerate(images):
        declared = (int(im["width"]), int(im["height"]))
        try:
            real = image_size(im["data"])
        except (ImageDecodeError, Image.DecompressionBombError) as e:
            if r.check_decode:
                return f"image.decode: image {i} ({im['format']}): {_error_text(e)}"
            real = declared
        if r.check_declared_size and real != declared:
            return f"image.declared_size: image {i} is {real[0]}x{real[1]} != declared {declared[0]}x{declared[1]}"
        sizes.append(real)
    for i, (w, h) in enumerate(sizes):
        if r.max_pixels is not None and w * h > r.max_pixels:
            return f"image.max_pixels: image {i} has {w * h} ({w}x{h}) > {r.max_pixels}"
        if r.min_side is not None and min(w, h) < r.min_side:
            return f"image.min_side: image {i} ({w}x{h}) min side {min(w, h)} < {r.min_side}"
        aspect = max(w, h) / max(min(w, h), 1)
        if r.max_aspect is not None and aspect > r.max_aspect:
            return f"image.max_aspect: image {i} ({w}x{h}) aspect {aspect:.2f} > {r.max_aspect}"
    if r.check_decode:
        for i, im in enumerate(images):
            try:
                img = decode_image(im["data"])
            except ImageDecodeError as e:
                return f"image.decode: image {i} ({im['format']}): {_error_text(e)}"
            if r.check_declared_size and img.size != sizes[i]:
                return f"image.declared_size: image {i} decodes to {img.size[0]}x{img.size[1]} != {sizes[i]}"
    return None


def check_record(row: dict[str, Any], cfg: FilterConfig) -> str | None:
    """The reason of the first failed rule (``"rule: value vs threshold"``), or None if the row passes."""
    r = cfg.rules_for(row.get("kind", ""))
    return _check_structure(row, r) or _check_text(row, r) or _check_images(row, r)


def rule_of(reason: str) -> str:
    """The rule name of a reason string (the part before the first colon)."""
    return reason.split(":", 1)[0]


# ---------------------------------------------------------------- step


def run_filter(in_dir: Path, out_dir: Path, cfg: FilterConfig) -> Manifest:
    """Split ``in_dir`` into accepted rows (``out_dir``) and quarantined ones (``out_dir/quarantine``)."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise FileNotFoundError(
            f"filter input dataset {in_dir} does not exist (expected a dataset directory)"
        )
    parents = [read_manifest(in_dir).parent_of(in_dir)]
    if is_up_to_date(out_dir, config=cfg, parents=parents):
        return read_manifest(out_dir)
    with staged_dir(out_dir) as stage:
        accepted = ShardWriter(stage, RECORD_SCHEMA, cfg.rows_per_shard)
        quarantine = ShardWriter(stage / "quarantine", QUARANTINE_SCHEMA, cfg.rows_per_shard)
        by_reason: Counter[str] = Counter()
        n_in = 0
        for row in iter_rows(in_dir, RECORD_SCHEMA):
            n_in += 1
            reason = check_record(row, cfg)
            if reason is None:
                accepted.write(row)
            else:
                by_reason[rule_of(reason)] += 1
                quarantine.write({**row, "reason": reason, "step": STEP})
        n_acc, n_q = accepted.close(), quarantine.close()
        if n_acc + n_q != n_in:  # pragma: no cover - invariant
            raise AssertionError(f"filter lost rows: {n_acc} + {n_q} != {n_in}")
        counts = {
            "input": n_in,
            "accepted": n_acc,
            "quarantined": n_q,
            "by_reason": dict(sorted(by_reason.items())),
        }
        manifest = write_manifest(
            stage, kind="dataset", step=STEP, config=cfg, parents=parents, counts=counts
        )
    return manifest
