"""Needle-in-a-haystack (NIAH) over text and video, as in the Kimi-VL report (Table 2: recall per haystack
length bin; REFERENCE.md: 100% up to 65,536 tokens, 87.0 text / 91.7 video in (65,536, 131,072]).

- Text: a haystack of real English prose (the CPython reference-manual topics that ship with Python,
  ``synth_text.prose_paragraphs``), consecutive sentences from a random paragraph on, with one needle
  sentence "The secret number is N." inserted at a sentence boundary; the question asks for the number.
  The prose is ordinary training text (as in the report, the haystack is ordinary context); only the
  needle and the question are new.
- Video: a sequence of frames of drifting shapes (``synth_render.drifting_frames``, the generator of the
  ``video_haystack`` data) with one needle FRAME showing the number, rendered on the haystack's background.

Depth d in [0, 1] places the needle after d of the haystack: text at the sentence boundary whose token
offset is closest to d x (haystack tokens), so it sits within half a sentence of the stated depth; video at
frame index round(d x n) of n haystack frames. Each haystack fills its length bin (Table 2's bins are
(previous, length] in tokens): the whole prompt (template and question included) has at most ``length``
tokens and misses it by less than one sentence / one frame. Recall = the needle's number appears (as a
whole number) in the generated answer; reported per length bin and as a depth x length grid.

Token offsets are exact by construction: the text prompt is the concatenation of separately tokenized
pieces (each sentence carries its leading space, so byte-level BPE pre-tokenization splits there anyway);
the video prompt comes from ``DocTokenizer`` and the needle frame's block is located by its
``<|media_start|>``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.data.schema import VIDEO_TOKEN
from tasks.data.synth_render import BACKGROUNDS, drifting_frames, font, text_size
from tasks.data.synth_text import prose_paragraphs
from tasks.eval.prompts import PromptBuilder

NEEDLE = "The secret number is {value}."
TEXT_QUESTION = "What is the secret number mentioned in the text above? Answer with the number only."
VIDEO_QUESTION = "One frame of this video shows a secret number. What is the secret number?"
MAX_SENTENCE_TOKENS = 96
_SENT_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")


class NIAHConfig(BaseModel):
    """Haystack lengths (bin upper edges, tokens), needle depths and generation length."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lengths: tuple[int, ...] = Field(
        (1024, 2048, 4096, 8192),
        description="text haystack lengths in tokens (doubling bins (prev, L]); tiny: up to its 8192 context",
    )
    video_lengths: tuple[int, ...] | None = Field(
        (1024, 2048, 4096), description="video haystack lengths (None: the text lengths)"
    )
    depths: tuple[float, ...] = Field((0.0, 0.5, 1.0), description="needle depths in [0, 1]")
    samples: int = Field(1, ge=1, le=100, description="haystacks per (length, depth) cell")
    frame_side: int = Field(56, ge=28, le=448, description="video haystack frame side in pixels")
    max_new_tokens: int = Field(12, ge=1, le=256, description="tokens generated per answer")

    @model_validator(mode="after")
    def _check(self) -> NIAHConfig:
        for name in ("lengths", "video_lengths"):
            v = getattr(self, name)
            if v is None:
                continue
            if not v or any(x < 64 for x in v) or list(v) != sorted(set(v)):
                raise ValueError(f"niah.{name} must be strictly increasing token counts >= 64, got {v}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"niah.depths must be non-empty values in [0, 1], got {self.depths}")
        return self

    def lengths_for(self, kind: str) -> tuple[int, ...]:
        return self.lengths if kind == "text" or self.video_lengths is None else self.video_lengths


def doubling_lengths(max_length: int, min_length: int = 1024) -> tuple[int, ...]:
    """(min, 2 min, ..., max): Table 2's doubling bins up to a context length."""
    if not 64 <= min_length <= max_length:
        raise ValueError(f"need 64 <= min_length <= max_length, got {min_length}, {max_length}")
    out = [min_length]
    while out[-1] * 2 <= max_length:
        out.append(out[-1] * 2)
    if out[-1] != max_length:
        out.append(max_length)
    return tuple(out)


def bin_label(lengths: tuple[int, ...] | list[int], length: int) -> str:
    i = list(lengths).index(length)
    return f"({0 if i == 0 else lengths[i - 1]}, {length}]"


@dataclass
class Haystack:
    """A NIAH prompt. ``needle_offset``: index in ``input_ids`` where the needle starts (text: its first
    token; video: the needle frame's ``<|media_start|>``); the haystack (needle included) spans
    ``[haystack_start, haystack_end)``."""

    kind: Literal["text", "video"]
    bin_length: int  # the requested length (upper edge of its bin)
    input_ids: list[int]
    needle_offset: int
    needle_tokens: int
    haystack_start: int
    haystack_end: int
    depth: float
    value: str
    images: list[dict[str, Any]] = field(default_factory=list)
    max_piece_tokens: int = 0  # longest sentence / frame of the haystack

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def actual_depth(self) -> float:
        """Share of the haystack (needle excluded) before the needle."""
        span = self.haystack_end - self.haystack_start - self.needle_tokens
        return (self.needle_offset - self.haystack_start) / max(span, 1)


@lru_cache(maxsize=1)
def _sentences() -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(every sentence of the prose, index of the first sentence of each paragraph)."""
    sents: list[str] = []
    starts: list[int] = []
    for p in prose_paragraphs():
        starts.append(len(sents))
        sents.extend(s for s in _SENT_RE.split(p.text) if s.strip())
    return tuple(sents), tuple(starts)


class _Pool:
    """Sentences tokenized once per tokenizer (with their leading space); sentences longer than
    ``MAX_SENTENCE_TOKENS`` (run-on list items) are left out, so a haystack misses its length by less than
    that and the needle's depth is exact to within half of it."""

    def __init__(self, builder: PromptBuilder) -> None:
        sents, starts = _sentences()
        enc = builder.tok.encode_batch([" " + s for s in sents])
        keep = [len(e) <= MAX_SENTENCE_TOKENS for e in enc]
        self.sents = [s for s, k in zip(sents, keep, strict=True) if k]
        self.ids = [e for e, k in zip(enc, keep, strict=True) if k]
        # paragraph starts, re-indexed to the kept sentences
        kept_before, n = [], 0
        for k in keep:
            kept_before.append(n)
            n += k
        self.starts = sorted({kept_before[i] for i in starts if kept_before[i] < n})


def _pool(builder: PromptBuilder) -> _Pool:
    pool = getattr(builder, "_niah_pool", None)
    if pool is None:
        pool = _Pool(builder)
        builder._niah_pool = pool  # type: ignore[attr-defined]
    return pool


def needle_value(rng: random.Random) -> str:
    return str(rng.randint(1000, 9999))


def _question(builder: PromptBuilder, q: str, answer_lead: str) -> str:
    return f"\n\n{q}" if builder.style == "chat" else f"\n\nQuestion: {q}\nAnswer: {answer_lead}"


def build_text_haystack(builder: PromptBuilder, length: int, depth: float, *, seed: int = 0) -> Haystack:
    """A text NIAH prompt of at most ``length`` tokens with the needle at ``depth`` (see module doc)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"niah-text/{seed}/{length}/{depth}")
    value = needle_value(rng)
    pool = _pool(builder)
    needle = NEEDLE.format(value=value)
    q_ids = builder.encode_text(_question(builder, TEXT_QUESTION, "The secret number is"))
    head, foot = builder.header(), builder.footer()
    budget = length - len(head) - len(foot) - len(q_ids) - len(builder.encode_text(" " + needle)) - 1
    if budget < 8:
        raise ValueError(f"length={length} is too short for a text haystack (budget {budget} tokens)")
    # consecutive sentences from a random paragraph on (wrapping around the prose)
    k = pool.starts[rng.randrange(len(pool.starts))]
    texts: list[str] = []
    total = 0
    while True:
        i = k % len(pool.sents)
        n = len(pool.ids[i])
        if total + n > budget:
            break
        texts.append(pool.sents[i])
        total += n
        k += 1
    if not texts:
        raise ValueError(f"length={length}: no sentence fits the haystack budget of {budget} tokens")
    pieces = [builder.encode_text(t if j == 0 else " " + t) for j, t in enumerate(texts)]
    cum = [0]
    for p in pieces:
        cum.append(cum[-1] + len(p))
    at = min(range(len(cum)), key=lambda j: (abs(cum[j] - depth * cum[-1]), j))
    needle_ids = builder.encode_text(needle if at == 0 else " " + needle)
    if at == 0 and pieces:  # the first sentence now follows the needle: give it its leading space
        pieces[0] = builder.encode_text(" " + texts[0])
    content = [t for p in pieces[:at] for t in p] + needle_ids + [t for p in pieces[at:] for t in p]
    ids = head + content + q_ids + foot
    # the budget keeps one token of slack for the first piece / needle losing or gaining its leading space
    assert len(ids) <= length, (len(ids), length)
    offset = len(head) + sum(len(p) for p in pieces[:at])
    assert ids[offset : offset + len(needle_ids)] == needle_ids
    return Haystack(
        kind="text",
        bin_length=length,
        input_ids=ids,
        needle_offset=offset,
        needle_tokens=len(needle_ids),
        haystack_start=len(head),
        haystack_end=len(head) + len(content),
        depth=depth,
        value=value,
        max_piece_tokens=max(len(p) for p in pieces),
    )


def needle_frame(value: str, width: int, height: int, background: str) -> Image.Image:
    """A frame showing ``value`` in large dark digits, centred on the haystack's background colour."""
    img = Image.new("RGB", (width, height), BACKGROUNDS[background])
    size = max(8, int(0.5 * height))
    while size > 8 and text_size(value, size)[0] > 0.9 * width:
        size -= 1
    tw, th = text_size(value, size)
    d = ImageDraw.Draw(img)
    d.text(((width - tw) // 2, (height - th) // 2), value, fill=(20, 20, 20), font=font(size))
    return img


def build_video_haystack(
    builder: PromptBuilder, length: int, depth: float, *, seed: int = 0, frame_side: int = 56
) -> Haystack:
    """A video NIAH prompt: as many frames as fit in ``length`` tokens, the needle frame at ``depth``."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"niah-video/{seed}/{length}/{depth}")
    value = needle_value(rng)
    w = h = frame_side
    q = _question(builder, VIDEO_QUESTION, "The secret number is")
    content = f"{VIDEO_TOKEN}{q}"
    probe = {"width": w, "height": h}
    one = len(builder.encode(content, [probe], "video"))
    two = len(builder.encode(content, [probe, probe], "video"))
    per_frame, overhead = two - one, one - (two - one)
    n_frames = (length - overhead) // per_frame
    if n_frames < 2:
        raise ValueError(f"length={length} holds {n_frames} frames of {per_frame} tokens; need >= 2")
    frames, metas = drifting_frames(rng, n_frames - 1, w, h)
    k = round(depth * (n_frames - 1))
    frames.insert(k, needle_frame(value, w, h, metas[0]["background"]))
    images = [{"width": w, "height": h, "pil": f} for f in frames]
    ids = builder.encode(content, images, "video")
    sp = builder.tok.special
    starts = [i for i, t in enumerate(ids) if t == sp.media_start]
    end = max(i for i, t in enumerate(ids) if t == sp.media_end) + 1
    assert len(starts) == n_frames and len(ids) <= length
    return Haystack(
        kind="video",
        bin_length=length,
        input_ids=ids,
        needle_offset=starts[k],
        needle_tokens=per_frame,
        haystack_start=starts[0],
        haystack_end=end,
        depth=depth,
        value=value,
        images=images,
        max_piece_tokens=per_frame,
    )


def needle_found(prediction: str, value: str) -> bool:
    return re.search(rf"(?<!\d){re.escape(value)}(?!\d)", prediction) is not None


AnswerFn = Callable[[list[int], list[dict[str, Any]], int], str]


def haystacks(
    kind: Literal["text", "video"], builder: PromptBuilder, cfg: NIAHConfig, *, seed: int = 0
) -> Iterator[Haystack]:
    """Every haystack of an evaluation, in (length, depth, sample) order; sample s of an eval with seed
    ``seed`` uses haystack seed ``1000 * seed + s``."""
    if kind not in ("text", "video"):
        raise ValueError(f"kind must be 'text' or 'video', got {kind!r}")
    for length in cfg.lengths_for(kind):
        for depth in cfg.depths:
            for s in range(cfg.samples):
                if kind == "text":
                    yield build_text_haystack(builder, length, depth, seed=1000 * seed + s)
                else:
                    yield build_video_haystack(
                        builder, length, depth, seed=1000 * seed + s, frame_side=cfg.frame_side
                    )


def run_niah(
    kind: Literal["text", "video"],
    builder: PromptBuilder,
    cfg: NIAHConfig,
    answer: AnswerFn,
    *,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One result per haystack (``haystacks``): the prompt's facts, the answer and whether it was right."""
    out = []
    lengths = cfg.lengths_for(kind)
    for hs in haystacks(kind, builder, cfg, seed=seed):
        pred = answer(hs.input_ids, hs.images, cfg.max_new_tokens)
        out.append(
            {
                "length": hs.bin_length,
                "bin": bin_label(lengths, hs.bin_length),
                "depth": hs.depth,
                "actual_depth": round(hs.actual_depth, 4),
                "tokens": hs.length,
                "frames": len(hs.images),
                "needle": hs.value,
                "prediction": pred,
                "correct": needle_found(pred, hs.value),
            }
        )
    return out


def summarize(results: list[dict[str, Any]], lengths: tuple[int, ...], depths: tuple[float, ...]) -> dict:
    """Recall overall, per length bin, and the depth x length grid (rows = depths, columns = lengths)."""

    def rec(rs: list[dict[str, Any]]) -> float | None:
        return sum(r["correct"] for r in rs) / len(rs) if rs else None

    by_bin = {bin_label(lengths, L): rec([r for r in results if r["length"] == L]) for L in lengths}
    grid = [
        [rec([r for r in results if r["length"] == L and r["depth"] == d]) for L in lengths] for d in depths
    ]
    return {
        "recall": rec(results),
        "n": len(results),
        "recall_by_bin": by_bin,
        "grid": {"depths": list(depths), "lengths": list(lengths), "recall": grid},
    }
