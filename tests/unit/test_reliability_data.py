"""Bad data, fuzzed (hypothesis): ingest -> filter -> validate never crash and never lose a row.

Generated inputs mix good rows with corrupt/truncated images, decompression-bomb dimensions, wrong field
types, NaN, empty text, lone surrogates / non-UTF-8 bytes, NUL bytes, duplicate ids and path traversal.
Properties, for every example:

- a row-level problem quarantines that row with a reason ``<rule>: <file>[row N] field '<f>': ...``;
  a whole-file problem is a ``DatasetError`` naming the file; a JSONL line that is not a JSON object is a
  quarantined row (``bad_json``);
- accepted + quarantined == input, and every input row is accounted for exactly once;
- a failed step leaves no output directory and no staging directory behind.

Examples are derandomized (the same inputs on every run, CI included) and few: the whole file runs in
well under a minute on 2 cores. Hand-written cases for each rule live in ``tests/unit/data/``.
"""

from __future__ import annotations

import io
import json
import re
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tasks.data.filter import FilterConfig, run_filter
from tasks.data.ingest import IngestConfig, run_ingest
from tasks.data.io import DatasetError, iter_rows
from tasks.data.schema import KINDS, QUARANTINE_SCHEMA, RECORD_SCHEMA
from tasks.data.validate import ValidateConfig, run_validate
from tests.unit.data.records import write_dataset


def fuzz(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ------------------------------------------------------------------------------------------- images
def png(w: int = 32, h: int = 32, color=(200, 40, 40), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format=fmt)
    return buf.getvalue()


def bomb_png(w: int, h: int) -> bytes:
    """A valid PNG header declaring ``w x h`` pixels with only a few rows of data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\x00" * (w + 1) * 2)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


GOOD = png()
IMAGE_BYTES = {
    "a.png": GOOD,
    "b.jpg": png(40, 30, (10, 90, 200), "JPEG"),
    "trunc.png": GOOD[: len(GOOD) // 2],
    "bomb.png": bomb_png(60_000, 60_000),  # beyond PIL's bomb limit: refused from the header alone
    "huge.png": bomb_png(12_000, 9_000),  # under PIL's limit, over max_image_pixels
    "noise.png": bytes(range(256)) * 4,
    "empty.png": b"",
}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("fuzz-images")
    root = base / "images"
    (root / "sub").mkdir(parents=True)
    for name, data in IMAGE_BYTES.items():
        (root / name).write_bytes(data)
    (base / "outside.png").write_bytes(GOOD)
    (root / "link.png").symlink_to(base / "outside.png")
    return root


# ------------------------------------------------------------------------------------------- strategies
SURROGATES = ["bad \ud800 text", "\udcff", "x\udce9y"]
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(0, 2), max_size=2), st.dictionaries(st.sampled_from("ab"), st.integers(), max_size=1),
)  # fmt: skip
TEXT = st.one_of(
    st.sampled_from(["Describe the picture.", "<image>\nWhat colour is it?", "Red.", "", "   ", "<image><image>",
                     "<video> frames", "line\nline\nline", "\x00\x01\x02 control", *SURROGATES]),
    st.text(max_size=30),
    JUNK,
)  # fmt: skip
PATHS = st.sampled_from(
    [*IMAGE_BYTES, "sub/../a.png", "../outside.png", "../../etc/passwd", "/etc/passwd", "link.png",
     "nope.png", "sub", "", " ", "a\x00.png", "x\ud800.png", "caf\udce9.png"]
)  # fmt: skip
IDS = st.one_of(st.sampled_from(["a", "b", "c", "\ud800", ""]), st.integers(0, 3), JUNK)
TURN = st.one_of(
    st.fixed_dictionaries(
        {"from": st.one_of(st.sampled_from(["human", "gpt", "system", "robot"]), JUNK), "value": TEXT}
    ),
    JUNK,
)
QA = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."}]
LLAVA_SAMPLE = st.one_of(
    st.fixed_dictionaries(  # mostly plausible rows, every field possibly damaged or missing
        {"id": IDS, "conversations": st.one_of(st.just(QA), st.lists(TURN, max_size=4))},
        optional={
            "image": st.one_of(PATHS, JUNK),
            "images": st.one_of(st.lists(st.one_of(PATHS, JUNK), max_size=3), JUNK),
            "video": st.just("clip.mp4"),
        },
    ),
    JUNK,  # a row that is not an object at all
)
REASON = re.compile(r"^([a-z0-9_]+): (\S+)\[row (\d+)\] field '([^']*)': .+", re.S)
INGEST_RULES = {
    "missing_field", "bad_field", "bad_role", "bad_turns", "path_traversal", "missing_image", "bad_image",
    "oversized_image", "bad_utf8", "empty_text", "placeholder_mismatch", "duplicate_id", "bad_json",
    "unsupported",
}  # fmt: skip


def rows(directory: Path, quarantine: bool = False) -> list[dict[str, Any]]:
    if quarantine:
        return list(iter_rows(directory / "quarantine", QUARANTINE_SCHEMA))
    return list(iter_rows(directory, RECORD_SCHEMA))


def assert_reconciles(m, out: Path, n_in: int) -> tuple[list, list]:
    ok, bad = rows(out), rows(out, quarantine=True)
    assert m.counts["input"] == n_in == len(ok) + len(bad), m.counts
    assert (m.counts["accepted"], m.counts["quarantined"]) == (len(ok), len(bad))
    assert all(r["reason"] for r in bad)
    assert not [p for p in out.parent.iterdir() if ".staging" in p.name]
    return ok, bad


# ------------------------------------------------------------------------------------------- ingest
@fuzz(40)
@given(samples=st.lists(LLAVA_SAMPLE, max_size=8))
def test_llava_ingest_quarantines_every_bad_row_and_loses_none(image_root, samples):
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "train.json"
        src.write_text(json.dumps(samples))  # NaN/Infinity and \ud800 escapes survive the round trip
        cfg = IngestConfig(format="llava", image_root=image_root, max_image_pixels=1_000_000)
        m = run_ingest(src, Path(tmp) / "out", cfg)
        ok, bad = assert_reconciles(m, Path(tmp) / "out", len(samples))
        seen = [json.loads(r["meta"])["ingest"]["row"] for r in ok]
        for r in bad:
            match = REASON.match(r["reason"])
            assert match, r["reason"]
            rule, file, row, _field = match.groups()
            assert rule in INGEST_RULES and file == "train.json", r["reason"]
            seen.append(int(row))
        assert sorted(seen) == list(range(len(samples)))  # each input row exactly once
        assert len({r["id"] for r in ok}) == len(ok)
        for r in ok:  # nothing that escaped the image root, or is not an image, was accepted
            files = json.loads(r["meta"])["ingest"]["image_files"]
            assert all((image_root / f).resolve().is_relative_to(image_root) for f in files)
            assert set(files) <= {"a.png", "b.jpg", "sub/../a.png"}


JSONL_LINE = st.one_of(
    st.builds(lambda d: json.dumps(d).encode(), st.fixed_dictionaries(
        {"id": IDS}, optional={"text": TEXT, "messages": st.one_of(JUNK, st.lists(st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant", "system", "bot"]), "content": TEXT}), max_size=3)),
            "meta": st.one_of(JUNK, st.dictionaries(st.sampled_from(["k", "\ud800"]), TEXT, max_size=2))})),
    st.binary(max_size=12),  # random bytes: non-UTF-8 or not JSON: quarantined either way
    st.sampled_from([b"", b"   ", b"[1, 2]", b"null", b'{"text": "caf\xe9"}', b'{"text": NaN}',
                     b"\xef\xbb\xbf{}", b'{"id": 1, "text": "one"}', b'{"id": "1", "text": "again"}']),
)  # fmt: skip


def _jsonl_rows(lines: list[bytes]) -> int:
    """Every non-blank line is one input row (a line that is not a JSON object is a quarantined row)."""
    return sum(1 for line in lines if line.rstrip(b"\r\n").strip())


@fuzz(40)
@given(lines=st.lists(JSONL_LINE, max_size=10))
def test_jsonl_ingest_quarantines_bad_lines_never_a_crash(lines):
    lines = [ln.replace(b"\n", b" ").replace(b"\r", b" ") for ln in lines]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "docs.jsonl"
        src.write_bytes(b"\n".join(lines) + b"\n")
        out = Path(tmp) / "out"
        m = run_ingest(src, out, IngestConfig(format="jsonl"))
        ok, bad = assert_reconciles(m, out, _jsonl_rows(lines))
        for r in bad:
            assert re.match(r"^[a-z0-9_]+: docs\.jsonl:line \d+ field '[^']*': ", r["reason"]), r["reason"]
        for r in ok:
            json.loads(r["meta"], parse_constant=lambda c: pytest.fail(f"{c} in accepted meta"))
            r["id"].encode("utf-8")


# ------------------------------------------------------------------------------------------- filter + validate
IMAGE = st.fixed_dictionaries(
    {
        "data": st.one_of(st.sampled_from(list(IMAGE_BYTES.values())), st.binary(max_size=40)),
        "width": st.sampled_from([0, -1, 1, 28, 32, 40, 60_000, 2**31 - 1]),
        "height": st.sampled_from([0, -5, 28, 30, 32, 9_000, 60_000]),
        "format": st.sampled_from(["png", "jpeg", "webp", "gif", ""]),
    }
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", ""]), "content": st.text(max_size=40)}
)
RECORD = st.fixed_dictionaries(
    {
        "kind": st.one_of(st.sampled_from(KINDS), st.sampled_from(["", "poetry"])),
        "source": st.sampled_from(["fuzz", ""]),
        "text": st.one_of(st.none(), st.text(max_size=60), st.sampled_from(
            ["<image>\nA red square on a plain background, seen from above.", "<video>\nA short clip.",
             "word " * 40, "\x00\x07" * 10])),
        "messages": st.one_of(st.none(), st.lists(MESSAGE, max_size=3)),
        "images": st.lists(IMAGE, max_size=2),
        "media_kind": st.sampled_from(["none", "image", "video", "audio"]),
        "meta": st.sampled_from(["{}", '{"answer": 3}', "[1]", "NaN", '{"x": NaN}', "not json", ""]),
    }
)  # fmt: skip


@fuzz(40)
@given(recs=st.lists(RECORD, max_size=10))
def test_filter_splits_any_schema_valid_rows_without_losing_one(recs):
    recs = [{"id": f"r{i}", **r} for i, r in enumerate(recs)]
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(Path(tmp) / "in", recs, rows_per_shard=4)
        m = run_filter(Path(tmp) / "in", Path(tmp) / "out", FilterConfig(rows_per_shard=3))
        ok, bad = assert_reconciles(m, Path(tmp) / "out", len(recs))
        assert sorted(r["id"] for r in ok + bad) == sorted(r["id"] for r in recs)
        for r in bad:
            assert re.match(r"^(structure|text|image)\.[a-z_]+: ", r["reason"]), r["reason"]
            assert r["step"] == "filter"
        for r in ok:  # whatever passed the filter has decodable, bounded images
            assert all(im["width"] * im["height"] <= 16_000_000 for im in r["images"])


@fuzz(12)
@given(recs=st.lists(RECORD, min_size=1, max_size=8))
def test_validate_splits_any_schema_valid_rows_without_losing_one(recs):
    recs = [{"id": f"r{i}", **r} for i, r in enumerate(recs)]
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(Path(tmp) / "in", recs, rows_per_shard=4)
        m = run_validate(Path(tmp) / "in", Path(tmp) / "out", ValidateConfig(decode_images=True))
        ok, bad = assert_reconciles(m, Path(tmp) / "out", len(recs))
        assert sorted(r["id"] for r in ok + bad) == sorted(r["id"] for r in recs)
        assert all(r["step"] == "validate" and "expect_" in r["reason"] for r in bad)


@fuzz(8)
@given(samples=st.lists(LLAVA_SAMPLE, min_size=1, max_size=8))
def test_ingest_filter_validate_chain_reconciles_at_every_step(image_root, samples):
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "train.json").write_text(json.dumps(samples))
        m = run_ingest(t / "train.json", t / "raw", IngestConfig(format="llava", image_root=image_root))
        assert_reconciles(m, t / "raw", len(samples))
        f = run_filter(t / "raw", t / "filtered", FilterConfig())
        assert_reconciles(f, t / "filtered", m.counts["accepted"])
        v = run_validate(t / "filtered", t / "validated", ValidateConfig(decode_images=True))
        assert_reconciles(v, t / "validated", f.counts["accepted"])


# ------------------------------------------------------------------------------------------- regressions
def test_lone_surrogates_nan_and_nul_bytes_are_row_reasons_not_crashes(image_root, tmp_path):
    """Found by the fuzzers above: each used to crash the whole step (UnicodeEncodeError/ValueError)."""
    lines = [
        b'{"id": "s1", "text": "ok text", "meta": {"k": "\\ud800"}}',
        b'{"id": "s2\\udc00", "text": "ok text"}',
        b'{"id": "s3", "text": "ok text", "meta": {"x": NaN}}',
        b'{"id": "s4", "text": "fine text"}',
    ]
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines))
    m = run_ingest(tmp_path / "d.jsonl", tmp_path / "j", IngestConfig(format="jsonl"))
    ok, bad = assert_reconciles(m, tmp_path / "j", 4)
    assert [r["id"] for r in ok] == ["s4"]
    reasons = sorted(r["reason"] for r in bad)
    assert reasons[0].startswith("bad_field: d.jsonl:line 3 field 'meta': not JSON (NaN is not a JSON value")
    assert reasons[1].startswith("bad_utf8: d.jsonl:line 1 field 'meta'")
    assert reasons[2].startswith("bad_utf8: d.jsonl:line 2 field 'id'")
    samples = [
        {"id": str(i), "image": p, "conversations": QA} for i, p in enumerate(["a\x00.png", "x\ud800.png"])
    ]
    (tmp_path / "l.json").write_text(json.dumps(samples))
    m = run_ingest(tmp_path / "l.json", tmp_path / "l", IngestConfig(format="llava", image_root=image_root))
    _, bad = assert_reconciles(m, tmp_path / "l", 2)
    assert sorted(r["reason"].split(" field")[0] for r in bad) == [
        "bad_field: l.json[row 0]",
        "bad_utf8: l.json[row 1]",
    ]


def test_non_utf8_file_name_is_a_clear_error(tmp_path):
    import os

    d = tmp_path / "src"
    d.mkdir()
    with open(os.path.join(os.fsencode(d), b"caf\xe9.jsonl"), "wb") as f:
        f.write(b'{"text": "hello there"}\n')
    with pytest.raises(DatasetError, match=r"caf\\xe9\.jsonl: file name is not valid UTF-8"):
        run_ingest(d, tmp_path / "out", IngestConfig(format="jsonl"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong_schema"])
@pytest.mark.parametrize("step", ["filter", "validate"])
def test_unreadable_or_wrong_schema_shard_names_the_file(tmp_path, step, damage):
    from tests.unit.data.records import make_record

    write_dataset(tmp_path / "in", [make_record(f"r{i}", "text", text="Plain words here.") for i in range(5)])
    shard = sorted((tmp_path / "in").glob("part-*.parquet"))[1]
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-30])
    elif damage == "garbage":
        shard.write_bytes(b"PAR1 not really parquet")
    else:
        pq.write_table(pa.table({"id": ["x"], "body": ["y"]}), shard)
    run = {
        "filter": lambda: run_filter(tmp_path / "in", tmp_path / "out", FilterConfig()),
        "validate": lambda: run_validate(tmp_path / "in", tmp_path / "out", ValidateConfig()),
    }[step]
    with pytest.raises(DatasetError, match=re.escape(str(shard))):
        run()
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.staging-*"))
