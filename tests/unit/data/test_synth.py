"""Synthetic corpus: every kind is a dataset with the right structure and TRUE labels (captions, grounding
boxes, OCR, chart/doc answers, video motion, interleaved scenes, text prose, checked against pixels or an
independent recomputation written here); output is deterministic, skipped when up to date and invalidated per
kind; the config is validated. SFT/CoT answers and the labelled dirt are in test_synth_answers.py."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from pydoc_data.topics import topics as CPYTHON_TOPICS

import numpy as np
import pydantic
import pytest
from PIL import Image

from tasks.data.images import decode_image
from tasks.data.io import read_table
from tasks.data.schema import IMAGE_TOKEN, RECORD_SCHEMA, VIDEO_TOKEN
from tasks.data.synth import SYNTH_KINDS, SynthConfig, run_synth
from tasks.io.manifest import read_manifest
from tests.unit.data._synth_common import CFG, COLOR_RGB, CORNERS, check_roles, clean, strings

BOX = re.compile(r"<box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>")


def pixels(im: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(im["data"])).convert("RGB"))


def color_bbox(arr: np.ndarray, rgb) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero((arr == np.array(rgb, dtype=arr.dtype)).all(-1))
    return None if len(xs) == 0 else (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


def test_every_kind_is_a_dataset_with_manifest(corpus):
    root, manifests, rows = corpus
    assert set(manifests) == set(SYNTH_KINDS)
    for kind in SYNTH_KINDS:
        m = read_manifest(root / kind)
        assert (m.kind, m.step) == ("dataset", "synth")
        assert m.content_hash == manifests[kind].content_hash
        assert m.counts["rows"] == len(rows[kind]) == getattr(CFG, kind)
        assert m.counts["images"] == sum(len(r["images"]) for r in rows[kind])
        assert len(read_table(root / kind, RECORD_SCHEMA)) == len(rows[kind])
        ids = [r["id"] for r in rows[kind]]
        assert ids == [f"{kind}-3-{i:07d}" for i in range(len(ids))]
        assert {r["kind"] for r in rows[kind]} == {kind} and {r["source"] for r in rows[kind]} == {"synth"}
    assert len(list((root / "caption").glob("part-*.parquet"))) == 3  # 40 rows / 16 per shard


def test_clean_rows_have_consistent_structure(corpus):
    _, _, rows = corpus
    for kind in SYNTH_KINDS:
        assert clean(rows[kind]), kind
        for r in clean(rows[kind]):
            assert (r["text"] is None) != (r["messages"] is None)
            assert all(s.strip() for s in strings(r))
            n_img = sum(s.count(IMAGE_TOKEN) for s in strings(r))
            n_vid = sum(s.count(VIDEO_TOKEN) for s in strings(r))
            if r["media_kind"] == "video":
                assert (n_vid, n_img) == (1, 0) and len(r["images"]) >= 1
            else:
                assert n_vid == 0 and n_img == len(r["images"])
                assert r["media_kind"] == ("image" if r["images"] else "none")
            for im in r["images"]:
                img = decode_image(im["data"])
                assert img.size == (im["width"], im["height"])
                if r["media_kind"] == "image":
                    assert CFG.image_min_side <= min(img.size) and max(img.size) <= CFG.image_max_side
            if r["messages"] is not None:
                check_roles(r["messages"])
            assert isinstance(json.loads(r["meta"]), dict)


def test_caption_and_grounding_match_the_pixels(corpus):
    _, _, rows = corpus
    for r in clean(rows["caption"]) + clean(rows["grounding"]):
        meta = json.loads(r["meta"])
        scene, arr = meta["scene"], pixels(r["images"][0])
        h, w, _ = arr.shape
        for o in scene["objects"]:
            got = color_bbox(arr, COLOR_RGB[o["color"]])  # colours are unique within a scene
            assert got is not None
            assert all(abs(a - b) <= 2 for a, b in zip(got, o["box_px"], strict=True)), (got, o)
            x1, y1, x2, y2 = o["box_px"]
            assert o["box"] == [
                round(x1 * 1000 / w),
                round(y1 * 1000 / h),
                round(x2 * 1000 / w),
                round(y2 * 1000 / h),
            ]
            if r["kind"] == "caption":
                assert (
                    f"{o['color']} {o['shape']}" in r["text"]
                    or f"{o['color']} {o['shape']}" in r["text"].lower()
                )
        if r["kind"] == "grounding":
            boxes = [[int(v) for v in b] for b in BOX.findall(r["text"])]
            assert boxes == meta["boxes"] and boxes
            for x1, y1, x2, y2 in boxes:
                assert 0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000
            assert r["text"].startswith(IMAGE_TOKEN) and " is at <box>(" in r["text"]


def test_ocr_text_is_the_exact_string_and_is_drawn(corpus):
    _, _, rows = corpus
    for r in clean(rows["ocr"]):
        meta = json.loads(r["meta"])
        assert r["text"] == IMAGE_TOKEN + meta["string"] == IMAGE_TOKEN + "\n".join(meta["lines"])
        arr = pixels(r["images"][0]).astype(float)
        ink, bg = np.array(meta["ink"], float), np.array(meta["background_rgb"], float)
        t = ((arr - bg) @ (ink - bg)) / ((ink - bg) @ (ink - bg))  # 0 = background, 1 = ink
        assert (t > 0.5).sum() >= 6 * len(meta["string"].replace(" ", "").replace("\n", ""))
        assert meta["font_size"] >= 10


def _chart_answer(m: dict, q: str) -> str:
    vals = dict(zip(m["labels"], m["values"], strict=True))
    named = [lab for lab in m["labels"] if re.search(rf"\b{lab}\b", q)]
    qt = m["question_type"]
    if qt == "value":
        return str(vals[named[0]])
    if qt in ("max", "min"):
        return (max if qt == "max" else min)(vals, key=vals.get)
    if qt == "diff":
        return str(abs(vals[named[0]] - vals[named[1]]))
    return str(sum(m["values"]) if qt == "sum" else len(m["values"]))


def test_chart_and_doc_answers_recomputed(corpus):
    _, _, rows = corpus
    for r in clean(rows["chart_qa"]):
        m = json.loads(r["meta"])
        q, a = r["messages"][0]["content"], r["messages"][1]["content"]
        want = _chart_answer(m, q)
        assert m["answer"] == want and want in a
    for r in clean(rows["doc_qa"]):
        m = json.loads(r["meta"])
        want = m["title"] if m["question_key"] == "title" else m["fields"][m["question_key"]]
        assert m["answer"] == want and want in r["messages"][1]["content"]


def test_video_rows_have_frames_and_true_motion(corpus):
    _, _, rows = corpus
    lo, hi = CFG.video_frames
    for r in clean(rows["video_qa"]):
        m = json.loads(r["meta"])
        assert lo <= len(r["images"]) <= hi and m["num_frames"] == len(r["images"])
        assert len({(im["width"], im["height"]) for im in r["images"]}) == 1
        first = color_bbox(pixels(r["images"][0]), COLOR_RGB[m["color"]])
        last = color_bbox(pixels(r["images"][-1]), COLOR_RGB[m["color"]])
        dx, dy = (last[0] + last[2] - first[0] - first[2]) / 2, (last[1] + last[3] - first[1] - first[3]) / 2
        seen = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert seen == m["direction"]
        answer = {"direction": m["direction"], "frames": str(len(r["images"])), "color": m["color"],
                  "shape": m["shape"], "count": str(1 + len(m["static"]))}[m["question_type"]]  # fmt: skip
        assert r["messages"][1]["content"] == m["answer"] == answer
    lo, hi = CFG.haystack_frames
    for r in clean(rows["video_haystack"]):
        m = json.loads(r["meta"])
        assert r["media_kind"] == "video" and lo <= len(r["images"]) <= hi == 32
        assert len(m["frames"]) == len(r["images"]) and [f["index"] for f in m["frames"]] == list(
            range(len(r["images"]))
        )
        for f, im in zip(m["frames"], r["images"], strict=True):
            arr = pixels(im)
            for o in f["objects"]:
                assert color_bbox(arr, COLOR_RGB[o["color"]]) is not None


def test_interleaved_images_are_described_next_to_them(corpus):
    _, _, rows = corpus
    for r in clean(rows["interleaved"]):
        m = json.loads(r["meta"])
        assert 2 <= len(r["images"]) <= 3
        blocks = [b for b in r["text"].split("\n\n") if IMAGE_TOKEN in b]
        assert len(blocks) == len(r["images"])
        for block, scene in zip(blocks, m["scenes"], strict=True):
            for o in scene["objects"]:
                assert f"{o['color']} {o['shape']}" in block.lower()


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.replace("*", "")).strip()


def test_text_rows_contain_real_cpython_prose(corpus):
    _, _, rows = corpus
    raw = _norm(" ".join(CPYTHON_TOPICS.values()))
    origins = {json.loads(r["meta"])["origin"] for r in clean(rows["text"])}
    assert origins == {"cpython-docs", "generated"}
    for r in clean(rows["text"]) + clean(rows["long_doc"]):
        m = json.loads(r["meta"])
        if m["origin"] == "generated":
            for s in re.split(r"(?<=\.) ", r["text"]):
                if mt := re.fullmatch(r"A (\w+) has (\d+) corners?\.", s):
                    assert CORNERS[mt[1]] == int(mt[2])
                if mt := re.fullmatch(r"(\d+) plus (\d+) equals (\d+)\.", s):
                    assert int(mt[1]) + int(mt[2]) == int(mt[3])
                if mt := re.fullmatch(r"(\d+) times (\d+) is (\d+)\.", s):
                    assert int(mt[1]) * int(mt[2]) == int(mt[3])
            continue
        paras = [p for p in r["text"].split("\n\n") if not p.startswith("#")]
        assert paras
        for p in paras:
            assert _norm(" ".join(p.split()[:10])) in raw, p[:120]
    for r in clean(rows["long_doc"]):
        m = json.loads(r["meta"])
        assert len(r["text"].split()) >= CFG.long_doc_words
        assert r["text"].count("\n## ") == len(m["sections"]) >= 2


SMALL = dict(caption=6, grounding=4, ocr=4, chart_qa=3, doc_qa=3, interleaved=3, video_qa=3, video_haystack=1,
             long_doc=1, text=8, sft=4, cot=6, long_doc_words=300, haystack_frames=(4, 6))  # fmt: skip


def test_deterministic_and_seed_dependent(tmp_path):
    a = run_synth(tmp_path / "a", SynthConfig(seed=7, **SMALL))
    b = run_synth(tmp_path / "b", SynthConfig(seed=7, **SMALL))
    c = run_synth(tmp_path / "c", SynthConfig(seed=8, **SMALL))
    for kind in SYNTH_KINDS:
        assert a[kind].content_hash == b[kind].content_hash
        assert a[kind].content_hash != c[kind].content_hash, kind


def test_skip_when_up_to_date_and_per_kind_invalidation(tmp_path):
    cfg = SynthConfig(seed=1, **SMALL)
    first = run_synth(tmp_path, cfg)
    stamp = {k: (tmp_path / k / "manifest.json").stat().st_mtime_ns for k in SYNTH_KINDS}
    again = run_synth(tmp_path, cfg)
    assert {k: m.content_hash for k, m in again.items()} == {k: m.content_hash for k, m in first.items()}
    assert stamp == {k: (tmp_path / k / "manifest.json").stat().st_mtime_ns for k in SYNTH_KINDS}
    more = run_synth(tmp_path, cfg.model_copy(update={"cot": 7}))
    changed = {k for k in SYNTH_KINDS if (tmp_path / k / "manifest.json").stat().st_mtime_ns != stamp[k]}
    assert changed == {"cot"} and more["cot"].counts["rows"] == 7
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_config_validation():
    assert SynthConfig().corrupt_rate > 0 and SynthConfig().exact_duplicate_rate > 0
    with pytest.raises(pydantic.ValidationError, match="image_min_side"):
        SynthConfig(image_min_side=300, image_max_side=100)
    with pytest.raises(pydantic.ValidationError, match="video_frames"):
        SynthConfig(video_frames=(5, 2))
    with pytest.raises(pydantic.ValidationError, match="<= 0.9"):
        SynthConfig(exact_duplicate_rate=0.5, near_duplicate_rate=0.5)
    with pytest.raises(pydantic.ValidationError):
        SynthConfig(captions=3)  # typo: extra fields are rejected
    with pytest.raises(pydantic.ValidationError):
        SynthConfig(ocr=-1)


def test_out_root_must_be_a_directory(tmp_path: Path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="out_root"):
        run_synth(f, SynthConfig(**SMALL))
