"""Evaluation building blocks: metrics against hand-computed answers and naive references, oracle vs
constant answers on held-out items, NIAH needle placement, held-out overlap rejection, report rendering."""

from __future__ import annotations

import functools
import json
import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kimivl_model.config import preset
from kimivl_model.image_processing import pack_images
from kimivl_model.vlm import KimiVL
from tasks.data.special_tokens import EOS, MEDIA_START, OWN_BPE_SPECIAL_IDS, THINK_END, THINK_START
from tasks.data.synth_render import BACKGROUNDS
from tasks.data.synth_text import prose_paragraphs
from tasks.data.text_tokenizer import load_tokenizer
from tasks.data.tokenizer import TokenizerConfig, build_tokenizer
from tasks.eval import metrics as M
from tasks.eval.heldout import HELDOUT_SEED_BASE, TrainingIndex, build_heldout, heldout_seed
from tasks.eval.niah import (
    NIAHConfig,
    build_text_haystack,
    build_video_haystack,
    doubling_lengths,
    needle_frame,
    summarize,
)
from tasks.eval.prompts import PromptBuilder
from tasks.eval.report import compare_reports, render_report, summary_metrics, write_plots
from tasks.eval.suite import GEN_TASKS, EvalConfig, score

CFG = preset("tiny")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [p.text for p in prose_paragraphs()[:300]] + ["What is the secret number? The answer is 4721."]
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(iter(texts), TokenizerConfig(vocab_size=800)).save(str(d / "tokenizer.json"))
    return load_tokenizer(d)


# ------------------------------------------------------------------------------------- string metrics


@functools.cache
def _lev_ref(a: str, b: str) -> int:  # textbook recursion
    if not a or not b:
        return len(a) + len(b)
    return min(_lev_ref(a[1:], b) + 1, _lev_ref(a, b[1:]) + 1, _lev_ref(a[1:], b[1:]) + (a[0] != b[0]))


def test_levenshtein_matches_recursive_reference():
    assert M.levenshtein("kitten", "sitting") == 3
    rng = random.Random(0)
    for _ in range(60):
        a = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 9)))
        b = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 9)))
        assert M.levenshtein(a, b) == _lev_ref(a, b), (a, b)


def test_char_accuracy():
    assert M.char_accuracy("HELLO world\n2024", "HELLO  world 2024") == 1.0  # whitespace collapsed
    assert M.char_accuracy("abd", "abc") == pytest.approx(1 - 1 / 3)
    assert M.char_accuracy("", "abc") == 0.0
    assert M.char_accuracy("abcdef", "abc") == pytest.approx(0.5)
    assert M.char_accuracy("", "") == 1.0


def test_exact_contains_count():
    assert M.exact_match("Red.", "red") == 1.0
    assert M.exact_match("The circle is red.", "red") == 0.0
    assert M.contains_match("The circle is red.", "red") == 1.0
    assert M.contains_match("reddish", "red") == 0.0
    assert M.exact_match("Answer: top left\nmore", "top left") == 1.0
    assert M.exact_match(f"{THINK_START}hmm{THINK_END}\nblue", "blue") == 1.0
    assert M.count_match("3", 3) == 1.0 and M.count_match("There are three.", "3") == 1.0
    assert M.count_match("3 or 4", 3) == 0.0 and M.count_match("", 3) == 0.0


def test_relaxed_accuracy():
    assert M.relaxed_match("52", "50") == 1.0  # 4% off
    assert M.relaxed_match("53", "50") == 0.0  # 6% off
    assert M.relaxed_match("47.6", "50") == 1.0
    assert M.relaxed_match("0", "0") == 1.0 and M.relaxed_match("0.1", "0") == 0.0
    assert M.relaxed_match("The value for Oslo is 42.", "42") == 1.0
    assert M.relaxed_match("1,234", "1234") == 1.0
    assert M.relaxed_match("oslo.", "Oslo") == 1.0 and M.relaxed_match("Rome", "Oslo") == 0.0
    assert M.relaxed_match("2021-03-04", "2021-03-04") == 1.0  # a date is text, not a number


def test_math_answer():
    gen = f"{THINK_START}\nStep 1: 3 x 4 = 12.\nCheck: 99\n{THINK_END}\nThe answer is 42."
    assert M.math_answer(gen) == 42.0 and M.math_correct(gen, 42) == 1.0
    assert M.math_answer(f"{THINK_START} 5 {THINK_END} so -7 it is") == -7.0
    assert M.math_answer("first 3 then 5") == 5.0  # no think marker: the last number
    assert M.math_answer("The answer is 1,234.") == 1234.0
    assert M.math_answer("no numbers") is None and M.math_correct("no numbers", 1) == 0.0


# -------------------------------------------------------------------------------------------- boxes


def _iou_raster(a, b) -> float:  # count unit cells of integer boxes
    ca = {(x, y) for x in range(a[0], a[2]) for y in range(a[1], a[3])}
    cb = {(x, y) for x in range(b[0], b[2]) for y in range(b[1], b[3])}
    return len(ca & cb) / len(ca | cb) if ca | cb else 0.0


def test_box_parse_and_iou():
    assert M.parse_box("It is at <box>(10,20),(30,40)</box>.") == (10, 20, 30, 40)
    assert M.parse_box("<box>( 30 , 40 ),( 10 , 20 )</box>") == (10, 20, 30, 40)  # corners ordered
    assert M.parse_box("<box>(-5,20),(1200,40)</box>") == (0, 20, 1000, 40)  # clamped
    assert M.parse_box("(10,20),(30,40)") is None
    assert M.grounding_iou("<box>(0,0),(10,10)</box>", [0, 0, 10, 10]) == 1.0
    assert M.grounding_iou("<box>(0,0),(10,10)</box>", [20, 20, 30, 30]) == 0.0
    assert M.grounding_iou("<box>(0,0),(10,10)</box>", [5, 0, 15, 10]) == pytest.approx(1 / 3)
    assert M.grounding_iou("no box", [0, 0, 10, 10]) == 0.0
    rng = random.Random(1)
    for _ in range(40):
        a = sorted(rng.sample(range(30), 2)), sorted(rng.sample(range(30), 2))
        b = sorted(rng.sample(range(30), 2)), sorted(rng.sample(range(30), 2))
        ba, bb = (a[0][0], a[1][0], a[0][1], a[1][1]), (b[0][0], b[1][0], b[0][1], b[1][1])
        assert M.box_iou(ba, bb) == pytest.approx(_iou_raster(ba, bb))


# ----------------------------------------------------------------------------- oracle vs constant


@pytest.mark.parametrize("task", GEN_TASKS)
def test_oracle_scores_one_and_constant_near_zero(task):
    hs = build_heldout(task, 6)
    assert len(hs.items) == 6 and not hs.checked
    primary = {
        "vqa": "exact_match",
        "video_qa": "exact_match",
        "counting": "accuracy",
        "ocr": "char_accuracy",
    }
    primary |= {
        "grounding": "iou",
        "chart_qa": "relaxed_accuracy",
        "doc_qa": "relaxed_accuracy",
        "math": "accuracy",
    }
    key = primary[task]
    oracle = [score(task, it.answer, it) for it in hs.items]
    assert all(ok for _, ok in oracle) and all(m[key] == 1.0 for m, _ in oracle)
    const = "<box>(0,0),(60,60)</box>" if task == "grounding" else "zzz"
    vals = [score(task, const, it)[0][key] for it in hs.items]
    assert sum(vals) / len(vals) < (0.25 if task == "ocr" else 0.05)


@pytest.mark.parametrize(
    ("task", "key"), [("counting", "accuracy"), ("vqa", "exact_match"), ("chart_qa", "relaxed_accuracy")]
)
def test_random_guesser_scores_near_chance(task, key):
    """A guesser drawing uniformly from the answers seen in the set scores its analytical chance level:
    mean over items of (answers that score 1 for the item) / (answers in the pool)."""
    hs = build_heldout(task, 24)
    pool = sorted({it.answer for it in hs.items})
    assert len(pool) >= 3, pool
    hits = {it.id: [score(task, a, it)[0][key] for a in pool] for it in hs.items}
    chance = sum(sum(h) / len(pool) for h in hits.values()) / len(hs.items)
    assert 0 < chance < 1
    rng = random.Random(7)
    draws = 4000
    got = (
        sum(score(task, rng.choice(pool), it)[0][key] for it in (rng.choice(hs.items) for _ in range(draws)))
        / draws
    )
    sigma = (chance * (1 - chance) / draws) ** 0.5
    assert abs(got - chance) < 4 * sigma + 1e-9, (got, chance)


# ---------------------------------------------------------------------------------------- losses


def test_teacher_forced_loss_matches_per_document_reference():
    torch.manual_seed(0)
    model = KimiVL(CFG).eval()
    g = torch.Generator().manual_seed(0)
    docs = []
    for n in (17, 30):
        ids = torch.randint(20, CFG.lm.vocab_size, (n,), generator=g)
        labels = torch.cat([ids[1:], torch.tensor([-100])])
        labels[:3] = -100
        docs.append(M.LossDoc(ids, labels))
    img = torch.rand(3, 56, 84, generator=g)
    pv, gh = pack_images([img])
    n_pad = int(gh.prod()) // 4
    ids = torch.cat(
        [torch.tensor([1, 3]), torch.full((n_pad,), CFG.media_pad_token_id), torch.tensor([6, 40, 41, 42])]
    )
    labels = torch.full_like(ids, -100)
    labels[-4:-1] = ids[-3:]
    docs.append(M.LossDoc(ids, labels, pv, gh))
    with torch.no_grad():
        tot, cnt = 0.0, 0
        for d in docs:  # one document at a time, full logits, plain CE
            logits = model(d.input_ids, pixel_values=d.pixel_values, grid_hws=d.grid_hws).logits
            tot += float(F.cross_entropy(logits.float(), d.labels, ignore_index=-100, reduction="sum"))
            cnt += int((d.labels != -100).sum())
    for bt in (32, 4096):  # packed into several batches / one batch
        res = M.teacher_forced_loss(model, docs, batch_tokens=bt)
        assert res["tokens"] == cnt
        assert res["loss"] == pytest.approx(tot / cnt, rel=1e-4)
    assert M.teacher_forced_loss(model, docs, batch_tokens=32)["batches"] == 3


# --------------------------------------------------------------------------------------- prompts


def test_prompt_builder_matches_training_format(tok):
    for style in ("chat", "plain"):
        b = PromptBuilder(tok, CFG, style)
        content = "Is the name bound? What is 5 + 7?"
        assert b.wrap(b.encode_text(content)) == b.encode(content)
    b = PromptBuilder(tok, CFG, "chat")
    ids = b.encode("<image>\nWhat is it?", [{"width": 84, "height": 56}], "image")
    pads = sum(t == CFG.media_pad_token_id for t in ids)
    assert pads == (56 // 14 // 2) * (84 // 14 // 2)
    text = tok.encode(f"{THINK_START} x {THINK_END} 42")
    assert b.decode([*text, OWN_BPE_SPECIAL_IDS[EOS], 50, 51]) == f"{THINK_START} x {THINK_END} 42"


# ------------------------------------------------------------------------------------------- NIAH


def _find(hay: list[int], needle: list[int]) -> list[int]:
    return [i for i in range(len(hay) - len(needle) + 1) if hay[i : i + len(needle)] == needle]


@pytest.mark.parametrize("style", ["chat", "plain"])
def test_text_needle_sits_at_the_stated_depth(tok, style):
    b = PromptBuilder(tok, CFG, style)
    for length in (256, 1024):
        for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
            h = build_text_haystack(b, length, depth, seed=3)
            assert length - 100 < len(h.input_ids) <= length
            text = f"{'' if depth == 0 else ' '}The secret number is {h.value}."
            needle = tok.encode(text)
            assert _find(h.input_ids, needle) == [h.needle_offset]  # exact offset, needle occurs once
            assert tok.decode(h.input_ids[h.needle_offset : h.needle_offset + len(needle)]) == text
            span = h.haystack_end - h.haystack_start - len(needle)
            before = h.needle_offset - h.haystack_start
            assert abs(before - depth * span) <= h.max_piece_tokens  # within one sentence
            sentence_end = tok.decode(h.input_ids[h.needle_offset - 1 : h.needle_offset]) if before else "."
            assert sentence_end.rstrip()[-1:] in ".:)!?\"'"  # inserted at a sentence boundary


def test_video_needle_frame_at_the_stated_depth(tok):
    b = PromptBuilder(tok, CFG, "chat")
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        h = build_video_haystack(b, 512, depth, seed=1, frame_side=56)
        n = len(h.images)
        assert len(h.input_ids) <= 512 and n >= 20
        starts = [i for i, t in enumerate(h.input_ids) if t == OWN_BPE_SPECIAL_IDS[MEDIA_START]]
        assert len(starts) == n
        k = starts.index(h.needle_offset)
        assert k == round(depth * (n - 1))
        bg = h.images[0 if k else 1]["pil"].getpixel((0, 0))
        bg_name = next(name for name, rgb in BACKGROUNDS.items() if rgb == bg)
        ref = needle_frame(h.value, 56, 56, bg_name)
        assert h.images[k]["pil"].tobytes() == ref.tobytes()
        others = [i for i in range(n) if i != k]
        assert all(h.images[i]["pil"].tobytes() != ref.tobytes() for i in others)
        _, gh = b.pixels(h.images)
        assert gh.shape == (n, 2) and int((gh[:, 0] * gh[:, 1]).sum()) // 4 == sum(
            t == CFG.media_pad_token_id for t in h.input_ids
        )


def test_niah_summary_grid_and_bins():
    lengths, depths = (256, 512), (0.0, 1.0)
    res = [
        {"length": 256, "depth": 0.0, "correct": True},
        {"length": 256, "depth": 1.0, "correct": False},
        {"length": 512, "depth": 0.0, "correct": True},
        {"length": 512, "depth": 1.0, "correct": True},
    ]
    s = summarize(res, lengths, depths)
    assert s["recall"] == 0.75
    assert s["recall_by_bin"] == {"(0, 256]": 0.5, "(256, 512]": 1.0}
    assert s["grid"]["recall"] == [[1.0, 1.0], [0.0, 1.0]]
    assert doubling_lengths(8192) == (1024, 2048, 4096, 8192)
    with pytest.raises(ValueError, match="strictly increasing"):
        NIAHConfig(lengths=(512, 256))
    with pytest.raises(ValueError, match="unknown"):
        EvalConfig(tasks=("vqa", "nope"))


# -------------------------------------------------------------------------------------- held-out


def test_heldout_seed_namespace_and_determinism():
    assert heldout_seed("math", 0) >= HELDOUT_SEED_BASE
    a, b = build_heldout("chart_qa", 4), build_heldout("chart_qa", 4)
    assert [i.id for i in a.items] == [i.id for i in b.items]
    assert all(i.id.startswith(f"chart_qa-{heldout_seed('chart_qa')}-") for i in a.items)
    assert [i.answer for i in a.items] == [i.answer for i in b.items]


def test_heldout_skips_rows_seen_in_training():
    first = build_heldout("ocr", 3)
    idx = TrainingIndex()
    for it in first.items:  # "train" on the first three held-out rows
        idx.add(it.record)
    hs = build_heldout("ocr", 3, index=idx)
    assert hs.rejected == 3 and hs.overlap == 0 and hs.checked
    assert not {i.id for i in hs.items} & {i.id for i in first.items}
    # same math question inside a different training conversation (other id, other solution): still overlap
    m = build_heldout("math", 2)
    q = m.items[0].record["messages"][0]["content"]
    idx = TrainingIndex()
    turns = [
        {"role": "user", "content": q.upper() + "  "},
        {"role": "assistant", "content": "The answer is 0."},
    ]
    idx.add({"id": "cot-0-0000001", "text": None, "images": [], "messages": turns})
    hs = build_heldout("math", 2, index=idx)
    assert hs.rejected == 1 and hs.overlap == 0 and m.items[0].id not in {i.id for i in hs.items}


# ---------------------------------------------------------------------------------------- report


def _fake_result() -> dict:
    s = summarize(
        [{"length": L, "depth": d, "correct": L == 256} for L in (256, 512) for d in (0.0, 0.5, 1.0)],
        (256, 512),
        (0.0, 0.5, 1.0),
    )
    niah = {
        "metrics": {"recall": s["recall"], "n": s["n"]},
        "recall_by_bin": s["recall_by_bin"],
        "grid": s["grid"],
    }
    return {
        "checkpoint": "ck",
        "model": "tiny",
        "rope_theta": 50000.0,
        "device": "cpu",
        "seconds": 1.0,
        "config": {"prompt_style": "chat"},
        "heldout": {"vqa": {"seed": 10001, "items": 2, "candidates": 3, "rejected_overlap": 1, "overlap": 0}},
        "heldout_overlap": 0,
        "tasks": {
            "vqa": {
                "metrics": {"exact_match": 0.5, "n": 2},
                "seconds": 0.1,
                "failures": [
                    {
                        "id": "caption-10001-0000001",
                        "prompt": "<image>\nWhat | colour?",
                        "answer": "red",
                        "prediction": "blue",
                    }
                ],
            },
            "niah_text": {**niah, "seconds": 0.2, "failures": []},
        },
    }


def test_report_renders_tables_and_plots(tmp_path: Path):
    r = _fake_result()
    r["summary"] = summary_metrics(r)
    assert r["summary"]["niah_text/recall_le_256"] == 1.0 and r["summary"]["vqa/exact_match"] == 0.5
    assert all(re.fullmatch(r"[\w./\- ]+", k) for k in r["summary"])  # tracker-safe names
    r["plots"] = write_plots(r, tmp_path)
    for p in r["plots"]:
        with Image.open(tmp_path / p) as im:
            im.verify()
    md = render_report(r)
    assert "| vqa | exact_match | 0.5000 | 2 |" in md
    assert "| (0, 256] | 1.0000 |" in md and "| (256, 512] | 0.0000 |" in md
    assert "| 50% | 1.0000 | 0.0000 |" in md and "![niah_heatmap](niah_heatmap.png)" in md
    assert "What \\| colour?" in md  # pipes escaped inside cells
    b = json.loads(json.dumps(r))
    b["tasks"]["vqa"]["metrics"]["exact_match"] = 1.0
    b["summary"] = summary_metrics(b)
    diff = compare_reports(r, b, names=("cooldown", "long_context"))
    assert "| vqa/exact_match | 0.5000 | 1.0000 | 0.5000 |" in diff
    assert "| niah_text | (0, 256] | 1.0000 | 1.0000 | 0.0000 |" in diff
