"""One generator per synthetic data kind: ``(rng, ctx, index) -> Draft`` (images still as PIL).

The conversation kinds (sft, cot) live in ``synth_chat.py``.

Used by ``tasks/data/synth.py``, which adds ids, duplicates, corruption and writes the shards. Every
answer or label is derived from the generator's own ground truth (the scene, the chart data, the document
fields, the motion), and that ground truth is kept in ``meta`` so later steps (QA synthesis, contracts,
evaluation) can check answers without looking at pixels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from PIL import Image

from tasks.data.schema import IMAGE_TOKEN, VIDEO_TOKEN
from tasks.data.synth_render import (
    Scene,
    drifting_frames,
    motion_frames,
    render_bar_chart,
    render_document,
    render_text,
    sample_scene,
    sample_size,
    text_size,
)
from tasks.data.synth_text import (
    fact_paragraph,
    long_document,
    prose_paragraphs,
    prose_window,
)

_NUM = {0: "no", 1: "one", 2: "two", 3: "three", 4: "four"}


@dataclass
class Draft:
    """A record before encoding: ``text`` xor ``messages``, PIL images, and ground truth in ``meta``."""

    images: list[Image.Image]
    media_kind: str
    meta: dict[str, Any]
    text: str | None = None
    messages: list[dict[str, str]] | None = None


@dataclass
class Ctx:
    """What the generators need from the config (kept free of pydantic so this module stays standalone)."""

    min_side: int
    max_side: int
    video_max_side: int
    video_frames: tuple[int, int]
    haystack_frames: tuple[int, int]
    long_doc_words: int
    prose_order: list[int] = field(default_factory=list)  # seeded permutation of paragraph indices
    seed: int = 0

    def size(self, rng: random.Random) -> tuple[int, int]:
        return sample_size(rng, self.min_side, self.max_side)

    def video_size(self, rng: random.Random) -> tuple[int, int]:
        hi = max(self.min_side, min(self.max_side, self.video_max_side))
        return sample_size(rng, self.min_side, hi)


def where(pos: str) -> str:
    if pos == "center":
        return "in the center"
    if pos in ("left", "right"):
        return f"on the {pos}"
    if pos in ("top", "bottom"):
        return f"at the {pos}"
    return f"in the {pos}"


def join_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe_scene(rng: random.Random, scene: Scene) -> tuple[str, int]:
    objs = scene.objects
    phrases = [
        f"a {o.size} {o.color} {o.shape} {where(o.meta(scene.width, scene.height)['position'])}" for o in objs
    ]
    n = len(objs)
    t = rng.randrange(4)
    if t == 0:
        s = f"{join_list(phrases)} on a {scene.background} background."
    elif t == 1:
        s = f"A {scene.background} image with {_NUM[n]} shape{'s' * (n > 1)}: {join_list(phrases)}."
    elif t == 2:
        s = f"This picture shows {join_list(phrases)}."
    else:
        s = f"There {'are' if n > 1 else 'is'} {_NUM[n]} shape{'s' * (n > 1)} on a {scene.background} background."
        forms = [
            "The {c} {s} is {z} and sits {w}.",
            "A {z} {c} {s} appears {w}.",
            "{W}, there is a {z} {c} {s}.",
            "You can see a {z} {c} {s} {w}.",
        ]
        rng.shuffle(forms)  # one sentence form per object, so long captions do not repeat themselves
        for o, form in zip(objs, forms, strict=False):
            w = where(o.meta(scene.width, scene.height)["position"])
            s += " " + form.format(c=o.color, s=o.shape, z=o.size, w=w, W=w[0].upper() + w[1:])
    return s[0].upper() + s[1:], t


def box_text(box: list[int]) -> str:
    return f"<box>({box[0]},{box[1]}),({box[2]},{box[3]})</box>"


def scene_for(rng: random.Random, ctx: Ctx, lo: int = 1, hi: int = 4) -> Scene:
    w, h = ctx.size(rng)
    return sample_scene(rng, w, h, rng.randint(lo, hi))


def caption(rng: random.Random, ctx: Ctx, i: int) -> Draft:
    scene = scene_for(rng, ctx)
    text, tpl = describe_scene(rng, scene)
    return Draft([scene.render()], "image", {"scene": scene.meta(), "template": tpl}, text=IMAGE_TOKEN + text)


def grounding(rng: random.Random, ctx: Ctx, i: int) -> Draft:
    scene = scene_for(rng, ctx)
    sm = scene.meta()
    targets = list(range(len(scene.objects))) if rng.random() < 0.4 else [rng.randrange(len(scene.objects))]
    parts, refs = [], []
    for k in targets:
        o, om = scene.objects[k], sm["objects"][k]
        ref = rng.choice(
            [
                f"The {o.color} {o.shape}",
                f"The {o.size} {o.color} {o.shape}",
                f"The {o.color} {o.shape} {where(om['position'])}",
            ]
        )
        refs.append(ref)
        parts.append(f"{ref} is at {box_text(om['box'])}.")
    meta = {
        "scene": sm,
        "targets": targets,
        "refs": refs,
        "boxes": [sm["objects"][k]["box"] for k in targets],
    }
    return Draft([scene.render()], "image", meta, text=IMAGE_TOKEN + " ".join(parts))


@lru_cache(maxsize=1)
def ocr_vocab() -> tuple[str, ...]:
    """Real English words (3-10 ASCII letters) taken from the CPython prose."""
    words = {w.strip(".,:;()\"'").lower() for p in prose_paragraphs()[:400] for w in p.text.split()}
    return tuple(sorted(w for w in words if w.isalpha() and w.isascii() and 3 <= len(w) <= 10))


def _ocr_token(rng: random.Random, vocab: tuple[str, ...]) -> str:
    r = rng.random()
    if r < 0.65:
        w = rng.choice(vocab)
        return rng.choice([w, w.upper(), w.capitalize()])
    if r < 0.85:
        return str(rng.randint(0, 9999))
    return f"{rng.randint(2000, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def ocr(rng: random.Random, ctx: Ctx, i: int) -> Draft:
    """1-3 lines of words/numbers/dates; lines are filled only while they fit the image at the chosen font
    size, so the text stays legible (no shrinking below the sampled size in the common case)."""
    vocab = ocr_vocab()
    size = rng.randint(10, 22)
    max_w = int(0.85 * ctx.max_side) - 8
    max_lines = max(1, min(3, int(0.7 * ctx.max_side) // int(size * 1.3)))
    lines = []
    for _ in range(rng.randint(1, max_lines)):
        toks: list[str] = []
        for _ in range(rng.randint(1, 4)):
            tok = _ocr_token(rng, vocab)
            if text_size(" ".join([*toks, tok]), size)[0] > max_w:
                if not toks:
                    toks.append(str(rng.randint(0, 99)))
                break
            toks.append(tok)
        lines.append(" ".join(toks))
    angle = 0.0 if rng.random() < 0.5 else rng.uniform(-6, 6)
    img, info = render_text(rng, lines, size, angle, ctx.min_side, ctx.max_side)
    string = "\n".join(lines)
    return Draft([img], "image", {"string": string, "lines": lines, **info}, text=IMAGE_TOKEN + string)


_CHARTS = (
    ("Fruit sold per day", "fruit", ("apple", "pear", "fig", "plum", "kiwi", "lime", "mango", "peach")),
    ("Visitors by month", "month", ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug")),
    ("Books read by student", "student", ("Ann", "Bob", "Cem", "Dia", "Eli", "Fay", "Gus", "Hana")),
    ("Rainy days by city", "city", ("Oslo", "Rome", "Lima", "Kyiv", "Doha", "Bern", "Pune", "Nice")),
)


def _say(rng: random.Random, short: str, sentence: str) -> str:
    return short if rng.random() < 0.5 else sentence


def chart_qa(rng: random.Random, ctx: Ctx, i: int) -> Draft:
    title, cat, pool = rng.choice(_CHARTS)
    n = rng.randint(3, 6)
    labels = rng.sample(pool, n)
    values = rng.sample(range(1, 60), n)  # distinct, so max/min are unique
    img = render_bar_chart(rng, title, labels, values, ctx.min_side, ctx.max_side)
    qt = rng.choice(["value", "max", "min", "diff", "sum", "count"])
    if qt == "value":
        k = rng.randrange(n)
        q, ans = f"What is the value for {labels[k]}?", str(values[k])
        a = _say(rng, ans, f"The value for {labels[k]} is {ans}.")
    elif qt in ("max", "min"):
        k = values.index(max(values) if qt == "max" else min(values))
        q, ans = f"Which {cat} has the {'highest' if qt == 'max' else 'lowest'} value?", labels[k]
        a = _say(rng, ans, f"{ans} has the {'highest' if qt == 'max' else 'lowest'} value, {values[k]}.")
    elif qt == "diff":
        j, k = rng.sample(range(n), 2)
        if values[j] < values[k]:
            j, k = k, j
        q, ans = (
            f"How much larger is the value for {labels[j]} than for {labels[k]}?",
            str(values[j] - values[k]),
        )
        a = _say(rng, ans, f"{values[j]} - {values[k]} = {ans}.")
    elif qt == "sum":
        q, ans = "What is the total of all the bars?", str(sum(values))
        a = _say(rng, ans, f"{' + '.join(map(str, values))} = {ans}.")
    else:
        q, ans = "How many bars are in the chart?", str(n)
        a = _say(rng, ans, f"There are {n} bars.")
    meta = {"title": title, "labels": labels, "values": values, "question_type": qt, "answer": ans}
    msgs = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{q}"}, {"role": "assistant", "content": a}]
    return Draft([img], "image", meta, messages=msgs)


_PEOPLE = ("Alice Moreau", "Bram Jansen", "Chen Wei", "Dana Cohen", "Emeka Obi", "Freya Lund", "Goran Ilic")
_CITIES = ("Lyon", "Porto", "Ghent", "Turku", "Graz", "Cork", "Brno", "Split")


def _date(rng: random.Random) -> str:
    return f"{rng.randint(2019, 2026)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def doc_qa(rng: random.Random, ctx: Ctx, i: int) -> Draft:
    kind = rng.choice(["Invoice", "Shipping Label", "Library Card", "Receipt"])
    pool = {
        "Invoice": [
            ("Invoice No", str(rng.randint(1000, 9999))),
            ("Date", _date(rng)),
            ("Customer", rng.choice(_PEOPLE)),
            ("Total", f"{rng.randint(10, 999)}.{rng.randint(0, 99):02d}"),
            ("Due", _date(rng)),
            ("City", rng.choice(_CITIES)),
        ],
        "Shipping Label": [
            ("Order", f"#{rng.randint(10000, 99999)}"),
            ("Name", rng.choice(_PEOPLE)),
            ("City", rng.choice(_CITIES)),
            ("Weight", f"{rng.randint(1, 40)} kg"),
            ("Carrier", rng.choice(["Post", "Rail", "Air"])),
        ],
        "Library Card": [
            ("Member", rng.choice(_PEOPLE)),
            ("Card ID", str(rng.randint(100000, 999999))),
            ("Branch", rng.choice(_CITIES)),
            ("Expires", _date(rng)),
        ],
        "Receipt": [
            ("Shop", f"{rng.choice(_CITIES)} Market"),
            ("Date", _date(rng)),
            ("Items", str(rng.randint(1, 30))),
            ("Paid", f"{rng.randint(1, 300)}.{rng.randint(0, 99):02d}"),
        ],
    }[kind]
    n = rng.randint(3, len(pool))
    fields = pool[:n]
    title = f"{kind} {rng.randint(1, 99)}"
    img = render_document(rng, title, fields, ctx.min_side, ctx.max_side)
    if rng.random() < 0.2:
        q, ans, key = "What is the title of this document?", title, "title"
    else:
        key, ans = rng.choice(fields)
        q = f"What does the {key} field say on this {kind.lower()}?"
    a = _say(rng, ans, f"The {key} is {ans}.")
    meta = {"doc_type": kind, "title": title, "fields": dict(fields), "question_key": key, "answer": ans}
    msgs = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{q}"}, {"role": "assistant", "content": a}]
    return Draft([img], "image", meta, messages=msgs)


def interleaved(rng: random.Random, ctx: Ctx, i: int) -> Draft:
    n = rng.randint(2, 3)
    scenes = [scene_for(rng, ctx, 1, 3) for _ in range(n)]
    ordinals = ("first", "second", "third")
    parts = [f"Shape notebook, page {rng.randint(1, 500)}. Each drawing is described next to it."]
    orders = []
    for k, sc in enumerate(scenes):
        desc, _ = describe_scene(rng, sc)
        intro = f"The {ordinals[k]} drawing: {desc[0].lower()}{desc[1:]}"
        if rng.random() < 0.5:
            parts.append(f"{IMAGE_TOKEN}\n{intro}")
            orders.append("image_then_text")
        else:
            parts.append(f"{intro}\n{IMAGE_TOKEN}")
            orders.append("text_then_image")
        if rng.random() < 0.5:
            parts.append(fact_paragraph(rng, rng.randint(1, 3))[0])
    meta = {"scenes": [s.meta() for s in scenes], "order": orders}
    return Draft([s.render() for s in scenes], "image", meta, text="\n\n".join(parts))


def video_qa(rng: random.Random, ctx: Ctx, i: int) -> Draft:
    w, h = ctx.video_size(rng)
    frames, m = motion_frames(rng, rng.randint(*ctx.video_frames), w, h)
    qt = rng.choice(["direction", "frames", "color", "shape", "count"])
    if qt == "direction":
        q, ans = f"In which direction does the {m['color']} {m['shape']} move?", m["direction"]
    elif qt == "frames":
        q, ans = "How many frames does this video have?", str(m["num_frames"])
    elif qt == "color":
        q, ans = "What colour is the moving shape?", m["color"]
    elif qt == "shape":
        q, ans = f"What shape is the moving {m['color']} object?", m["shape"]
    else:
        q, ans = "How many shapes appear in the video?", str(m["num_shapes"])
    msgs = [{"role": "user", "content": f"{VIDEO_TOKEN}\n{q}"}, {"role": "assistant", "content": ans}]
    return Draft(frames, "video", {**m, "question_type": qt, "answer": ans}, messages=msgs)


def video_haystack(rng: random.Random, ctx: Ctx, i: int) -> Draft:
    w, h = ctx.video_size(rng)
    n = rng.randint(*ctx.haystack_frames)
    frames, metas = drifting_frames(rng, n, w, h)
    objs = [f"a {o['color']} {o['shape']}" for o in metas[0]["objects"]]
    text = f"{VIDEO_TOKEN}\nA clip of {n} frames: {join_list(objs)} drifting on a {metas[0]['background']} background."
    return Draft(frames, "video", {"num_frames": n, "width": w, "height": h, "frames": metas}, text=text)


def long_doc(rng: random.Random, ctx: Ctx, i: int) -> Draft:
    text, sections = long_document(rng, ctx.long_doc_words)
    meta = {"origin": "cpython-docs", "words": len(text.split()), "sections": sections}
    return Draft([], "none", meta, text=text)


def text(rng: random.Random, ctx: Ctx, i: int) -> Draft:
    if rng.random() < 0.75:
        n = len(ctx.prose_order)
        start, length = ctx.prose_order[i % n], 2 + (i // n) % 3
        body, topics = prose_window(start, length)
        return Draft(
            [],
            "none",
            {"origin": "cpython-docs", "topics": topics, "start": start, "paragraphs": length},
            text=body,
        )
    body, facts = fact_paragraph(rng, rng.randint(4, 10))
    return Draft([], "none", {"origin": "generated", "facts": facts}, text=body)
