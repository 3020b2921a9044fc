"""What a well-formed record of each kind looks like: content form, media kind, inclusive bounds.

Plain data (no Great Expectations import), so configs can validate bound overrides cheaply; the suites
(``suites.py``) turn a resolved ``KindSpec`` into expectations.

Image defaults follow MoonViT's preprocessing (REFERENCE.md "MoonViT"): a side below 28 px is less than
one merged 2x2 patch; the aspect-ratio and pixel caps match the filter step's defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from tasks.data.schema import KINDS, MEDIA_KINDS

Bound = tuple[float | None, float | None]
BOUNDED_COLUMNS = (
    "text_chars",
    "num_images",
    "num_frames",
    "num_turns",
    "image_min_side",
    "image_max_aspect",
    "image_max_pixels",
    "control_chars",
)
CONVERSATIONAL = frozenset({"chart_qa", "doc_qa", "video_qa", "sft", "cot", "synthetic_qa"})
VIDEO_KINDS = frozenset({"video_qa", "video_haystack"})
DATASET_SUITE = "dataset"  # dataset-wide rules (id uniqueness) in "auto" mode
UNKNOWN_KIND_SUITE = "unknown_kind"  # rows whose kind is not in KINDS ("auto" mode)


@dataclass(frozen=True)
class KindSpec:
    """What a well-formed record of one kind looks like (bounds are inclusive; None = unbounded)."""

    content_forms: tuple[str, ...]
    media_kinds: tuple[str, ...]
    bounds: Mapping[str, Bound] = field(default_factory=dict)


_IMAGE_BOUNDS: dict[str, Bound] = {
    "image_min_side": (28, None),
    "image_max_aspect": (None, 20.0),
    "image_max_pixels": (None, 4096 * 4096),
    "num_turns": (2, 512),
    "control_chars": (0, 0),
}
_TEXT = ("text", "messages")
_MSG = ("messages",)


def _spec(forms: tuple[str, ...], media: tuple[str, ...], **bounds: Bound) -> KindSpec:
    return KindSpec(forms, media, {**_IMAGE_BOUNDS, **bounds})


KIND_SPECS: dict[str, KindSpec] = {
    "caption": _spec(_TEXT, ("image",), text_chars=(3, 4_000), num_images=(1, 1)),
    "grounding": _spec(_TEXT, ("image",), text_chars=(3, 8_000), num_images=(1, 1)),
    "ocr": _spec(_TEXT, ("image",), text_chars=(1, 50_000), num_images=(1, 16)),
    "chart_qa": _spec(_MSG, ("image",), text_chars=(5, 16_000), num_images=(1, 4)),
    "doc_qa": _spec(_MSG, ("image",), text_chars=(5, 32_000), num_images=(1, 16)),
    "interleaved": _spec(_TEXT, ("image",), text_chars=(10, 500_000), num_images=(1, 64)),
    "video_qa": _spec(_MSG, ("video",), text_chars=(5, 16_000), num_images=(1, 2_048), num_frames=(1, 2_048)),
    "video_haystack": _spec(
        _TEXT, ("video",), text_chars=(1, 500_000), num_images=(2, 8_192), num_frames=(2, 8_192)
    ),
    "long_doc": _spec(_TEXT, ("none", "image"), text_chars=(200, 4_000_000), num_images=(0, 512)),
    "text": _spec(_TEXT, ("none",), text_chars=(10, 1_000_000), num_images=(0, 0)),
    "sft": _spec(_MSG, MEDIA_KINDS, text_chars=(2, 200_000), num_images=(0, 2_048)),
    "cot": _spec(_MSG, ("none", "image"), text_chars=(10, 400_000), num_images=(0, 8)),
    "synthetic_qa": _spec(_MSG, MEDIA_KINDS, text_chars=(2, 50_000), num_images=(0, 2_048)),
}
assert set(KIND_SPECS) == set(KINDS), "KIND_SPECS must cover schema.KINDS"


def resolve_spec(kind: str, overrides: Mapping[str, Mapping[str, Bound]] | None = None) -> KindSpec:
    """``KIND_SPECS[kind]`` with bound overrides applied (``"*"`` first, then the kind's own)."""
    if kind not in KIND_SPECS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    overrides = overrides or {}
    bounds = dict(KIND_SPECS[kind].bounds)
    for key in ("*", kind):
        for col, b in (overrides.get(key) or {}).items():
            if col not in BOUNDED_COLUMNS:
                raise ValueError(
                    f"bounds[{key!r}]: unknown column {col!r}, expected one of {BOUNDED_COLUMNS}"
                )
            bounds[col] = (b[0], b[1])
    return replace(KIND_SPECS[kind], bounds=bounds)
