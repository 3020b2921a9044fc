"""Ground truth for QA synthesis: facts derivable from a record's ``meta`` and text, and answer matching.

A ``Fact`` is a question with its one correct answer, derived from what the record itself guarantees:

- synthetic scene metadata (``objects``: shape, color, size, position): counts, colours, shapes, positions;
- chart data (``labels``/``values``, also under ``chart``): max/min category, a value, comparisons;
- document fields (``fields``: dict, ``[key, value]`` pairs or ``{"key"|"name", "value"}``): field values;
- OCR strings (``lines`` or ``ocr_text``/``ocr``): the text of a line;
- video motion (``direction`` + ``shape``/``color``, ``num_shapes``): where the object moves;
- templated text facts (``facts``: corners / sum / product);
- plain text (the record's *passage*): cloze and "which word comes right after X" questions
  (``tasks.data.qa_passage``).

Keys are looked up in ``meta`` and one level down (``meta["scene"]["objects"]`` works too). Each fact also
carries plausible WRONG answers (off-by-one counts, another colour, a corrupted string...), which the
metadata generator uses to simulate an imperfect model; every wrong answer provably fails ``answers_match``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from tasks.data.schema import IMAGE_TOKEN, VIDEO_TOKEN

AnswerType = Literal["int", "number", "text", "yesno"]
SHAPE_WORDS = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLOR_WORDS = ("red", "green", "blue", "yellow", "orange", "purple", "black", "pink", "white", "grey")
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
SIZE_WORDS = ("small", "medium", "large")
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


_NUM_WORDS = {
    w: i
    for i, w in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
        ]
    )
}
_NUM_RE = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Candidate:
    """One generated QA pair. ``injected_error`` is set only by simulating generators (never read by the
    verifier): it lets tests and the manifest measure how many planted errors the verifier caught."""

    question: str
    answer: str
    rationale: str | None = None
    injected_error: bool = False


@dataclass(frozen=True)
class Fact:
    question: str
    answer: str
    answer_type: AnswerType
    source: str  # "objects" | "chart" | "document" | "ocr" | "motion" | "text_facts" | "cloze" | "follows"
    uses_media: bool  # the question is about the image/video (else about the passage)
    wrong: tuple[str, ...] = ()


def normalize(s: str) -> str:
    """Lower-case, collapse spaces, strip end punctuation and a leading article."""
    s = " ".join(str(s).lower().replace("colour", "color").replace("gray", "grey").split())
    s = s.strip(" .,;:!?\"'`()[]{}")
    return re.sub(r"^(the|a|an) ", "", s)


def tokens(s: str) -> str:
    """``normalize(s)`` reduced to space-separated alphanumeric tokens (for containment tests)."""
    return " ".join(re.findall(r"[a-z0-9]+", normalize(s)))


def parse_number(s: str) -> float | None:
    """The single number in ``s`` (digits or a small number word), else None."""
    nums = _NUM_RE.findall(str(s).replace(",", ""))
    if len(nums) == 1:
        return float(nums[0])
    if not nums:
        words = [_NUM_WORDS[w] for w in normalize(s).split() if w in _NUM_WORDS]
        if len(words) == 1:
            return float(words[0])
    return None


def answers_match(fact: Fact, got: str, rel_tol: float = 0.01, abs_tol: float = 1e-6) -> bool:
    if fact.answer_type in ("int", "number"):
        g, e = parse_number(got), float(fact.answer)
        if g is None:
            return False
        tol = 0.0 if fact.answer_type == "int" else max(abs_tol, rel_tol * abs(e))
        return abs(g - e) <= tol
    if fact.answer_type == "yesno":
        words = re.findall(r"[a-z]+", normalize(got))
        return bool(words) and words[0] == normalize(fact.answer)
    return normalize(got) == normalize(fact.answer)


def record_passage(record: dict[str, Any], max_chars: int) -> str:
    """The record's text (or message contents), placeholders removed, cut at a sentence end <= max_chars."""
    parts = [record["text"]] if record.get("text") else [m["content"] for m in record.get("messages") or []]
    text = "\n".join(p.replace(IMAGE_TOKEN, " ").replace(VIDEO_TOKEN, " ") for p in parts)
    text = "\n".join(" ".join(line.split()) for line in text.splitlines() if line.strip())
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    end = max(cut.rfind(". "), cut.rfind(".\n"), cut.rfind("? "), cut.rfind("! "))
    return cut[: end + 1] if end > 0 else cut


def _find(meta: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if k in meta:
            return meta[k]
    for v in meta.values():
        if isinstance(v, dict):
            for k in keys:
                if k in v:
                    return v[k]
    return None


def corrupt_string(s: str) -> str:
    """``s`` with its last alphanumeric character changed (a different normalised string), or ``""``."""
    for i in range(len(s) - 1, -1, -1):
        c = s[i]
        if c.isdigit():
            return s[:i] + str((int(c) + 1) % 10) + s[i + 1 :]
        if c.isalpha():
            r = "x" if c.lower() != "x" else "y"
            return s[:i] + r + s[i + 1 :]
    return ""


def _count_wrong(n: int) -> tuple[str, ...]:
    return (str(n + 1), str(n - 1)) if n > 0 else (str(n + 1),)


def _others(value: str, vocab: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return tuple(v for v in vocab if normalize(v) != normalize(value))


def _fmt_num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _plural(shape: str) -> str:
    return shape + "es" if shape.endswith(("s", "x", "ch", "sh")) else shape + "s"


def object_facts(objects: list[dict[str, Any]], where: str) -> list[Fact]:
    objs = [o for o in objects if isinstance(o, dict) and isinstance(o.get("shape"), str)]
    if not objs:
        return []
    F = lambda q, a, t, w: Fact(q, a, t, "objects", True, w)  # noqa: E731
    facts = [F(f"How many objects are in the {where}?", str(len(objs)), "int", _count_wrong(len(objs)))]
    shapes = sorted({o["shape"] for o in objs})
    for s in shapes:
        n = sum(o["shape"] == s for o in objs)
        facts.append(F(f"How many {_plural(s)} are in the {where}?", str(n), "int", _count_wrong(n)))
    colors = [o.get("color", o.get("colour")) for o in objs]
    palette = sorted(set(COLOR_WORDS) | {c for c in colors if isinstance(c, str)})
    for o, c in zip(objs, colors, strict=True):
        s = o["shape"]
        if not isinstance(c, str):
            continue
        if sum(x["shape"] == s for x in objs) == 1:
            facts.append(F(f"What color is the {s} in the {where}?", c, "text", _others(c, palette)))
        if colors.count(c) == 1:
            shape_vocab = sorted(set(SHAPE_WORDS) | set(shapes))
            facts.append(
                F(f"What shape is the {c} object in the {where}?", s, "text", _others(s, shape_vocab))
            )
        unique = sum(x["shape"] == s and x.get("color", x.get("colour")) == c for x in objs) == 1
        if unique and isinstance(o.get("position"), str):
            p = o["position"]
            facts.append(F(f"Where is the {c} {s} in the {where}?", p, "text", _others(p, POSITIONS)))
        if unique and isinstance(o.get("size"), str):
            z = o["size"]
            facts.append(F(f"What size is the {c} {s} in the {where}?", z, "text", _others(z, SIZE_WORDS)))
    return facts


def chart_facts(labels: list[Any], values: list[Any]) -> list[Fact]:
    ok = (
        isinstance(labels, list)
        and isinstance(values, list)
        and len(labels) == len(values) >= 2
        and all(isinstance(x, str) for x in labels)
        and len({normalize(x) for x in labels}) == len(labels)
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    )
    if not ok:
        return []
    F = lambda q, a, t, w: Fact(q, a, t, "chart", True, w)  # noqa: E731
    facts = []
    hi, lo = max(values), min(values)
    if values.count(hi) == 1:
        lab = labels[values.index(hi)]
        facts.append(
            F("Which category has the highest value in the chart?", lab, "text", _others(lab, labels))
        )
    if values.count(lo) == 1:
        lab = labels[values.index(lo)]
        facts.append(
            F("Which category has the lowest value in the chart?", lab, "text", _others(lab, labels))
        )
    for lab, v in zip(labels, values, strict=True):
        d = max(1.0, round(0.2 * abs(v)))
        facts.append(
            F(f"What is the value of {lab} in the chart?", _fmt_num(v), "number", (_fmt_num(v + d),))
        )
    for i in range(len(labels) - 1):
        a, b, va, vb = labels[i], labels[i + 1], values[i], values[i + 1]
        if va == vb:
            continue
        yes = "yes" if va > vb else "no"
        facts.append(
            F(
                f"Is the value of {a} greater than the value of {b}?",
                yes,
                "yesno",
                ("no" if yes == "yes" else "yes",),
            )
        )
        big, small, diff = (a, b, va - vb) if va > vb else (b, a, vb - va)
        q = f"By how much does the value of {big} exceed the value of {small}?"
        facts.append(F(q, _fmt_num(diff), "number", (_fmt_num(diff + max(1.0, round(0.2 * diff))),)))
    return facts


def _pairs(fields: Any) -> list[tuple[str, str]]:
    if isinstance(fields, dict):
        items = list(fields.items())
    elif isinstance(fields, list):
        items = []
        for f in fields:
            if isinstance(f, list | tuple) and len(f) == 2:
                items.append((f[0], f[1]))
            elif isinstance(f, dict) and "value" in f:
                items.append((f.get("key", f.get("name")), f["value"]))
    else:
        return []
    return [(str(k), str(v)) for k, v in items if isinstance(k, str) and isinstance(v, str | int | float)]


def document_facts(fields: Any, title: Any) -> list[Fact]:
    pairs = _pairs(fields)
    keys = [normalize(k) for k, _ in pairs]
    facts = []
    for k, v in pairs:
        if keys.count(normalize(k)) != 1 or not corrupt_string(v):
            continue
        wrong = (*[w for _, w in pairs if normalize(w) != normalize(v)][:2], corrupt_string(v))
        facts.append(Fact(f"According to the document, what is the {k}?", v, "text", "document", True, wrong))
    if isinstance(title, str) and corrupt_string(title) and pairs:
        facts.append(
            Fact(
                "What is the title of the document?",
                title,
                "text",
                "document",
                True,
                (corrupt_string(title),),
            )
        )
    return facts


def ocr_facts(lines: list[str], where: str) -> list[Fact]:
    lines = [ln for ln in lines if isinstance(ln, str) and ln.strip() and corrupt_string(ln)]
    if len(lines) == 1:
        return [
            Fact(
                f"What text is written in the {where}?",
                lines[0],
                "text",
                "ocr",
                True,
                (corrupt_string(lines[0]),),
            )
        ]
    return [
        Fact(
            f"What text is written on line {i + 1} of the {where}?",
            ln,
            "text",
            "ocr",
            True,
            (corrupt_string(ln),),
        )
        for i, ln in enumerate(lines)
    ]


def motion_facts(meta: dict[str, Any]) -> list[Fact]:
    facts = []
    d, s, c = meta.get("direction"), meta.get("shape"), meta.get("color", meta.get("colour"))
    if isinstance(d, str) and isinstance(s, str):
        name = f"{c} {s}" if isinstance(c, str) else s
        opposite = OPPOSITE.get(d)
        wrong = ((opposite,) if opposite else ()) + _others(d, [x for x in OPPOSITE if x != opposite])
        facts.append(
            Fact(f"In which direction does the {name} move in the video?", d, "text", "motion", True, wrong)
        )
    frames = meta.get("num_frames")
    if isinstance(frames, int) and not isinstance(frames, bool):
        facts.append(
            Fact(
                "How many frames does the video have?",
                str(frames),
                "int",
                "motion",
                True,
                _count_wrong(frames),
            )
        )
    n = meta.get("num_shapes")
    if isinstance(n, int) and not isinstance(n, bool):
        facts.append(
            Fact("How many shapes are in the video?", str(n), "int", "motion", True, _count_wrong(n))
        )
    return facts


def text_facts(facts: Any) -> list[Fact]:
    out = []
    for f in facts if isinstance(facts, list) else []:
        if not isinstance(f, dict) or not isinstance(f.get("value"), int):
            continue
        v, kind = f["value"], f.get("fact")
        if kind == "corners" and isinstance(f.get("shape"), str):
            q = f"According to the passage, how many corners does a {f['shape']} have?"
        elif kind in ("sum", "product") and isinstance(f.get("a"), int) and isinstance(f.get("b"), int):
            q = f"According to the passage, what is {f['a']} {'plus' if kind == 'sum' else 'times'} {f['b']}?"
        else:
            continue
        out.append(Fact(q, str(v), "int", "text_facts", False, _count_wrong(v)))
    return out


def meta_facts(meta: dict[str, Any], media_kind: str) -> list[Fact]:
    """Every fact the metadata guarantees, in a deterministic order (no duplicate questions)."""
    where = "video" if media_kind == "video" else "image"
    facts: list[Fact] = []
    if media_kind != "none":
        objects = _find(meta, "objects", "shapes")
        if isinstance(objects, list):
            facts += object_facts(objects, where)
        chart = meta.get("chart") if isinstance(meta.get("chart"), dict) else meta
        facts += chart_facts(chart.get("labels", chart.get("categories")), chart.get("values"))
        fields = _find(meta, "fields")
        if fields is not None:
            facts += document_facts(fields, _find(meta, "title"))
        lines = _find(meta, "lines", "ocr_lines")
        if lines is None and isinstance(_find(meta, "ocr_text", "ocr"), str):
            lines = _find(meta, "ocr_text", "ocr").splitlines()
        if isinstance(lines, list):
            facts += ocr_facts(lines, where)
        if media_kind == "video":
            motion = meta.get("motion") if isinstance(meta.get("motion"), dict) else meta
            facts += motion_facts(motion)
    facts += text_facts(_find(meta, "facts"))
    seen: set[str] = set()
    return [f for f in facts if not (normalize(f.question) in seen or seen.add(normalize(f.question)))]
