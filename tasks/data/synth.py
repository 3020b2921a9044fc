"""Deterministic synthetic corpus: every data kind of the recipe, from one seed (the tiny recipe's data).

``run_synth(out_root, cfg)`` writes one dataset directory per kind, ``out_root/<kind>/part-*.parquet`` +
``manifest.json`` (kind ``dataset``, step ``synth``, counts ``{rows, images}``), each skipped when up to
date. The generators live in ``synth_kinds.py`` (records), ``synth_render.py`` (pictures) and
``synth_text.py`` (CPython prose, facts, verified math CoT).

What each kind feeds (REFERENCE.md, training recipe): caption, grounding and OCR -> stages 1-2 (ViT/CoCa and
alignment); interleaved, chart/doc QA, video QA, text -> stages 3-4 (joint pretraining and cooldown);
long_doc and video_haystack -> stage 5 (long context) and the NIAH evaluation; sft -> stage 6 (ChatML SFT);
cot -> stage 7 (verified long-CoT traces).

Determinism: row ``i`` of kind ``k`` draws from its own ``random.Random(f"{seed}/{k}/{i}/...")``, so a row
does not depend on the other rows or on the other kinds' counts, and the same seed gives byte-identical
Parquet (PNG encoding and Parquet writing are deterministic for a fixed Pillow/pyarrow).

Deliberate dirt, so the filter/dedup/contract steps have real work (ids stay unique, and
``meta["synth"]`` records what was done, so those steps can be scored):

- ``exact_duplicate_rate``: the row repeats an earlier original row's content (text/messages/images);
- ``near_duplicate_rate``: the same, lightly perturbed (a few words, a question prefix, image brightness or
  JPEG re-encoding) without changing the ground truth;
- ``corrupt_rate``: truncated image bytes, a placeholder count that no longer matches the images, empty
  text or answer, garbage characters, or (CoT) a final answer that contradicts the verified one.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Iterator
from copy import deepcopy
from pathlib import Path
from typing import Any

import PIL
from PIL import Image, ImageEnhance
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.data import synth_kinds as sk
from tasks.data.images import encode_image
from tasks.data.io import ShardWriter
from tasks.data.schema import IMAGE_TOKEN, RECORD_SCHEMA, VIDEO_TOKEN
from tasks.data.synth_chat import cot, sft
from tasks.data.synth_kinds import Ctx, Draft
from tasks.data.synth_text import prose_paragraphs, topics_sha256
from tasks.io.files import staged_dir
from tasks.io.manifest import Manifest, is_up_to_date, read_manifest, write_manifest

SYNTH_VERSION = 1  # bump when a generator's output changes on purpose (forces regeneration)
GENERATORS = {
    "caption": sk.caption,
    "grounding": sk.grounding,
    "ocr": sk.ocr,
    "chart_qa": sk.chart_qa,
    "doc_qa": sk.doc_qa,
    "interleaved": sk.interleaved,
    "video_qa": sk.video_qa,
    "video_haystack": sk.video_haystack,
    "long_doc": sk.long_doc,
    "text": sk.text,
    "sft": sft,
    "cot": cot,
}
SYNTH_KINDS = tuple(GENERATORS)  # schema.KINDS minus "synthetic_qa" (made by the QA-synthesis step)
SOURCE = "synth"
_TEXT_PERTURB = ("caption", "interleaved", "video_haystack", "long_doc", "text")  # free text: word edits OK


class SynthConfig(BaseModel):
    """Rows per kind and generator knobs; defaults are the tiny recipe's corpus (a few seconds on a CPU)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, ge=0, description="master seed; every row's randomness derives from it")
    caption: int = Field(256, ge=0, description="rows of image + caption")
    grounding: int = Field(128, ge=0, description="rows of image + referring expression with <box>")
    ocr: int = Field(128, ge=0, description="rows of rendered text + its transcription")
    chart_qa: int = Field(64, ge=0, description="rows of bar chart + question/answer")
    doc_qa: int = Field(64, ge=0, description="rows of key/value document image + question/answer")
    interleaved: int = Field(64, ge=0, description="rows of text with 2-3 <image> placeholders")
    video_qa: int = Field(48, ge=0, description="rows of short moving-shape videos + question/answer")
    video_haystack: int = Field(8, ge=0, description="rows of long frame sequences (NIAH source)")
    long_doc: int = Field(16, ge=0, description="rows of long prose documents")
    text: int = Field(256, ge=0, description="rows of plain text (CPython prose + generated facts)")
    sft: int = Field(128, ge=0, description="rows of multi-turn, multi-image ChatML conversations")
    cot: int = Field(128, ge=0, description="rows of math problems with a verified long chain of thought")
    image_min_side: int = Field(56, ge=16, le=4096, description="smallest image side in pixels")
    image_max_side: int = Field(224, ge=16, le=4096, description="largest image side in pixels")
    video_max_side: int = Field(112, ge=16, le=4096, description="largest video frame side in pixels")
    video_frames: tuple[int, int] = Field((4, 8), description="min/max frames of a video_qa clip")
    haystack_frames: tuple[int, int] = Field((16, 32), description="min/max frames of a video_haystack clip")
    long_doc_words: int = Field(3000, ge=100, le=1_000_000, description="words per long document (at least)")
    exact_duplicate_rate: float = Field(0.03, ge=0.0, le=0.5, description="fraction of rows repeating a row")
    near_duplicate_rate: float = Field(
        0.03, ge=0.0, le=0.5, description="fraction of lightly perturbed repeats"
    )
    corrupt_rate: float = Field(
        0.02, ge=0.0, le=0.5, description="fraction of rows with deliberately bad content"
    )
    rows_per_shard: int = Field(1024, ge=1, description="rows per Parquet shard")

    @model_validator(mode="after")
    def _check_ranges(self) -> SynthConfig:
        if self.image_min_side > self.image_max_side:
            raise ValueError(
                f"image_min_side ({self.image_min_side}) must be <= image_max_side ({self.image_max_side})"
            )
        for name in ("video_frames", "haystack_frames"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi <= 1024:
                raise ValueError(f"{name} must be (min, max) with 1 <= min <= max <= 1024, got {(lo, hi)}")
        total = self.exact_duplicate_rate + self.near_duplicate_rate + self.corrupt_rate
        if total > 0.9:
            raise ValueError(
                f"exact_duplicate_rate + near_duplicate_rate + corrupt_rate must be <= 0.9, got {total}"
            )
        return self

    def rows(self, kind: str) -> int:
        if kind not in SYNTH_KINDS:
            raise ValueError(f"kind must be one of {SYNTH_KINDS}, got {kind!r}")
        return int(getattr(self, kind))


def row_id(kind: str, seed: int, index: int) -> str:
    return f"{kind}-{seed}-{index:07d}"


def _rng(seed: int, kind: str, index: int, purpose: str) -> random.Random:
    return random.Random(f"{seed}/{kind}/{index}/{purpose}")  # str seeds hash with sha512: stable


def kind_config(cfg: SynthConfig, kind: str) -> dict[str, Any]:
    """What one kind's output depends on (its skip key): other kinds' counts are left out."""
    d = cfg.model_dump(mode="json")
    for k in SYNTH_KINDS:
        d.pop(k)
    d.update(kind=kind, rows=cfg.rows(kind), generator_version=SYNTH_VERSION, pillow=PIL.__version__)
    if kind in ("text", "long_doc", "ocr"):
        d["cpython_topics_sha256"] = topics_sha256()
    return d


def plan_roles(cfg: SynthConfig, kind: str, n: int) -> list[tuple[str, int | None]]:
    """(role, source index) per row: original | exact | near | corrupt; duplicates copy an earlier original."""
    plan: list[tuple[str, int | None]] = []
    originals: list[int] = []
    c, e, nr = cfg.corrupt_rate, cfg.exact_duplicate_rate, cfg.near_duplicate_rate
    for i in range(n):
        rng = _rng(cfg.seed, kind, i, "role")
        u = rng.random()
        if u < c:
            plan.append(("corrupt", None))
        elif u < c + e + nr and originals:
            plan.append(("exact" if u < c + e else "near", rng.choice(originals)))
        else:
            plan.append(("original", None))
            originals.append(i)
    return plan


_WORD = re.compile(r"^[A-Za-z]{3,}[.,;:]?$")
_LEAD = re.compile(r"^((?:<image>|<video>)*\n?)")


_STOPWORDS = frozenset({"a", "an", "the", "of", "and", "is", "are", "in", "on", "to", "with", "at", "it"})


def perturb_words(rng: random.Random, text: str) -> str:
    """A few word-level edits that keep the meaning (and the placeholders, layout and numbers): flip a word's
    case, drop a stopword, or repeat a word. The text never comes out unchanged."""
    toks = text.split(" ")
    cand = [k for k, t in enumerate(toks) if _WORD.match(t)]
    if not cand:
        return text + " "
    for k in sorted(rng.sample(cand, min(len(cand), 1 + len(toks) // 400, 3)), reverse=True):
        op = rng.randrange(3)
        if op == 0:
            toks[k] = toks[k].swapcase()
        elif op == 1 and toks[k].lower() in _STOPWORDS:
            del toks[k]
        else:
            toks.insert(k, toks[k].rstrip(".,;:"))
    return " ".join(toks)


def _perturb_image(rng: random.Random, img: Image.Image) -> tuple[Image.Image, str]:
    f = rng.choice([rng.uniform(0.92, 0.97), rng.uniform(1.03, 1.08)])
    return ImageEnhance.Brightness(img).enhance(f), "jpeg" if rng.random() < 0.3 else "png"


def near_duplicate(rng: random.Random, kind: str, d: Draft) -> tuple[Draft, list[str]]:
    """A copy with light changes that keep every ground-truth label true; returns (draft, image formats).

    Rows with images get re-toned (and sometimes JPEG-re-encoded) images, plus a few word edits when the
    text is long free text (>= 60 words); short texts are left alone there, as in real re-posted images.
    Rows without images get word edits (free text) or a prefix on the user's question (conversations).
    """
    d = Draft(list(d.images), d.media_kind, deepcopy(d.meta), d.text, deepcopy(d.messages))
    fmts = ["png"] * len(d.images)
    for k, img in enumerate(d.images):
        d.images[k], fmts[k] = _perturb_image(rng, img)
    if d.media_kind == "video":
        fmts = ["png"] * len(d.images)  # one format per video
    long_text = d.text is not None and len(d.text.split()) >= 60
    if kind in _TEXT_PERTURB and d.text is not None and (long_text or not d.images):
        d.text = perturb_words(rng, d.text)
    elif d.messages is not None and not d.images:
        m = next(m for m in d.messages if m["role"] == "user")
        lead = _LEAD.match(m["content"]).group(1)  # type: ignore[union-attr]
        prefix = rng.choice(["Please answer: ", "Question: ", "Quick question. "])
        m["content"] = lead + prefix + m["content"][len(lead) :]
    return d, fmts


def _drop_first_placeholder(s: str) -> str:
    for tok in (VIDEO_TOKEN, IMAGE_TOKEN):
        if tok in s:
            return s.replace(tok, "", 1)
    return s


def corrupt(rng: random.Random, kind: str, row: dict[str, Any]) -> str:
    """Damage ``row`` in place; returns the corruption type."""
    options = ["empty_text"]
    if row["images"]:
        options += ["truncated_image", "placeholder_mismatch"]
    elif row["text"] is not None:
        options.append("garbage_text")
    if kind == "cot":
        options.append("wrong_answer")
    how = rng.choice(options)
    msgs = row["messages"]
    if how == "truncated_image":
        im = row["images"][rng.randrange(len(row["images"]))]
        im["data"] = im["data"][: max(40, len(im["data"]) // 3)]
    elif how == "placeholder_mismatch":
        if row["text"] is not None:
            row["text"] = _drop_first_placeholder(row["text"])
        else:
            m = next(m for m in msgs if IMAGE_TOKEN in m["content"] or VIDEO_TOKEN in m["content"])
            m["content"] = _drop_first_placeholder(m["content"])
    elif how == "empty_text":
        if row["text"] is not None:
            row["text"] = ""
        else:
            [m for m in msgs if m["role"] == "assistant"][-1]["content"] = ""
    elif how == "garbage_text":
        row["text"] = "".join(rng.choice("\x00\x01\x07\ufffd\x7f#%") for _ in range(rng.randint(20, 200)))
    else:  # wrong_answer: the final answer no longer matches the verified one in meta
        m = msgs[-1]
        head, _, _ = m["content"].rpartition("The answer is ")
        m["content"] = f"{head}The answer is {json.loads(row['meta'])['answer'] + rng.randint(1, 5)}."
    return how


def finalize(
    kind: str, cfg: SynthConfig, i: int, d: Draft, fmts: list[str], synth: dict[str, Any]
) -> dict[str, Any]:
    meta = {**d.meta, "synth": {"seed": cfg.seed, "index": i, **synth}}
    return {
        "id": row_id(kind, cfg.seed, i),
        "kind": kind,
        "source": SOURCE,
        "text": d.text,
        "messages": d.messages,
        "images": [encode_image(img, f) for img, f in zip(d.images, fmts, strict=True)],
        "media_kind": d.media_kind,
        "meta": json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False),
    }


def generate_rows(cfg: SynthConfig, kind: str) -> Iterator[dict[str, Any]]:
    """Yield the rows of one kind, in index order."""
    n = cfg.rows(kind)
    order = list(range(len(prose_paragraphs())))
    random.Random(f"{cfg.seed}/prose-order").shuffle(order)
    ctx = Ctx(
        cfg.image_min_side,
        cfg.image_max_side,
        cfg.video_max_side,
        tuple(cfg.video_frames),
        tuple(cfg.haystack_frames),
        cfg.long_doc_words,
        order,
        cfg.seed,
    )
    gen = GENERATORS[kind]
    plan = plan_roles(cfg, kind, n)
    refs = Counter(src for _, src in plan if src is not None)
    cache: dict[int, Draft] = {}
    for i, (role, src) in enumerate(plan):
        synth: dict[str, Any] = {"duplicate_of": None, "duplicate_method": None, "corruption": None}
        if src is not None:
            base = cache[src]
            refs[src] -= 1
            if refs[src] == 0:
                del cache[src]
            synth.update(duplicate_of=row_id(kind, cfg.seed, src), duplicate_method=role)
            if role == "near":
                d, fmts = near_duplicate(_rng(cfg.seed, kind, i, "near"), kind, base)
            else:
                d, fmts = base, ["png"] * len(base.images)
        else:
            d = gen(_rng(cfg.seed, kind, i, "row"), ctx, i)
            fmts = ["png"] * len(d.images)
            if refs[i]:
                cache[i] = d
        row = finalize(kind, cfg, i, d, fmts, synth)
        if role == "corrupt":
            how = corrupt(_rng(cfg.seed, kind, i, "corrupt"), kind, row)
            meta = json.loads(row["meta"])
            meta["synth"]["corruption"] = how
            row["meta"] = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        yield row


def synth_kind(out_dir: Path, cfg: SynthConfig, kind: str) -> Manifest:
    """Generate one kind into ``out_dir`` (skipped when up to date)."""
    sub = kind_config(cfg, kind)
    if is_up_to_date(out_dir, config=sub, parents=[]):
        return read_manifest(out_dir)
    stats: Counter[str] = Counter()
    with staged_dir(out_dir) as stage:
        w = ShardWriter(stage, RECORD_SCHEMA, cfg.rows_per_shard)
        for row in generate_rows(cfg, kind):
            s = json.loads(row["meta"])["synth"]
            stats["images"] += len(row["images"])
            stats[s["duplicate_method"] or "original"] += 1
            stats["corrupt"] += s["corruption"] is not None
            w.write(row)
        n = w.close()
        extra = {
            "data_kind": kind,
            "config": sub,
            "exact_duplicates": stats["exact"],
            "near_duplicates": stats["near"],
            "corrupt": stats["corrupt"],
        }
        m = write_manifest(
            stage,
            kind="dataset",
            step="synth",
            config=sub,
            parents=[],
            counts={"rows": n, "images": stats["images"]},
            extra=extra,
        )
    return m


def run_synth(out_root: Path, cfg: SynthConfig) -> dict[str, Manifest]:
    """Write ``out_root/<kind>/`` for every synthetic kind; returns the manifests by kind."""
    out_root = Path(out_root)
    if out_root.exists() and not out_root.is_dir():
        raise NotADirectoryError(f"out_root must be a directory, got the file {out_root}")
    return {kind: synth_kind(out_root / kind, cfg, kind) for kind in SYNTH_KINDS}
