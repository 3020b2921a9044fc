"""Held-out evaluation sets: the project's synthetic generators under a separate seed namespace, checked
against the training data so that no evaluated item was ever trained on.

Seeds: task ``t`` of an eval with seed ``s`` draws its rows from the synthetic generator of its source kind
with seed ``10_000 + 100 * s + k(t)`` (``heldout_seed``); training corpora use small seeds (the tiny recipe
uses 0), so row ids (``<kind>-<seed>-<index>``) never collide and every picture is new.

Overlap check (``TrainingIndex``), exact matches after normalisation (``dedup.normalize_text``: NFKC,
casefold, punctuation -> space, whitespace collapsed), against every dataset under ``ROOT/validated`` (the
records) and the ids under ``ROOT/tokenized`` (what the trainer reads):

- ``id``: the row id;
- ``doc``: ``dedup.exact_key`` (normalised text or role-tagged turns + the sha256 of every image's bytes);
- ``unit`` (text-only rows on both sides): every paragraph / turn content, split on blank lines, of at least
  three words. A held-out math question or prose paragraph that also occurs inside any training text (a CoT
  problem with the same parameters, a paragraph of a training window) counts as overlap even though the
  whole records differ.

Candidates that overlap are skipped (counted in ``rejected``) and generation continues until ``n`` items are
found or ``max_candidates`` rows were tried; ``overlap`` is then recounted on the final set (must be 0).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.data.dedup import exact_key, normalize_text
from tasks.data.io import iter_rows
from tasks.data.qa_facts import object_facts
from tasks.data.row_store import RowStore
from tasks.data.schema import IMAGE_TOKEN, RECORD_SCHEMA, VIDEO_TOKEN
from tasks.data.synth import SYNTH_KINDS, SynthConfig, generate_rows
from tasks.data.synth_kinds import box_text
from tasks.data.synth_text import MathProblem, verify_problem
from tasks.io.manifest import MANIFEST_NAME

HELDOUT_SEED_BASE = 10_000
# task -> (synthetic source kind, seed offset inside the namespace)
SOURCES: dict[str, tuple[str, int]] = {
    "vqa": ("caption", 1),
    "counting": ("caption", 2),
    "ocr": ("ocr", 3),
    "grounding": ("grounding", 4),
    "chart_qa": ("chart_qa", 5),
    "doc_qa": ("doc_qa", 6),
    "video_qa": ("video_qa", 7),
    "caption_loss": ("caption", 8),
    "text_loss": ("text", 9),
    "math": ("cot", 10),
}
HELDOUT_TASKS = tuple(SOURCES)
_MIN_UNIT_WORDS = 3


def heldout_seed(task: str, seed: int = 0) -> int:
    if task not in SOURCES:
        raise ValueError(f"task must be one of {HELDOUT_TASKS}, got {task!r}")
    return HELDOUT_SEED_BASE + 100 * seed + SOURCES[task][1]


@dataclass
class EvalItem:
    """One evaluation item. ``question`` is the chat content, ``plain`` the continuation prompt (both with
    media placeholders); ``record`` is the synthetic row it came from (the loss tasks score it whole)."""

    task: str
    id: str
    question: str
    answer: str
    plain: str
    images: list[dict[str, Any]] = field(default_factory=list)
    media_kind: str = "none"
    meta: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] | None = None


@dataclass
class HeldoutSet:
    task: str
    seed: int
    items: list[EvalItem]
    candidates: int  # rows generated
    rejected: int  # rows skipped because they overlap the training data
    unusable: int  # rows that gave no item of this task (e.g. no counting fact)
    checked: bool  # whether a training index was given
    overlap: int | None = None  # overlaps left in ``items`` (recounted; None when not checked)

    def summary(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "items": len(self.items),
            "candidates": self.candidates,
            "rejected_overlap": self.rejected,
            "unusable": self.unusable,
            "checked": self.checked,
            "overlap": self.overlap,
        }


# ------------------------------------------------------------------------------------ training index


def _h(s: str) -> bytes:
    return hashlib.sha256(s.encode()).digest()


def row_units(row: dict[str, Any]) -> list[str]:
    """Normalised paragraphs / turn contents (split on blank lines) of a text-only row (>= 3 words)."""
    texts = (
        [row["text"]] if row.get("text") is not None else [m["content"] for m in row.get("messages") or []]
    )
    out = []
    for t in texts:
        for part in t.replace(IMAGE_TOKEN, " ").replace(VIDEO_TOKEN, " ").split("\n\n"):
            n = normalize_text(part)
            if len(n.split()) >= _MIN_UNIT_WORDS:
                out.append(n)
    return out


class TrainingIndex:
    """Hashes of the training data (ids, whole records, text units) for exact overlap checks."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.docs: set[bytes] = set()
        self.units: set[bytes] = set()
        self.datasets: list[str] = []
        self.rows = 0

    def add(self, row: dict[str, Any]) -> None:
        self.ids.add(row["id"])
        self.docs.add(exact_key(row))
        if not row.get("images"):
            self.units.update(_h(u) for u in row_units(row))
        self.rows += 1

    @classmethod
    def from_data_root(cls, root: Path) -> TrainingIndex:
        """Index ``root/validated/*`` (records) and the ids of ``root/tokenized/*``."""
        root = Path(root)
        validated, tokenized = root / "validated", root / "tokenized"
        if not validated.is_dir() and not tokenized.is_dir():
            raise FileNotFoundError(
                f"train_data_root: {root} holds neither validated/ nor tokenized/ datasets"
            )
        idx = cls()
        for layer in (validated, tokenized):
            if not layer.is_dir():
                continue
            for d in sorted(p for p in layer.iterdir() if (p / MANIFEST_NAME).is_file()):
                idx.datasets.append(f"{layer.name}/{d.name}")
                if layer is validated:
                    for row in iter_rows(d, RECORD_SCHEMA):
                        idx.add(row)
                else:
                    idx.ids.update(RowStore(d).to_table(["id"]).column("id").to_pylist())
        return idx

    def overlaps(self, row: dict[str, Any]) -> list[str]:
        """How ``row`` overlaps the training data: a subset of ["id", "doc", "unit"] (empty = held out)."""
        why = []
        if row["id"] in self.ids:
            why.append("id")
        if exact_key(row) in self.docs:
            why.append("doc")
        if not row.get("images") and any(_h(u) in self.units for u in row_units(row)):
            why.append("unit")
        return why


# ------------------------------------------------------------------------------------- item builders


def _qa(q: str, placeholder: str) -> tuple[str, str]:
    """(chat content, plain content) for a question about the media."""
    lead = f"{placeholder}\n" if placeholder else ""
    return f"{lead}{q}", f"{lead}Question: {q}\nAnswer:"


def _user_question(row: dict[str, Any]) -> str:
    content = next(m["content"] for m in row["messages"] if m["role"] == "user")
    for tok in (IMAGE_TOKEN, VIDEO_TOKEN):
        content = content.replace(tok, "")
    return content.strip()


def make_item(task: str, row: dict[str, Any], rng: random.Random) -> EvalItem | None:
    """The eval item of ``task`` made from one synthetic row (None if the row cannot give one)."""
    meta = json.loads(row["meta"])
    base = {
        "task": task,
        "id": row["id"],
        "images": list(row["images"]),
        "media_kind": row["media_kind"],
        "record": row,
    }
    if task in ("vqa", "counting"):
        facts = object_facts(meta["scene"]["objects"], "image")
        want = "int" if task == "counting" else "text"
        facts = [f for f in facts if f.answer_type == want]
        if not facts:
            return None
        f = rng.choice(facts)
        chat, plain = _qa(f.question, IMAGE_TOKEN)
        return EvalItem(question=chat, answer=f.answer, plain=plain, meta={"source": f.source}, **base)
    if task == "ocr":
        lines = meta["lines"]
        q = "What text is written in the image?" + (" Give every line." if len(lines) > 1 else "")
        return EvalItem(question=f"{IMAGE_TOKEN}\n{q}", answer="\n".join(lines), plain=IMAGE_TOKEN, **base)
    if task == "grounding":
        k = meta["targets"][0]
        obj = meta["scene"]["objects"][k]
        q = f"Give the bounding box of the {obj['color']} {obj['shape']} in the image."
        box = meta["boxes"][0]
        plain = f"{IMAGE_TOKEN}{meta['refs'][0]} is at"
        return EvalItem(
            question=f"{IMAGE_TOKEN}\n{q}", answer=box_text(box), plain=plain, meta={"box": box}, **base
        )
    if task in ("chart_qa", "doc_qa", "video_qa"):
        ph = VIDEO_TOKEN if task == "video_qa" else IMAGE_TOKEN
        chat, plain = _qa(_user_question(row), ph)
        return EvalItem(question=chat, answer=str(meta["answer"]), plain=plain, **base)
    if task == "math":
        p = MathProblem(meta["problem_type"], meta["question"], [], "", meta["answer"], meta["params"])
        if not verify_problem(p):
            return None
        chat, plain = _qa(meta["question"], "")
        return EvalItem(
            question=chat, answer=str(meta["answer"]), plain=plain, meta={"type": p.ptype}, **base
        )
    if task in ("caption_loss", "text_loss"):
        return EvalItem(question="", answer="", plain="", **base)
    raise ValueError(f"task must be one of {HELDOUT_TASKS}, got {task!r}")


def _rows(kind: str, seed: int, n: int, synth: dict[str, Any]) -> Iterator[dict[str, Any]]:
    clean = {"exact_duplicate_rate": 0.0, "near_duplicate_rate": 0.0, "corrupt_rate": 0.0}
    counts = {k: 0 for k in SYNTH_KINDS}
    cfg = SynthConfig(**{**counts, kind: n, **synth, **clean, "seed": seed})
    return generate_rows(cfg, kind)


def build_heldout(
    task: str,
    n: int,
    *,
    seed: int = 0,
    index: TrainingIndex | None = None,
    synth: dict[str, Any] | None = None,
    max_candidates: int | None = None,
) -> HeldoutSet:
    """``n`` items of ``task`` from fresh synthetic rows, skipping rows that overlap ``index``.

    ``synth``: SynthConfig overrides for picture sizes etc. (``image_min_side``, ``video_max_side``, ...).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    kind, _ = SOURCES.get(task, (None, 0))
    if kind is None:
        raise ValueError(f"task must be one of {HELDOUT_TASKS}, got {task!r}")
    s = heldout_seed(task, seed)
    limit = max_candidates or 8 * n + 32
    items: list[EvalItem] = []
    tried = rejected = unusable = 0
    if n:
        for row in _rows(kind, s, limit, synth or {}):
            tried += 1
            if index is not None and index.overlaps(row):
                rejected += 1
                continue
            item = make_item(task, row, random.Random(f"{s}/{row['id']}"))
            if item is None:
                unusable += 1
                continue
            items.append(item)
            if len(items) == n:
                break
    out = HeldoutSet(task, s, items, tried, rejected, unusable, checked=index is not None)
    if index is not None:
        out.overlap = count_overlap(out, index)
    return out


def count_overlap(hs: HeldoutSet, index: TrainingIndex) -> int:
    """Items of ``hs`` whose source row overlaps the training data (recounted on the final set)."""
    return sum(bool(it.record is None or index.overlaps(it.record)) for it in hs.items)
