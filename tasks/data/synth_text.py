"""Text for the synthetic corpus (``tasks/data/synth.py``): real prose, templated facts, verified math CoT.

- Real English prose: the reference-manual topics that ship with CPython (``pydoc_data.topics.topics``,
  ~79 topics, ~465k characters), split into paragraphs with minimal markup cleaning (headers kept as
  section titles, indented code/grammar blocks dropped, ``*emphasis*`` unwrapped, footnote marks removed).
- Templated facts about the synthetic shape world (always true by construction).
- Math problems (arithmetic word problems, linear equations, small combinatorics) with a long
  chain-of-thought trace (planning, steps, a check, a reflection) whose answer is computed twice, by two
  independent routes, and only emitted when both agree (Kimi-VL Sec. 3.3 long-CoT SFT: verified traces).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pydoc_data.topics import topics as _TOPICS
from typing import Any

from tasks.data.special_tokens import THINK_END, THINK_START
from tasks.data.synth_render import BACKGROUNDS, COLORS, CORNERS, SHAPES

_UNDERLINE = re.compile(r"^[*=\-^~+#]{3,}$")
_EMPH = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")
_FOOTNOTE = re.compile(r"\s?\[\d+\]")


@dataclass(frozen=True)
class Paragraph:
    topic: str  # pydoc topic key, e.g. "assert"
    section: str  # nearest header above the paragraph
    text: str


def topics_sha256() -> str:
    """Fingerprint of the prose source (it changes with the Python version)."""
    h = hashlib.sha256()
    for k in sorted(_TOPICS):
        h.update(f"{k}\0{_TOPICS[k]}\0".encode())
    return h.hexdigest()


def clean_block(lines: list[str]) -> str:
    text = " ".join(line.strip() for line in lines)
    text = _EMPH.sub(r"\1", text)
    text = _FOOTNOTE.sub("", text)
    text = re.sub(r"^\*\s+", "", text)  # list bullet
    return re.sub(r"\s+", " ", text).strip()


@lru_cache(maxsize=1)
def prose_paragraphs() -> tuple[Paragraph, ...]:
    """Prose paragraphs (>= 12 words, mostly letters) of every topic, in topic-key order; a paragraph
    repeated in a later topic (some topics embed others) is kept once."""
    out: list[Paragraph] = []
    seen: set[str] = set()
    for key in sorted(_TOPICS):
        section = key
        for block in re.split(r"\n\s*\n", _TOPICS[key]):
            lines = [ln for ln in block.split("\n") if ln.strip()]
            if not lines:
                continue
            if len(lines) >= 2 and _UNDERLINE.match(lines[-1].strip()):
                section = clean_block(lines[:-1])
                continue
            if all(ln.startswith("   ") for ln in lines) or lines[0].startswith("   "):
                continue  # code sample, grammar rule or indented table
            text = clean_block(lines)
            letters = sum(c.isalpha() or c.isspace() for c in text)
            if (
                len(text.split()) >= 12
                and letters >= 0.8 * len(text)
                and text[-1] in ".:)"
                and text not in seen
            ):
                seen.add(text)
                out.append(Paragraph(key, section, text))
    return tuple(out)


def prose_window(start: int, length: int) -> tuple[str, list[str]]:
    """``length`` consecutive paragraphs from ``start`` (wrapping around); returns (text, topics)."""
    paras = prose_paragraphs()
    chosen = [paras[(start + k) % len(paras)] for k in range(length)]
    return "\n\n".join(p.text for p in chosen), sorted({p.topic for p in chosen})


def long_document(rng: random.Random, n_words: int) -> tuple[str, list[str]]:
    """A long document: a title, then sections ("## <section title>") of consecutive paragraphs of one
    topic each, in random topic order, until ``n_words`` words; returns (text, section titles)."""
    paras = prose_paragraphs()
    by_topic: dict[str, list[Paragraph]] = {}
    for p in paras:
        by_topic.setdefault(p.topic, []).append(p)
    order = sorted(by_topic)
    rng.shuffle(order)
    title = f"Notes on the Python language, volume {rng.randint(1, 99)}"
    parts, sections, words = [f"# {title}"], [], 0
    for topic in itertools.cycle(order):
        group = by_topic[topic]
        start = rng.randrange(len(group))
        take = group[start : start + rng.randint(3, 8)]
        sections.append(take[0].section)
        parts.append(f"## {len(sections)}. {take[0].section}")
        for p in take:
            parts.append(p.text)
            words += len(p.text.split())
        if words >= n_words:
            break
    return "\n\n".join(parts), sections


def shape_fact(rng: random.Random) -> tuple[str, dict[str, Any]]:
    """One templated sentence that is true in the synthetic world."""
    k = rng.randrange(5)
    if k == 0:
        s = rng.choice(SHAPES)
        n = CORNERS[s]
        return f"A {s} has {n} corner{'s' if n != 1 else ''}.", {"fact": "corners", "shape": s, "value": n}
    if k == 1:
        c = rng.choice(list(COLORS))
        r, g, b = COLORS[c]
        return f"In these pictures the colour {c} is drawn as RGB ({r}, {g}, {b}).", {
            "fact": "rgb",
            "color": c,
        }
    if k == 2:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return f"{a} plus {b} equals {a + b}.", {"fact": "sum", "a": a, "b": b, "value": a + b}
    if k == 3:
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        return f"{a} times {b} is {a * b}.", {"fact": "product", "a": a, "b": b, "value": a * b}
    bg = rng.choice(list(BACKGROUNDS))
    s, c = rng.choice(SHAPES), rng.choice(list(COLORS))
    return f"A {c} {s} stands out clearly on a {bg} background.", {"fact": "scene", "shape": s, "color": c}


def fact_paragraph(rng: random.Random, n_sentences: int) -> tuple[str, list[dict[str, Any]]]:
    pairs = [shape_fact(rng) for _ in range(n_sentences)]
    return " ".join(p[0] for p in pairs), [p[1] for p in pairs]


# ----------------------------------------------------------------------------------------------------
# math with verified chain-of-thought

_NAMES = ("Maya", "Leo", "Aisha", "Tom", "Ines", "Kenji", "Sara", "Omar")
_ITEMS = ("pencils", "apples", "stickers", "marbles", "cookies", "stamps")
_BOXES = ("boxes", "bags", "jars", "packs")
_CHOOSE = ("books", "songs", "fruits", "paintings", "stamps", "shells")
_ARRANGE = ("people", "books", "cars", "flags", "cups", "plants", "chairs", "coins")
_ORGS = ("club", "choir", "team", "committee")
_GOODS = ("notebook", "pen", "ruler", "lamp", "mug", "scarf")

COT_TYPES = ("groups", "shopping", "distance", "linear", "linear_both", "choose", "arrange", "roles")


@dataclass(frozen=True)
class MathProblem:
    ptype: str
    question: str
    steps: list[str]  # the worked computation
    check: str  # an independent re-check
    answer: int
    params: dict[str, Any]


def _lin(a: int, b: int) -> str:
    """``a x + b`` written the usual way (``x``, ``-x``, ``3x - 5``)."""
    head = "x" if a == 1 else "-x" if a == -1 else f"{a}x"
    if b == 0:
        return head
    return f"{head} {'+' if b > 0 else '-'} {abs(b)}"


def _groups(rng: random.Random, pick: Callable[[list], Any]) -> MathProblem:
    name, item, box = rng.choice(_NAMES), rng.choice(_ITEMS), rng.choice(_BOXES)
    g, k = rng.randint(2, 9), rng.randint(3, 15)
    m = rng.randint(1, g * k - 1)
    total = g * k
    ans = total - m
    q = f"{name} has {g} {box} with {k} {item} in each. {name} gives away {m} {item}. How many {item} are left?"
    steps = [
        f"First the total: {g} {box} x {k} {item} = {total} {item}.",
        f"Then remove {m}: {total} - {m} = {ans}.",
    ]
    check = f"Check by adding back: {ans} + {m} = {ans + m}, and {ans + m} / {g} = {(ans + m) // g} per {box[:-1]}, which matches {k}."
    return MathProblem("groups", q, steps, check, ans, {"g": g, "k": k, "m": m})


def _shopping(rng: random.Random, pick: Callable[[list], Any]) -> MathProblem:
    name = rng.choice(_NAMES)
    i1, i2 = rng.sample(_GOODS, 2)
    a, p, b, c = rng.randint(2, 9), rng.randint(2, 25), rng.randint(2, 9), rng.randint(2, 25)
    ans = a * p + b * c
    q = f"{name} buys {a} {i1}s at {p} dollars each and {b} {i2}s at {c} dollars each. How many dollars does {name} spend?"
    steps = [
        f"The {i1}s cost {a} x {p} = {a * p} dollars.",
        f"The {i2}s cost {b} x {c} = {b * c} dollars.",
        f"Together: {a * p} + {b * c} = {ans} dollars.",
    ]
    check = f"Check: {ans} - {a * p} = {ans - a * p}, and {ans - a * p} / {b} = {(ans - a * p) // b}, the price of one {i2}."
    return MathProblem("shopping", q, steps, check, ans, {"a": a, "p": p, "b": b, "c": c})


def _distance(rng: random.Random, pick: Callable[[list], Any]) -> MathProblem:
    v, t, w, s = rng.randint(20, 90), rng.randint(1, 5), rng.randint(20, 90), rng.randint(1, 5)
    ans = v * t + w * s
    q = (
        f"A train travels at {v} km per hour for {t} hours, then at {w} km per hour for {s} hours. "
        "How many kilometres does it travel in total?"
    )
    steps = [
        f"First leg: {v} x {t} = {v * t} km.",
        f"Second leg: {w} x {s} = {w * s} km.",
        f"Total: {v * t} + {w * s} = {ans} km.",
    ]
    check = f"Check the units: km per hour times hours gives km, and {ans} - {w * s} = {v * t} = {v} x {t}."
    return MathProblem("distance", q, steps, check, ans, {"v": v, "t": t, "w": w, "s": s})


def _linear(rng: random.Random, pick: Callable[[list], Any]) -> MathProblem:
    x = rng.randint(-12, 12)
    a = rng.choice([k for k in range(-9, 10) if k not in (0,)])
    b = rng.randint(-20, 20)
    c = a * x + b
    q = f"Solve for x: {_lin(a, b)} = {c}."
    steps = [
        f"Move the constant: {a}x = {c} - ({b}) = {c - b}.",
        f"Divide by {a}: x = {c - b} / {a} = {x}.",
    ]
    check = f"Substitute back: {a} x ({x}) + ({b}) = {a * x} + ({b}) = {a * x + b}, which equals {c}."
    return MathProblem("linear", q, steps, check, x, {"a": a, "b": b, "c": c})


def _linear_both(rng: random.Random, pick: Callable[[list], Any]) -> MathProblem:
    x = rng.randint(-10, 10)
    a, c = rng.sample([k for k in range(-8, 9) if k != 0], 2)
    b = rng.randint(-15, 15)
    d = (a - c) * x + b
    q = f"Solve for x: {_lin(a, b)} = {_lin(c, d)}."
    steps = [
        f"Collect x on the left: ({a} - ({c}))x = {d} - ({b}).",
        f"So {a - c}x = {d - b}.",
        f"Divide by {a - c}: x = {x}.",
    ]
    check = f"Substitute back: left side {a * x + b}, right side {c * x + d}; they agree."
    return MathProblem("linear_both", q, steps, check, x, {"a": a, "b": b, "c": c, "d": d})


def _choose(rng: random.Random, pick: Callable[[list], Any]) -> MathProblem:
    n, k = pick([(n, k) for n in range(4, 15) for k in range(2, min(4, n - 1) + 1)])
    noun = rng.choice(_CHOOSE)
    ans = math.comb(n, k)
    q = f"In how many ways can you choose {k} {noun} from {n} different {noun}, if the order does not matter?"
    num = " x ".join(str(n - j) for j in range(k))
    steps = [
        f"Ordered picks: {num} = {math.perm(n, k)}.",
        f"Each choice is counted {k}! = {math.factorial(k)} times.",
        f"So {math.perm(n, k)} / {math.factorial(k)} = {ans}.",
    ]
    check = f"Check with the symmetry C({n},{k}) = C({n},{n - k}) = {math.comb(n, n - k)}."
    return MathProblem("choose", q, steps, check, ans, {"n": n, "k": k, "items": noun})


def _arrange(rng: random.Random, pick: Callable[[list], Any]) -> MathProblem:
    """Three rules, so the small space still has 18 distinct problems."""
    n, rule = pick([(n, r) for n in range(3, 9) for r in ("any", "first", "adjacent")])
    noun = rng.choice(_ARRANGE)
    f1 = math.factorial(n - 1)
    if rule == "any":
        ans = math.factorial(n)
        q = f"In how many different orders can {n} different {noun} be lined up?"
        steps = [
            f"The first place has {n} options, the next {n - 1}, and so on down to 1.",
            f"So the count is {n}! = {' x '.join(str(j) for j in range(n, 0, -1))} = {ans}.",
        ]
        check = f"Check recursively: {n} x {f1} (orders of the other {n - 1}) = {ans}."
    elif rule == "first":
        ans = f1
        q = f"{n} different {noun} are lined up, and one particular item must come first. How many orders are possible?"
        steps = [
            f"The first place is fixed, so only the other {n - 1} items move.",
            f"That is {n - 1}! = {ans}.",
        ]
        check = f"Check: of all {n}! = {math.factorial(n)} orders, each of the {n} items is first equally often: {math.factorial(n)} / {n} = {ans}."
    else:
        ans = 2 * f1
        q = f"{n} different {noun} are lined up, and two particular items must stand next to each other. How many orders are possible?"
        steps = [
            f"Glue the two items into one block: {n - 1} units give {n - 1}! = {f1} orders.",
            f"The block has 2 inner orders, so {f1} x 2 = {ans}.",
        ]
        check = f"Check: the pair occupies one of {n - 1} adjacent slot pairs, in 2 orders, and the other {n - 2} items fill the rest in {math.factorial(n - 2)} ways: {n - 1} x 2 x {math.factorial(n - 2)} = {ans}."
    return MathProblem("arrange", q, steps, check, ans, {"n": n, "rule": rule, "items": noun})


def _roles(rng: random.Random, pick: Callable[[list], Any]) -> MathProblem:
    n, k = pick([(n, k) for n in range(4, 16) for k in (2, 3)])
    org = rng.choice(_ORGS)
    roles = ["a president", "a secretary", "a treasurer"][:k]
    ans = math.perm(n, k)
    named = " and ".join(roles) if k == 2 else f"{roles[0]}, {roles[1]} and {roles[2]}"
    q = f"A {org} of {n} members elects {k} officers, {named}, all different people. How many outcomes are possible?"
    steps = [
        f"Fill the roles one at a time: {' x '.join(str(n - j) for j in range(k))}.",
        f"That gives {ans}.",
    ]
    check = (
        f"Check: choose the {k} people in C({n},{k}) = {math.comb(n, k)} ways, then order them in "
        f"{k}! = {math.factorial(k)} ways: {math.comb(n, k) * math.factorial(k)}."
    )
    return MathProblem("roles", q, steps, check, ans, {"n": n, "k": k, "org": org})


_MAKERS: dict[str, Callable[[random.Random, Callable[[list], Any]], MathProblem]] = {
    "groups": _groups,
    "shopping": _shopping,
    "distance": _distance,
    "linear": _linear,
    "linear_both": _linear_both,
    "choose": _choose,
    "arrange": _arrange,
    "roles": _roles,
}


def make_problem(rng: random.Random, ptype: str, pick: Callable[[list], Any] | None = None) -> MathProblem:
    """A problem of type ``ptype``. The small-space types (choose, arrange, roles) draw their parameters with
    ``pick(space)`` (default ``rng.choice``); the caller can enumerate the space instead to avoid repeats."""
    if ptype not in _MAKERS:
        raise ValueError(f"ptype must be one of {COT_TYPES}, got {ptype!r}")
    return _MAKERS[ptype](rng, pick or rng.choice)


def verify_problem(p: MathProblem) -> bool:
    """Recompute the answer by a second route (brute force or substitution)."""
    q = p.params
    if p.ptype == "groups":
        return sum(q["k"] for _ in range(q["g"])) - q["m"] == p.answer > 0
    if p.ptype == "shopping":
        return sum([q["p"]] * q["a"] + [q["c"]] * q["b"]) == p.answer
    if p.ptype == "distance":
        return sum([q["v"]] * q["t"] + [q["w"]] * q["s"]) == p.answer
    if p.ptype == "linear":
        return q["a"] * p.answer + q["b"] == q["c"]
    if p.ptype == "linear_both":
        return q["a"] * p.answer + q["b"] == q["c"] * p.answer + q["d"]
    if p.ptype == "choose":
        return sum(1 for _ in itertools.combinations(range(q["n"]), q["k"])) == p.answer
    if p.ptype == "arrange":
        keep = {
            "any": lambda o: True,
            "first": lambda o: o[0] == 0,
            "adjacent": lambda o: abs(o.index(0) - o.index(1)) == 1,
        }[q["rule"]]
        return sum(1 for o in itertools.permutations(range(q["n"])) if keep(o)) == p.answer
    if p.ptype == "roles":
        return sum(1 for _ in itertools.permutations(range(q["n"]), q["k"])) == p.answer
    return False


_PLANS = (
    "identify the quantities, decide the operations, then verify the result.",
    "restate what is asked, work it out step by step, and check the answer another way.",
    "figure out what the question wants, compute carefully, then double-check.",
)
_EXPLORE = (
    "is there another way to get this? Working backwards from the result should give the inputs again.",
    "a second method would catch a slip in the first one, so let me try one.",
    "what if I approach it from the other side? The numbers should still fit together.",
)
_REFLECT = (
    "the two routes agree, so I am confident the result is right.",
    "every step used the numbers from the question exactly once, and the check confirms it.",
    "did I read the question correctly? Re-reading it, yes, and the check matches, so the answer stands.",
)


def cot_solution(rng: random.Random, p: MathProblem) -> str:
    """Assistant turn: ``◁think▷`` Plan / Step i / Exploration / Check / Reflection ``◁/think▷``, then the answer
    (the elements of a long-CoT trace in REFERENCE.md stage 7: planning, evaluation, reflection, exploration)."""
    check = p.check if p.check.startswith("Check") else f"Check: {p.check}"
    think = [
        f"Plan: {rng.choice(_PLANS)}",
        f"The question: {p.question}",
        *(f"Step {i + 1}: {s}" for i, s in enumerate(p.steps)),
        f"Exploration: {rng.choice(_EXPLORE)}",
        check,
        f"Reflection: {rng.choice(_REFLECT)}",
    ]
    return f"{THINK_START}\n" + "\n".join(think) + f"\n{THINK_END}\nThe answer is {p.answer}."
