"""Dedup step: exact (normalised), MinHash near-dup text, dHash near-dup images; first occurrence kept,
counts reconcile with the shards, deterministic, skipped when up to date, across several inputs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageEnhance

import tasks.data.dedup as dd
from tasks.data.dedup import (
    DedupConfig,
    HammingIndex,
    dhash,
    dhash_bytes,
    hamming,
    normalize_text,
    run_dedup,
)
from tasks.data.images import encode_image
from tasks.data.io import count_rows, iter_rows
from tasks.data.schema import DUPLICATE_SCHEMA, RECORD_SCHEMA
from tests.unit.data.records import make_record, picture, write_dataset

CFG = DedupConfig()


def words(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        out["".join(chr(97 + c) for c in rng.integers(0, 26, int(rng.integers(3, 9))))] = None
    return list(out)


def near_copy(img: Image.Image) -> dict:
    """Same picture, 8% brighter, re-encoded as JPEG."""
    return encode_image(ImageEnhance.Brightness(img).enhance(1.08), "jpeg")


def run(tmp_path, rows, cfg=CFG, name="out"):
    write_dataset(tmp_path / "in", rows)
    m = run_dedup(tmp_path / "in", tmp_path / name, cfg)
    kept = [r["id"] for r in iter_rows(tmp_path / name, RECORD_SCHEMA)]
    dups = {
        r["id"]: (r["duplicate_of"], r["method"])
        for r in iter_rows(tmp_path / name / "duplicates", DUPLICATE_SCHEMA)
    }
    return m, kept, dups


def test_normalize_text():
    assert normalize_text("  Hello,   WORLD!!\n\tＡＢＣ — «ok» ") == "hello world abc ok"
    assert normalize_text("don't") == "don t"  # punctuation -> space, not deletion


def test_dhash_matches_a_naive_reference():
    ramp = np.tile(np.linspace(255, 0, 90), (80, 1)).astype(np.uint8)  # brighter on the left everywhere
    assert dhash(Image.fromarray(ramp).convert("RGB")) == (1 << 64) - 1
    assert dhash(Image.fromarray(ramp[:, ::-1].copy()).convert("RGB")) == 0
    # checkerboard of 10-px columns at 9 cells: bit = column cell c brighter than c+1
    cols = np.repeat(np.array([200, 50, 200, 50, 200, 50, 200, 50, 200], dtype=np.uint8), 10)
    img = Image.fromarray(np.tile(cols, (80, 1))).convert("RGB")
    row_bits = "10101010"
    assert dhash(img) == int(row_bits * 8, 2)
    assert hamming(0b1011, 0b0110) == 3


@pytest.mark.parametrize("size", [(96, 80), (640, 480)])
def test_dhash_robust_to_brightness_and_jpeg_but_separates_pictures(size):
    for seed in range(3):
        a = dhash_bytes(encode_image(picture(seed, size))["data"])
        assert a == dhash(picture(seed, size))  # bytes path == image path for a lossless PNG
        assert hamming(a, dhash_bytes(near_copy(picture(seed, size))["data"])) <= CFG.image_hamming_threshold
        assert hamming(a, dhash(picture(seed + 10, size))) > 10
    assert dhash_bytes(b"\x89PNG\r\n\x1a\n garbage") is None


def test_hamming_index_equals_brute_force():
    rng = np.random.default_rng(0)
    base = [int(x) for x in rng.integers(0, 2**63, 300, dtype=np.int64)]
    stored = list(base)
    for h in base[:100]:  # near copies with 0..7 flipped bits
        flips = rng.choice(64, int(rng.integers(0, 8)), replace=False)
        stored.append(h ^ sum(1 << int(f) for f in flips))
    for t in (0, 4, 6):
        idx = HammingIndex(t)
        for h in stored:
            idx.add(h)
        for q in stored[::3]:
            want = [i for i, h in enumerate(stored) if bin(h ^ q).count("1") <= t]
            assert idx.query(q) == want


def test_exact_duplicates_case_whitespace_punctuation(tmp_path):
    pic = picture(0)
    rows = [
        make_record("a", text="<image>\nA Red ball, on a TABLE!", images=[pic]),
        make_record("b", kind="text", text="The quick brown fox jumps over the lazy dog."),
        make_record("c", text="<image>\na red   ball on a table", images=[pic]),  # same image bytes
        make_record("d", kind="text", text="  the QUICK brown fox\njumps over the lazy dog "),
        make_record("e", text="<image>\nA Red ball, on a TABLE!", images=[picture(1)]),  # other image
    ]
    m, kept, dups = run(tmp_path, rows)
    assert kept == ["a", "b", "e"]
    assert dups == {"c": ("a", "exact"), "d": ("b", "exact")}
    assert m.counts == {
        "input": 5,
        "accepted": 3,
        "duplicates": 2,
        "by_method": {"exact": 2, "minhash": 0, "phash": 0},
    }


def shingle_jaccard(a: str, b: str, k: int = 5) -> float:
    def sh(t):
        w = t.lower().split()
        return {tuple(w[i : i + k]) for i in range(len(w) - k + 1)}

    sa, sb = sh(a), sh(b)
    return len(sa & sb) / len(sa | sb)


def test_minhash_catches_one_word_change_not_unrelated_text(tmp_path):
    base = words(60, 1)
    changed = list(base)
    changed[2] = "zzzzzz"
    t0, t1, t2 = " ".join(base), " ".join(changed), " ".join(words(60, 2))
    assert shingle_jaccard(t0, t1) > 0.85 and shingle_jaccard(t0, t2) == 0.0  # premise, by naive reference
    rows = [
        make_record("orig", kind="text", text=t0),
        make_record("other", kind="text", text=t2),
        make_record("edit", kind="text", text=t1),
    ]
    _, kept, dups = run(tmp_path, rows)
    assert kept == ["orig", "other"]
    assert dups == {"edit": ("orig", "minhash")}
    _, kept, dups = run(tmp_path, rows, DedupConfig(minhash=False), name="off")
    assert dups == {} and kept == ["orig", "other", "edit"]


def test_phash_near_duplicate_images(tmp_path):
    cap = "<image>\nA few colourful shapes on a striped background."
    rows = [
        make_record("orig", text=cap, images=[picture(1)]),
        make_record("other_pic", text=cap, images=[picture(2)]),  # same caption, different picture: kept
        make_record(
            "near",
            text="<image>\na FEW colourful shapes, on a striped background",
            images=[near_copy(picture(1))],
        ),
        make_record("new_caption", text="<image>\n" + " ".join(words(12, 3)), images=[near_copy(picture(1))]),
        make_record("no_caption", text="<image>\n . ", images=[near_copy(picture(2))]),  # empty-ish text
    ]
    m, kept, dups = run(tmp_path, rows)
    assert kept == ["orig", "other_pic", "new_caption"]
    assert dups == {"near": ("orig", "phash"), "no_caption": ("other_pic", "phash")}
    assert m.counts["by_method"] == {"exact": 0, "minhash": 0, "phash": 2}

    _, kept, dups = run(tmp_path, rows, DedupConfig(image_dup_requires_text_match=False), name="img_only")
    assert kept == ["orig", "other_pic"]
    assert dups["new_caption"] == ("orig", "phash")


def test_multi_image_records_need_every_image_to_match(tmp_path):
    cap = "<image>\n<image>\nTwo pictures side by side with shapes."
    rows = [
        make_record("ab", text=cap, images=[picture(1), picture(2)]),
        make_record("ac", text=cap, images=[near_copy(picture(1)), picture(3)]),  # second image differs
        make_record("ab2", text=cap, images=[near_copy(picture(1)), near_copy(picture(2))]),
        make_record(
            "vid",
            kind="video_qa",
            text="<video>\nShapes moving around.",
            images=[picture(1), picture(2)],
            media_kind="video",
        ),
    ]
    _, kept, dups = run(tmp_path, rows)
    assert kept == ["ab", "ac", "vid"]  # vid: same frames but an unrelated text
    assert dups == {"ab2": ("ab", "phash")}


def test_multiple_inputs_first_occurrence_kept_and_counts_reconcile(tmp_path):
    t = " ".join(words(40, 5))
    first = [make_record(f"x{i}", kind="text", text=" ".join(words(30, 100 + i))) for i in range(5)]
    first.insert(2, make_record("keep_me", kind="text", text=t))
    second = [
        make_record("y0", kind="text", text=t.upper()),
        make_record("y1", kind="text", text=" ".join(words(30, 200))),
        make_record("y2", kind="text", text=t + " !"),
    ]
    a = write_dataset(tmp_path / "a", first)
    b = write_dataset(tmp_path / "b", second, rows_per_shard=2)
    m = run_dedup([tmp_path / "a", tmp_path / "b"], tmp_path / "out", DedupConfig(rows_per_shard=4))
    kept = [r["id"] for r in iter_rows(tmp_path / "out", RECORD_SCHEMA)]
    dups = list(iter_rows(tmp_path / "out" / "duplicates", DUPLICATE_SCHEMA))
    assert kept == [r["id"] for r in first] + ["y1"]
    assert [(r["id"], r["duplicate_of"], r["method"]) for r in dups] == [
        ("y0", "keep_me", "exact"),
        ("y2", "keep_me", "exact"),
    ]
    c = m.counts
    assert c["input"] == 9 and c["accepted"] + c["duplicates"] == c["input"]
    assert (c["accepted"], c["duplicates"]) == (
        count_rows(tmp_path / "out"),
        count_rows(tmp_path / "out" / "duplicates"),
    )
    assert sorted(p.content_hash for p in m.parents) == sorted([a.content_hash, b.content_hash])


def test_deterministic_and_skips_when_up_to_date(tmp_path, monkeypatch):
    base = words(60, 1)
    rows = [
        make_record("p", images=[picture(1)]),
        make_record("q", images=[near_copy(picture(1))]),
        make_record("r", kind="text", text=" ".join(base)),
        make_record("s", kind="text", text=" ".join(["qq", *base[1:]])),
    ]
    m1, _, dups = run(tmp_path, rows, name="one")
    m2 = run_dedup(tmp_path / "in", tmp_path / "two", CFG, workers=3)  # thread count must not matter
    assert m1.content_hash == m2.content_hash and m1.counts == m2.counts
    assert dups == {"q": ("p", "phash"), "s": ("r", "minhash")}

    def boom(*args, **kwargs):
        raise AssertionError("an up-to-date output must not be recomputed")

    monkeypatch.setattr(dd._Deduper, "visit", boom)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "one").rglob("*.parquet")}
    assert run_dedup(tmp_path / "in", tmp_path / "one", CFG) == m1
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "one").rglob("*.parquet")} == mtimes
    monkeypatch.undo()
    m3 = run_dedup(tmp_path / "in", tmp_path / "one", DedupConfig(phash=False))
    assert m3.counts["by_method"] == {"exact": 0, "minhash": 1, "phash": 0}


def test_undecodable_image_does_not_crash(tmp_path):
    bad = encode_image(picture(4), "png")
    bad = {**bad, "data": bad["data"][:100]}
    rows = [
        make_record("bad", images=[bad]),
        make_record("bad2", text="<image>\nanother caption here", images=[bad]),
    ]
    _, kept, dups = run(tmp_path, rows)
    assert kept == ["bad", "bad2"] and dups == {}


def test_missing_input_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent"):
        run_dedup([tmp_path / "absent"], tmp_path / "out", CFG)
