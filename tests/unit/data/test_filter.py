"""Filter step: every rule rejects the right row with a reason naming the rule and the value; run_filter
keeps counts exact, quarantines instead of dropping, is deterministic and skips when up to date."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pydantic
import pytest
from PIL import Image

import tasks.data.filter as filt
from tasks.data.filter import FilterConfig, QualityRules, check_record, run_filter
from tasks.data.images import encode_image
from tasks.data.io import count_rows, iter_rows
from tasks.data.schema import QUARANTINE_SCHEMA, RECORD_SCHEMA
from tasks.io.manifest import read_manifest
from tests.unit.data.records import DEFAULT_CAPTION, make_record, picture, write_dataset

CFG = FilterConfig()


def words(n: int, seed: int) -> list[str]:
    """n distinct random lowercase words."""
    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        out["".join(chr(97 + c) for c in rng.integers(0, 26, int(rng.integers(3, 9))))] = None
    return list(out)


def solid(w: int, h: int) -> Image.Image:
    return Image.new("RGB", (w, h), (200, 30, 30))


def clean_rows() -> list[dict]:
    return [
        make_record("cap", images=[picture(0)]),
        make_record("txt", kind="text", text=" ".join(words(80, 1)) + "."),
        make_record(
            "sft",
            kind="sft",
            images=[picture(1), picture(2)],
            messages=[
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "<image>\n<image>\nWhat differs between the two pictures?"},
                {"role": "assistant", "content": "The second one has more shapes in the lower half."},
            ],
        ),
        make_record(
            "vid",
            kind="video_qa",
            images=[picture(3), picture(4), picture(5)],
            media_kind="video",
            messages=[
                {"role": "user", "content": "<video>\nWhat changes over time?"},
                {"role": "assistant", "content": "The shapes move to the right."},
            ],
        ),
        make_record("ocr", kind="ocr", text="<image>\n1234 5678", images=[picture(6)]),
    ]


@pytest.mark.parametrize("row", clean_rows(), ids=lambda r: r["id"])
def test_clean_row_passes_every_rule(row):
    assert check_record(row, CFG) is None


def bomb_png(w: int = 30_000, h: int = 30_000) -> dict:
    """A 1x1 PNG whose header claims w x h pixels (a decompression bomb by its header)."""
    data = bytearray(encode_image(solid(1, 1))["data"])
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", w, h)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return {"data": bytes(data), "width": w, "height": h, "format": "png"}


def truncated_png() -> dict:
    im = encode_image(picture(7), "png")
    return {**im, "data": im["data"][: len(im["data"]) // 2]}


def msgs(*roles: str) -> list[dict]:
    return [{"role": r, "content": f"some message text from {r}"} for r in roles]


_L1, _L2, _L3 = "the first line is here", "a second line follows", "and a third one"
DUP_LINES = "\n".join(
    [_L1, _L2, _L1, _L3, _L2, _L1, _L3, "a fourth distinct line", "fifth line of text", "sixth line of text"]
)  # 10 lines, 4 repeat an earlier one -> 0.4
NGRAM_WORDS = [*words(45, 2), *(["buy", "now", "today"] * 5)]  # "buy now today" x5 covers 15/60 words
CONTROL_TEXT = "Hello world\x00\x01\x02 this is otherwise a fine text"
CASES = [
    # (id, row, config overrides of the rules, expected reason prefix)
    ("kind", make_record("x", kind="bogus", images=[picture(0)]), {}, "structure.kind: 'bogus' not in KINDS"),
    ("media_kind", make_record("x", media_kind="audio"), {}, "structure.media_kind: 'audio'"),
    (
        "both",
        make_record("x", kind="sft", text="hi there", messages=msgs("user", "assistant")),
        {},
        "structure.text_xor_messages: both set",
    ),
    ("neither", make_record("x", text=None), {}, "structure.text_xor_messages: neither set"),
    ("meta", make_record("x", meta="{not json"), {}, "structure.meta_json: not JSON"),
    ("meta_list", make_record("x", meta="[1, 2]"), {}, "structure.meta_json: list is not a JSON object"),
    ("roles", make_record("x", kind="sft", messages=msgs("user", "bot")), {}, "structure.roles: 'bot'"),
    (
        "assistant",
        make_record("x", kind="sft", messages=msgs("system", "user")),
        {},
        "structure.assistant_turn: 0",
    ),
    (
        "placeholders",
        make_record("x", text="<image>\nA red ball on the wooden table.", images=[picture(0), picture(1)]),
        {},
        "structure.image_placeholders: 1 '<image>' and 0 '<video>' != 2 images",
    ),
    (
        "video_two",
        make_record(
            "x",
            kind="video_qa",
            text="<video><video> two clips here",
            images=[picture(0)],
            media_kind="video",
        ),
        {},
        "structure.video_placeholder: 2 '<video>' (want 1), 1 frames",
    ),
    (
        "video_no_frames",
        make_record("x", kind="video_qa", text="<video> a clip with no frames", media_kind="video"),
        {},
        "structure.video_placeholder: 1 '<video>' (want 1), 0 frames (want >= 1)",
    ),
    (
        "no_media",
        make_record("x", kind="text", text="<image> no image here", media_kind="none"),
        {},
        "structure.no_media",
    ),
    ("empty", make_record("x", text="<image>\n  \n ", images=[picture(0)]), {}, "text.empty: 0"),
    ("min_chars", make_record("x", text="<image>\nab", images=[picture(0)]), {}, "text.min_chars: 2 < 8"),
    ("max_chars", make_record("x", kind="text", text="a" * 100_001), {}, "text.max_chars: 100001 > 100000"),
    ("dup_lines", make_record("x", kind="text", text=DUP_LINES), {}, "text.dup_line_frac: 0.400 > 0.3"),
    (
        "top_ngram",
        make_record("x", kind="text", text=" ".join(NGRAM_WORDS)),
        {},
        "text.top_ngram_frac: 0.250 > 0.2 (top 3-gram)",
    ),
    (
        "alpha",
        make_record("x", kind="text", text="1234 5678 9012 3456 ab"),
        {},
        "text.min_alpha_frac: 0.111 < 0.25",
    ),
    (
        "control",
        make_record("x", kind="text", text=CONTROL_TEXT),
        {},
        f"text.control_frac: {3 / len(CONTROL_TEXT):.3f} > 0.01",
    ),
    (
        "truncated",
        make_record("x", images=[truncated_png()]),
        {},
        "image.decode: image 0 (png): undecodable image",
    ),
    (
        "garbage",
        make_record("x", images=[{"data": b"not an image", "width": 9, "height": 9, "format": "png"}]),
        {},
        "image.decode: image 0 (png): unreadable image header",
    ),
    (
        "bomb",
        make_record("x", images=[bomb_png()]),
        {},
        "image.decode: image 0 (png): unreadable image header: DecompressionBombError",
    ),
    (
        "declared",
        make_record("x", images=[{**encode_image(picture(0)), "width": 100}]),
        {},
        "image.declared_size: image 0 is 96x80 != declared 100x80",
    ),
    (
        "min_side",
        make_record("x", images=[solid(20, 80)]),
        {},
        "image.min_side: image 0 (20x80) min side 20 < 28",
    ),
    (
        "aspect",
        make_record("x", images=[picture(0), solid(900, 40)]),
        {},
        "image.max_aspect: image 1 (900x40) aspect 22.50 > 20.0",
    ),
    (
        "max_pixels",
        make_record("x", images=[picture(0)]),
        {"max_pixels": 1000},
        "image.max_pixels: image 0 has 7680 (96x80) > 1000",
    ),
]
DISABLE = {
    "structure.kind": {"check_kind": False},
    "structure.media_kind": {"check_media_kind": False},
    "structure.text_xor_messages": {"check_text_xor_messages": False},
    "structure.meta_json": {"check_meta_json": False},
    "structure.roles": {"check_messages": False},
    "structure.assistant_turn": {"check_messages": False},
    "structure.image_placeholders": {"check_placeholders": False},
    "structure.video_placeholder": {"check_placeholders": False},
    "structure.no_media": {"check_placeholders": False},
    "text.empty": {"reject_empty_text": False},
    "text.min_chars": {"min_chars": None},
    "text.max_chars": {"max_chars": None},
    "text.dup_line_frac": {"max_dup_line_frac": None},
    "text.top_ngram_frac": {"max_top_ngram_frac": None},
    "text.min_alpha_frac": {"min_alpha_frac": None},
    "text.control_frac": {"max_control_frac": None},
    "image.decode": {"check_decode": False},
    "image.declared_size": {"check_declared_size": False},
    "image.min_side": {"min_side": None},
    "image.max_aspect": {"max_aspect": None},
    "image.max_pixels": {"max_pixels": None},
}


def cfg_with(**rules) -> FilterConfig:
    return FilterConfig(rules=QualityRules(**rules))


@pytest.mark.parametrize(("row", "overrides", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_rule_rejects_with_rule_value_and_threshold(row, overrides, expected):
    reason = check_record(row, cfg_with(**overrides))
    assert reason is not None and reason.startswith(expected), reason
    rule = filt.rule_of(reason)
    # disabling that rule lets the row past it (it may still fail a later rule)
    later = check_record(row, cfg_with(**{**overrides, **DISABLE[rule]}))
    assert later is None or filt.rule_of(later) != rule, later


def test_first_failed_rule_wins_and_row_passes_when_all_disabled():
    row = make_record("x", text="<image>\nab", images=[solid(20, 80)])  # too short AND too small
    assert check_record(row, CFG).startswith("text.min_chars")
    assert check_record(row, cfg_with(min_chars=None)).startswith("image.min_side")
    assert check_record(row, cfg_with(min_chars=None, min_side=None)) is None


def test_measurements_against_naive_definitions():
    text = "a b c a b c a b c x y z"
    w = text.split()  # "a b c" occurs 3 times at 0, 3, 6 -> positions 0..8 covered -> 9/12
    assert filt.top_ngram_frac(w, 3) == pytest.approx(9 / 12)
    assert filt.top_ngram_frac(["a"] * 5, 3) == 1.0  # overlapping occurrences, capped by positions
    assert filt.top_ngram_frac(list("pqrst"), 3) == 0.0  # no repeated trigram
    assert filt.dup_line_frac("a\n\nb\na\n a \nc") == pytest.approx(2 / 5)
    assert filt.alpha_frac("ab 12\tcd!") == pytest.approx(4 / 7)
    assert filt.control_frac("ab\ncd\t") == 0.0
    assert filt.control_frac("ab\x07c\u200b") == pytest.approx(2 / 5)  # BEL (Cc) and ZWSP (Cf)


def test_per_kind_overrides():
    long_text = " ".join(words(30_000, 3))
    assert len(long_text) > 100_000
    assert check_record(make_record("a", kind="long_doc", text=long_text), CFG) is None
    assert check_record(make_record("b", kind="text", text=long_text), CFG).startswith("text.max_chars")
    digits = "<image>\n1234 5678"
    assert check_record(make_record("c", kind="ocr", text=digits, images=[picture(0)]), CFG) is None
    reason = check_record(make_record("d", kind="caption", text=digits, images=[picture(0)]), CFG)
    assert reason.startswith("text.min_alpha_frac: 0.000 < 0.25")

    cfg = FilterConfig(per_kind={"caption": {"min_chars": 100}})
    assert check_record(make_record("e", images=[picture(0)]), cfg).startswith(
        f"text.min_chars: {len(DEFAULT_CAPTION)} < 100"
    )
    assert check_record(make_record("f", kind="grounding", images=[picture(0)]), cfg) is None
    assert cfg.rules_for("caption").min_chars == 100 and cfg.rules_for("grounding").min_chars == 8


@pytest.mark.parametrize(
    "per_kind", [{"nope": {"min_chars": 1}}, {"ocr": {"no_such_rule": 1}}, {"ocr": {"min_chars": -1}}]
)
def test_invalid_config_is_rejected(per_kind):
    with pytest.raises(pydantic.ValidationError):
        FilterConfig(per_kind=per_kind)


# ---------------------------------------------------------------- run_filter


def mixed_rows() -> list[dict]:
    rows = clean_rows()
    rows.insert(1, make_record("short", text="<image>\nab", images=[picture(8)]))
    rows.insert(3, make_record("trunc", images=[truncated_png()]))
    rows.append(make_record("bad_kind", kind="bogus", images=[picture(9)]))
    rows.append(make_record("tiny", images=[solid(10, 10)]))
    rows.append(
        make_record("junk", images=[{"data": b"junk bytes", "width": 9, "height": 9, "format": "png"}])
    )
    return rows


def test_run_filter_counts_reasons_and_files(tmp_path):
    rows = mixed_rows()
    src = write_dataset(tmp_path / "in", rows)
    m = run_filter(tmp_path / "in", tmp_path / "out", FilterConfig(rows_per_shard=2))
    accepted = [r["id"] for r in iter_rows(tmp_path / "out", RECORD_SCHEMA)]
    quarantined = {r["id"]: r for r in iter_rows(tmp_path / "out" / "quarantine", QUARANTINE_SCHEMA)}
    assert accepted == ["cap", "txt", "sft", "vid", "ocr"]  # input order kept
    assert set(quarantined) == {"short", "trunc", "bad_kind", "tiny", "junk"}
    assert quarantined["short"]["reason"] == "text.min_chars: 2 < 8"
    assert quarantined["trunc"]["reason"].startswith("image.decode: image 0 (png): undecodable image")
    assert quarantined["tiny"]["reason"] == "image.min_side: image 0 (10x10) min side 10 < 28"
    assert "0x" not in quarantined["junk"]["reason"]  # no object addresses: reasons must be reproducible
    assert all(r["step"] == "filter" for r in quarantined.values())
    # the quarantined row is the input row, unchanged
    orig = {r["id"]: r for r in rows}
    assert quarantined["tiny"]["images"] == orig["tiny"]["images"]
    assert m.counts == {
        "input": 10,
        "accepted": 5,
        "quarantined": 5,
        "by_reason": {"image.decode": 2, "image.min_side": 1, "structure.kind": 1, "text.min_chars": 1},
    }
    assert count_rows(tmp_path / "out") == 5 and count_rows(tmp_path / "out" / "quarantine") == 5
    assert m.step == "filter" and m.kind == "dataset"
    assert [p.content_hash for p in m.parents] == [src.content_hash]
    assert read_manifest(tmp_path / "out") == m


def test_run_filter_deterministic_and_skips_when_up_to_date(tmp_path, monkeypatch):
    write_dataset(tmp_path / "in", mixed_rows())
    cfg = FilterConfig()
    a = run_filter(tmp_path / "in", tmp_path / "a", cfg)
    b = run_filter(tmp_path / "in", tmp_path / "b", cfg)
    assert a.content_hash == b.content_hash and a.files == b.files

    def boom(*args, **kwargs):
        raise AssertionError("an up-to-date output must not be recomputed")

    monkeypatch.setattr(filt, "check_record", boom)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*.parquet")}
    assert run_filter(tmp_path / "in", tmp_path / "a", cfg) == a
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*.parquet")} == mtimes
    monkeypatch.undo()
    c = run_filter(tmp_path / "in", tmp_path / "a", FilterConfig(rules=QualityRules(min_side=None)))
    assert c.counts["quarantined"] == 4 and c.config_hash != a.config_hash


def test_run_filter_missing_input_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run_filter(tmp_path / "nowhere", tmp_path / "out", CFG)
