"""Conversation kinds of the synthetic corpus: multi-turn multi-image SFT and verified long-CoT math.

Every assistant answer is derived from ground truth kept in ``meta`` (the scenes, or the math problem's
parameters and its twice-computed answer), so it can be re-verified without the pixels.
"""

from __future__ import annotations

import random
from typing import Any

from tasks.data.schema import IMAGE_TOKEN
from tasks.data.synth_kinds import Ctx, Draft, box_text, scene_for, where
from tasks.data.synth_render import CORNERS, Scene
from tasks.data.synth_text import COT_TYPES, cot_solution, make_problem, verify_problem

_ORDINAL = ("first", "second", "third")
_SYSTEM = (
    "You are a helpful assistant. Answer precisely.",
    "You are a careful assistant. Keep answers short and correct.",
)


def _scene_question(rng: random.Random, sc: Scene, ref: str) -> tuple[str, str, str, str]:
    """(question, assistant reply, short verifiable answer, type) about one scene."""
    sm = sc.meta()
    k = rng.randrange(len(sc.objects))
    o, om = sc.objects[k], sm["objects"][k]
    qt = rng.choice(["count", "color", "shape", "position", "box", "exists"])
    if qt == "count":
        ans = str(len(sc.objects))
        return f"How many shapes are {ref}?", f"There {'are' if ans != '1' else 'is'} {ans}.", ans, qt
    if qt == "color":
        return f"What colour is the {o.shape} {ref}?", f"The {o.shape} is {o.color}.", o.color, qt
    if qt == "shape":
        return f"What shape is the {o.color} object {ref}?", f"It is a {o.shape}.", o.shape, qt
    if qt == "position":
        return (
            f"Where is the {o.color} {o.shape} {ref}?",
            f"It is {where(om['position'])}.",
            om["position"],
            qt,
        )
    if qt == "box":
        b = box_text(om["box"])
        return f"Give the bounding box of the {o.color} {o.shape} {ref}.", b, b, qt
    present = rng.random() < 0.5
    color, shape = (o.color, o.shape) if present else (o.color, _absent_shape(rng, sc, o.color))
    ans = "yes" if present else "no"
    return f"Is there a {color} {shape} {ref}?", f"{ans.capitalize()}.", ans, qt


def _absent_shape(rng: random.Random, sc: Scene, color: str) -> str:
    have = {o.shape for o in sc.objects if o.color == color}
    return rng.choice([s for s in CORNERS if s not in have])


def sft(rng: random.Random, ctx: Ctx, i: int) -> Draft:
    """2-4 user/assistant turns (optional system turn first) about 0-3 images, each image shown (its
    ``<image>``) in the turn that introduces it; turns without an image ask arithmetic."""
    n_img, n_turns = rng.randint(0, 3), rng.randint(2, 4)
    scenes = [scene_for(rng, ctx) for _ in range(n_img)]
    intro = sorted([0] + [rng.randrange(n_turns) for _ in range(n_img - 1)])[:n_img]  # turn showing image k
    msgs: list[dict[str, str]] = []
    system = rng.random() < 0.5
    if system:
        msgs.append({"role": "system", "content": rng.choice(_SYSTEM)})
    turns = []
    for t in range(n_turns):
        new = [k for k in range(n_img) if intro[k] == t]
        seen = [k for k in range(n_img) if intro[k] <= t]
        if seen:
            k = rng.choice(new or seen)
            if n_img == 1:
                ref = rng.choice(["in the image", "in this picture", "in the photo"])
            else:
                ref = rng.choice([f"in image {k + 1}", f"in the {_ORDINAL[k]} image", f"in picture {k + 1}"])
            for _ in range(8):  # avoid asking the same question twice in one conversation
                q, a, ans, qt = _scene_question(rng, scenes[k], ref)
                if all(q not in m["content"] for m in msgs):
                    break
        else:
            k = None
            x, y = rng.randint(2, 99), rng.randint(2, 99)
            if rng.random() < 0.5:
                q, ans, qt = f"What is {x} + {y}?", str(x + y), "add"
            else:
                q, ans, qt = f"What is {x} times {y}?", str(x * y), "multiply"
            a = f"{q[8:-1]} = {ans}."
        msgs.append({"role": "user", "content": IMAGE_TOKEN * len(new) + ("\n" if new else "") + q})
        msgs.append({"role": "assistant", "content": a})
        turns.append({"question_type": qt, "answer": ans, "image": k})
    meta = {"system": system, "scenes": [s.meta() for s in scenes], "turns": turns}
    return Draft([s.render() for s in scenes], "image" if n_img else "none", meta, messages=msgs)


def cot(rng: random.Random, ctx: Ctx, i: int) -> Draft:
    """A math problem and a ``◁think▷`` trace whose answer was verified by a second computation."""
    # round-robin types; the small-space types walk a seeded permutation of their parameter space, so
    # problems do not repeat until it is exhausted (len(COT_TYPES) * space size rows)
    ptype, slot = COT_TYPES[i % len(COT_TYPES)], i // len(COT_TYPES)

    def pick(space: list) -> Any:
        order = list(range(len(space)))
        random.Random(f"{ctx.seed}/cot/{ptype}").shuffle(order)
        return space[order[slot % len(space)]]

    p = make_problem(rng, ptype, pick)
    if not verify_problem(p):  # a generator bug, never a data property
        raise RuntimeError(f"cot generator produced an unverified answer for {ptype}: {p}")
    meta = {
        "problem_type": ptype,
        "question": p.question,
        "params": p.params,
        "answer": p.answer,
        "verified": True,
    }
    msgs = [{"role": "user", "content": p.question}, {"role": "assistant", "content": cot_solution(rng, p)}]
    return Draft([], "none", meta, messages=msgs)
