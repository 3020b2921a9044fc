"""Synthetic corpus, answers and dirt: SFT conversations and CoT solutions are re-verified by an independent
solver written here (``_scene_answer``, ``_solve``, ``_parse_lin``); exact/near duplicates and corruptions are
real and labelled (``_assert_defect``), matching the manifest counts. Structure, pixels, determinism and config
are in test_synth.py; the shared ``corpus`` fixture is in conftest.py."""

from __future__ import annotations

import difflib
import json
import math
import re

from tasks.data.images import ImageDecodeError, decode_image
from tasks.data.schema import IMAGE_TOKEN, VIDEO_TOKEN
from tasks.data.synth import SYNTH_KINDS
from tests.unit.data._synth_common import COLOR_RGB, CORNERS, check_roles, clean, strings, synth_meta


def _scene_answer(scene: dict, qt: str, q: str) -> str:
    objs = scene["objects"]
    if qt == "count":
        return str(len(objs))
    by_shape = {o["shape"]: o for o in objs}
    by_color = {o["color"]: o for o in objs}
    shape = next((s for s in CORNERS if re.search(rf"\b{s}\b", q)), None)
    color = next((c for c in COLOR_RGB if re.search(rf"\b{c}\b", q)), None)
    if qt == "color":
        return by_shape[shape]["color"]
    if qt == "shape":
        return by_color[color]["shape"]
    if qt == "exists":
        return "yes" if any(o["color"] == color and o["shape"] == shape for o in objs) else "no"
    o = by_color[color]
    assert o["shape"] == shape
    return o["position"] if qt == "position" else "<box>({},{}),({},{})</box>".format(*o["box"])


def test_sft_conversations_are_verifiable(corpus):
    _, _, rows = corpus
    n_images = set()
    for r in clean(rows["sft"]):
        m = json.loads(r["meta"])
        body = check_roles(r["messages"])
        assert 2 <= len(body) // 2 <= 4 and len(body) // 2 == len(m["turns"])
        assert 0 <= len(r["images"]) <= 3 and len(m["scenes"]) == len(r["images"])
        n_images.add(len(r["images"]))
        users = [x["content"] for x in r["messages"] if x["role"] == "user"]
        answers = [x["content"] for x in r["messages"] if x["role"] == "assistant"]
        for q, a, t in zip(users, answers, m["turns"], strict=True):
            if t["image"] is None:
                x, op, y = re.search(r"What is (\d+) (\+|times) (\d+)\?", q).groups()
                want = str(int(x) + int(y) if op == "+" else int(x) * int(y))
            else:
                want = _scene_answer(m["scenes"][t["image"]], t["question_type"], q)
            assert t["answer"] == want, (q, t)
            assert want.lower() in a.lower() or t["question_type"] == "position"
    assert len(n_images) >= 3  # conversations with 0..3 images all occur


def _solve(ptype: str, p: dict) -> int:
    """Independent solutions (closed forms / loops written here)."""
    if ptype == "groups":
        return p["g"] * p["k"] - p["m"]
    if ptype == "shopping":
        return p["a"] * p["p"] + p["b"] * p["c"]
    if ptype == "distance":
        return p["v"] * p["t"] + p["w"] * p["s"]
    if ptype == "linear":
        x = [x for x in range(-100, 101) if p["a"] * x + p["b"] == p["c"]]
        return x[0]
    if ptype == "linear_both":
        return next(x for x in range(-100, 101) if p["a"] * x + p["b"] == p["c"] * x + p["d"])
    if ptype == "choose":
        return math.factorial(p["n"]) // (math.factorial(p["k"]) * math.factorial(p["n"] - p["k"]))
    if ptype == "arrange":
        n = p["n"]
        return {
            "any": math.prod(range(1, n + 1)),
            "first": math.prod(range(1, n)),
            "adjacent": 2 * math.prod(range(1, n)),
        }[p["rule"]]
    if ptype == "roles":
        return math.prod(range(p["n"] - p["k"] + 1, p["n"] + 1))
    raise AssertionError(ptype)


def _parse_lin(side: str) -> tuple[int, int]:
    """'3x - 5' -> (3, -5), '-x' -> (-1, 0), '12' -> (0, 12)."""
    mt = re.fullmatch(r"(-?\d*)x(?: ([+-]) (\d+))?", side)
    if mt is None:
        return 0, int(side)
    a = {"": 1, "-": -1}.get(mt[1])
    a = int(mt[1]) if a is None else a
    return a, (int(mt[3]) * (1 if mt[2] == "+" else -1)) if mt[2] else 0


def test_cot_answers_reverified(corpus):
    _, _, rows = corpus
    types = set()
    for r in rows["cot"]:
        m, s = json.loads(r["meta"]), synth_meta(r)
        q, a = r["messages"][0]["content"], r["messages"][-1]["content"]
        assert m["verified"] is True and m["answer"] == _solve(m["problem_type"], m["params"])
        final = (
            int(re.fullmatch(r"(?s).*◁/think▷\nThe answer is (-?\d+)\.", a)[1]) if "◁/think▷" in a else None
        )
        if s["corruption"] == "wrong_answer":
            assert final != m["answer"]
            continue
        if s["corruption"] is not None:
            continue
        types.add(m["problem_type"])
        assert final == m["answer"]
        assert a.startswith("◁think▷") and a.count("◁think▷") == a.count("◁/think▷") == 1
        think = a.split("◁/think▷")[0]
        lines = think.split("\n")[1:-1]
        assert lines[0].startswith("Plan: ") and lines[-1].startswith("Reflection: ")
        assert lines[2].startswith("Step 1: ") and lines[-2].startswith("Check")
        assert lines[-3].startswith("Exploration: ")
        if m["problem_type"].startswith("linear"):
            lhs, rhs = re.search(r"Solve for x: (.+) = (.+)\.$", q).groups()
            got = (*_parse_lin(lhs), *_parse_lin(rhs))
            p = m["params"]
            want = (
                (p["a"], p["b"], p["c"], p["d"])
                if m["problem_type"] == "linear_both"
                else (p["a"], p["b"], 0, p["c"])
            )
            assert got == want, (q, p)
        else:
            for key, v in m["params"].items():
                if key == "rule":  # arrange: the constraint is stated in words
                    v = {"any": "lined up", "first": "must come first", "adjacent": "next to each other"}[v]
                assert re.search(rf"\b{v}\b", q), (q, v)
    assert len(types) >= 6


def test_duplicates_and_corruptions_are_real_and_labelled(corpus):
    _, manifests, rows = corpus
    totals = {"exact": 0, "near": 0, "corrupt": 0}
    for kind in SYNTH_KINDS:
        by_id = {r["id"]: r for r in rows[kind]}
        ex = manifests[kind].extra
        n = {"exact": 0, "near": 0, "corrupt": 0}
        for r in rows[kind]:
            s = synth_meta(r)
            if s["duplicate_method"]:
                n[s["duplicate_method"]] += 1
                src = by_id[s["duplicate_of"]]
                assert synth_meta(src)["duplicate_method"] is None and synth_meta(src)["corruption"] is None
                same = (r["text"], r["messages"], r["images"]) == (
                    src["text"],
                    src["messages"],
                    src["images"],
                )
                assert same == (s["duplicate_method"] == "exact")
                if s["duplicate_method"] == "near":
                    a, b = " ".join(strings(r)).split(), " ".join(strings(src)).split()
                    assert difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() > 0.8
                    assert [(i["width"], i["height"]) for i in r["images"]] == [
                        (i["width"], i["height"]) for i in src["images"]
                    ]
            if s["corruption"]:
                n["corrupt"] += 1
                _assert_defect(r, s["corruption"])
        assert (n["exact"], n["near"], n["corrupt"]) == (
            ex["exact_duplicates"],
            ex["near_duplicates"],
            ex["corrupt"],
        )
        for k in totals:
            totals[k] += n[k]
    assert min(totals.values()) >= 10, totals


def _assert_defect(r, how):
    ss = strings(r)
    if how == "truncated_image":
        bad = 0
        for im in r["images"]:
            try:
                decode_image(im["data"])
            except ImageDecodeError:
                bad += 1
        assert bad == 1
    elif how == "placeholder_mismatch":
        n = sum(s.count(IMAGE_TOKEN) + s.count(VIDEO_TOKEN) for s in ss)
        assert n != (1 if r["media_kind"] == "video" else len(r["images"]))
    elif how == "empty_text":
        assert any(not s for s in ss)
    elif how == "garbage_text":
        assert sum(not c.isprintable() for c in r["text"]) > 0 and not re.search(r"[a-z]{3}", r["text"])
    else:
        assert how == "wrong_answer"
