"""Scoring functions of the evaluation suite: pure functions of (generation, ground truth), plus the one
model-dependent metric, the teacher-forced loss.

- VQA / counting: exact match after normalisation (``qa_facts.normalize``: lower case, spaces collapsed, end
  punctuation and a leading article stripped, colour/gray spelling unified); counting compares the single
  number in the answer (digits or a small number word). ``contains_match`` is the lenient companion (the
  gold answer's tokens appear contiguously in the answer), useful for chatty models.
- OCR: character accuracy = 1 - Levenshtein(pred, gold) / max(|pred|, |gold|) on whitespace-collapsed
  strings (1 - normalised edit distance; Levenshtein 1966, the usual two-row dynamic programme).
- Grounding: the first ``<box>(x1,y1),(x2,y2)</box>`` of the answer, coordinates in [0, 1000] (the
  project's grounding convention, ``synth_render.norm_box``); IoU with the ground-truth box; accuracy@0.5.
- Chart / document QA: relaxed accuracy as in ChartQA (Masry et al. 2022): a numeric gold answer is matched
  by a predicted number within 5% relative error (exact when the gold value is 0); other answers by exact
  match.
- Math: the final answer is the text after the last ``◁/think▷`` (the long-CoT format, REFERENCE.md stage 7):
  "The answer is N" or else its last number; without a closing think marker, the last number of the whole
  generation. It must equal the problem's verified answer.
- Caption loss / text retention: teacher-forced mean cross-entropy per target token over a set of
  documents, packed into ``cu_seqlens`` batches (one forward per batch, no logits materialised).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tasks.data.qa_facts import normalize, parse_number, tokens
from tasks.data.special_tokens import SPECIAL_TOKENS, THINK_END, THINK_START

_NUM_RE = re.compile(r"-?\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_BOX_RE = re.compile(
    r"<box>\s*\(\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\)\s*,"
    r"\s*\(\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\)\s*</box>"
)
_ANSWER_PREFIX = re.compile(r"^(?:final answer|the answer is|answer)\s*[:\-]?\s*", re.I)
_ANSWER_IS = re.compile(r"answer is\s*[:\-]?\s*(-?\d[\d,]*(?:\.\d+)?)", re.I)
_STRIP_SPECIALS = tuple(t for t in SPECIAL_TOKENS if t not in (THINK_START, THINK_END))


def strip_special(text: str) -> str:
    """Remove every special-token string except the think markers."""
    for t in _STRIP_SPECIALS:
        text = text.replace(t, "")
    return text


def numbers(text: str) -> list[float]:
    """Every number in ``text`` (thousands separators removed), in order."""
    return [float(x) for x in _NUM_RE.findall(_THOUSANDS.sub("", text))]


def extract_answer(generation: str) -> str:
    """The short answer of a generation: after the last ``◁/think▷`` (if any), the first non-empty line,
    without an "Answer:" / "The answer is" prefix."""
    text = strip_special(generation)
    if THINK_END in text:
        text = text.rsplit(THINK_END, 1)[1]
    elif THINK_START in text:  # thinking never closed: no answer was given
        return ""
    for line in text.splitlines():
        if line.strip():
            return _ANSWER_PREFIX.sub("", line.strip()).strip()
    return ""


def exact_match(pred: str, gold: str) -> float:
    """1.0 when the normalised short answer equals the normalised gold answer."""
    return float(normalize(extract_answer(pred)) == normalize(gold))


def contains_match(pred: str, gold: str) -> float:
    """1.0 when the gold answer's alphanumeric tokens appear contiguously in the short answer."""
    p, g = f" {tokens(extract_answer(pred))} ", f" {tokens(gold)} "
    return float(bool(g.strip()) and g in p)


def count_match(pred: str, gold: int | str) -> float:
    """1.0 when the answer holds exactly one number (or number word) and it equals ``gold``."""
    got = parse_number(extract_answer(pred))
    return float(got is not None and got == float(gold))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_accuracy(pred: str, gold: str) -> float:
    """1 - normalised edit distance between whitespace-collapsed strings (case and punctuation kept)."""
    p = " ".join(strip_special(pred).split())
    g = " ".join(gold.split())
    if not p and not g:
        return 1.0
    return 1.0 - levenshtein(p, g) / max(len(p), len(g))


Box = tuple[float, float, float, float]


def parse_box(text: str) -> Box | None:
    """The first ``<box>(x1,y1),(x2,y2)</box>`` in ``text``, corners ordered and clamped to [0, 1000]."""
    m = _BOX_RE.search(text)
    if m is None:
        return None
    x1, y1, x2, y2 = (min(1000.0, max(0.0, float(v))) for v in m.groups())
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def box_iou(a: Box | Sequence[float], b: Box | Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0 when either has no area."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def grounding_iou(pred: str, gold_box: Sequence[float]) -> float:
    """IoU of the first box in ``pred`` with ``gold_box``; 0 when no box can be parsed."""
    box = parse_box(strip_special(pred))
    return 0.0 if box is None else box_iou(box, gold_box)


def as_number(s: str) -> float | None:
    """``s`` as a number when the whole string is one (``"42"``, ``"1,234.5"``, ``"-3"``), else None."""
    t = _THOUSANDS.sub("", s.strip()).rstrip(".")
    return float(t) if re.fullmatch(r"-?\d+(?:\.\d+)?", t) else None


def relaxed_match(pred: str, gold: str, tol: float = 0.05) -> float:
    """ChartQA relaxed accuracy: numbers within ``tol`` relative error (exact for 0), else exact match."""
    g = as_number(gold)
    if g is None:
        return exact_match(pred, gold)
    nums = numbers(extract_answer(pred))
    if not nums:
        return 0.0
    p = nums[-1]
    return float(p == g if g == 0 else abs(p - g) <= tol * abs(g))


def math_answer(generation: str) -> float | None:
    """The final numeric answer of a (long-CoT) generation, or None."""
    text = strip_special(generation)
    if THINK_END in text:
        tail = text.rsplit(THINK_END, 1)[1]
        m = _ANSWER_IS.search(tail)
        if m:
            return float(_THOUSANDS.sub("", m.group(1)))
        nums = numbers(tail)
        return nums[-1] if nums else None
    nums = numbers(text)
    return nums[-1] if nums else None


def math_correct(generation: str, answer: float) -> float:
    got = math_answer(generation)
    return float(got is not None and abs(got - float(answer)) < 1e-9)


def mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# --------------------------------------------------------------------------------------------- losses


@dataclass
class LossDoc:
    """One document for teacher forcing: ids (T,), labels (T,) already shifted (-100 = ignored), images."""

    input_ids: torch.Tensor  # (T,) long
    labels: torch.Tensor  # (T,) long
    pixel_values: torch.Tensor | None = None  # (P, 3, 14, 14)
    grid_hws: torch.Tensor | None = None  # (N, 2) long


@torch.no_grad()
def teacher_forced_loss(
    model: torch.nn.Module, docs: Sequence[LossDoc], *, batch_tokens: int = 4096, device: str | None = None
) -> dict[str, float]:
    """Mean CE per target token over ``docs`` (token-weighted), its perplexity and the token count.

    Documents are packed into batches of at most ``batch_tokens`` tokens (a longer one goes alone); each
    document is its own ``cu_seqlens`` segment, so no attention crosses documents.
    """
    if not docs:
        raise ValueError("teacher_forced_loss: docs is empty")
    dev = torch.device(device) if device else next(model.parameters()).device
    total, count, batches = 0.0, 0, 0
    group: list[LossDoc] = []

    def flush() -> None:
        nonlocal total, count, batches
        if not group:
            return
        ids = torch.cat([d.input_ids for d in group]).to(dev)  # (T,)
        labels = torch.cat([d.labels for d in group]).to(dev)  # (T,)
        lens = torch.tensor([0] + [d.input_ids.numel() for d in group])
        cu = torch.cumsum(lens, 0).to(dev)  # (S+1,)
        imgs = [d for d in group if d.grid_hws is not None and d.grid_hws.numel()]
        pv = torch.cat([d.pixel_values for d in imgs]).to(dev) if imgs else None  # (P, 3, p, p)
        gh = torch.cat([d.grid_hws for d in imgs]).to(dev) if imgs else None  # (N, 2)
        if pv is not None:
            pv = pv.to(next(model.parameters()).dtype)
        out = model(ids, cu_seqlens=cu, labels=labels, pixel_values=pv, grid_hws=gh, return_logits=False)
        total += float(out.loss_sum)
        count += int(out.num_loss_tokens)
        batches += 1
        group.clear()

    size = 0
    for d in docs:
        n = d.input_ids.numel()
        if group and size + n > batch_tokens:
            flush()
            size = 0
        group.append(d)
        size += n
    flush()
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count, "batches": batches}
