"""Ingest of the 5 user formats: good rows become records, every bad row is quarantined with the expected
rule naming the file, row/key and field, whole-file problems raise naming the file; counts reconcile."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import pytest
from PIL import Image

from tasks.data.images import decode_image
from tasks.data.ingest import IngestConfig, run_ingest
from tasks.data.io import DatasetError, iter_rows
from tasks.data.schema import QUARANTINE_SCHEMA, RECORD_SCHEMA
from tasks.io.manifest import read_manifest


def png_bytes(w: int = 20, h: int = 16, color=(200, 30, 30), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format=fmt)
    return buf.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def images_dir(root: Path) -> Path:
    """root/images with good, truncated and oversized files, plus a file OUTSIDE it and a symlink out."""
    d = root / "images"
    write(d / "a.png", png_bytes(20, 16, (200, 30, 30)))
    write(d / "b.png", png_bytes(24, 12, (30, 200, 30)))
    write(d / "sub" / "c.jpg", png_bytes(16, 16, (30, 30, 200), "JPEG"))
    write(d / "trunc.png", png_bytes(64, 64)[:60])
    write(d / "big.png", png_bytes(300, 300))
    write(root / "outside.png", png_bytes())
    os.symlink(root / "outside.png", d / "link.png")
    return d


def run(src: Path, out: Path, **cfg):
    m = run_ingest(src, out, IngestConfig(**cfg))
    ok = {r["id"]: r for r in iter_rows(out, RECORD_SCHEMA)}
    bad = {r["id"]: r for r in iter_rows(out / "quarantine", QUARANTINE_SCHEMA)}
    assert m.counts["accepted"] == len(ok) and m.counts["quarantined"] == len(bad)
    assert m.counts["input"] == m.counts["accepted"] + m.counts["quarantined"]
    assert (m.kind, m.step) == ("dataset", "ingest")
    return m, ok, bad


def assert_reasons(bad: dict, expected: dict[str, tuple[str, ...]]):
    """Each expected id is quarantined with a reason starting with the rule and containing the pieces."""
    assert set(bad) == set(expected), sorted(bad)
    for rid, (rule, *pieces) in expected.items():
        reason = bad[rid]["reason"]
        assert reason.startswith(rule + ": "), reason
        for p in pieces:
            assert p in reason, (p, reason)
        assert bad[rid]["step"] == "ingest"


def conv(*turns: tuple[str, str]) -> list[dict]:
    return [{"from": f, "value": v} for f, v in turns]


QA = conv(("human", "<image>\nWhat colour is it?"), ("gpt", "Red."))


def test_llava(tmp_path):
    img = images_dir(tmp_path)
    samples = [
        {"id": "ok1", "image": "a.png", "conversations": QA},
        {"id": "ok2", "image": "b.png", "conversations": conv(("human", "Describe."), ("gpt", "Green."))},
        {"id": "ok3", "conversations": conv(("system", "Be brief."), ("human", "Hi?"), ("gpt", "Hello."))},
        {
            "id": 4,
            "images": ["a.png", "sub/c.jpg"],
            "conversations": conv(("human", "<image><image>\nSame?"), ("gpt", "No.")),
        },
        {"id": "dots", "image": "../outside.png", "conversations": QA},
        {"id": "abs", "image": str(tmp_path / "outside.png"), "conversations": QA},
        {"id": "link", "image": "link.png", "conversations": QA},
        {"id": "missing", "image": "nope.png", "conversations": QA},
        {"id": "trunc", "image": "trunc.png", "conversations": QA},
        {"id": "big", "image": "big.png", "conversations": QA},
        {"id": "ok1", "image": "a.png", "conversations": QA},  # duplicate id
        {"image": "a.png", "conversations": QA},  # no id
        {"id": "twice", "image": "a.png", "conversations": conv(("human", "<image><image>?"), ("gpt", "x"))},
        {"id": "empty", "image": "a.png", "conversations": conv(("human", "<image>Q?"), ("gpt", "   "))},
        {"id": "robot", "conversations": conv(("robot", "Q?"), ("gpt", "A."))},
        {"id": "order", "conversations": conv(("gpt", "A."), ("human", "Q?"))},
        {"id": "noconv", "image": "a.png"},
    ]
    src = write(tmp_path / "data" / "train.json", json.dumps(samples))
    m, ok, bad = run(
        src, tmp_path / "out", format="llava", source="mine", image_root=img, max_image_pixels=50_000
    )
    assert m.counts["input"] == len(samples) and set(ok) == {"ok1", "ok2", "ok3", "4"}
    assert_reasons(bad, {
        "dots": ("path_traversal", "train.json[row 4]", "'image'", "outside the image root"),
        "abs": ("path_traversal", "row 5", "absolute path"),
        "link": ("path_traversal", "row 6", "outside the image root"),
        "missing": ("missing_image", "row 7", "'image'", "nope.png"),
        "trunc": ("bad_image", "row 8", "'image'"),
        "big": ("oversized_image", "row 9", "90000 pixels", "50000"),
        "<no id> train.json[row 11]": ("missing_field", "field 'id'"),
        "twice": ("placeholder_mismatch", "row 12", "2 <image> placeholders", "1 images"),
        "empty": ("empty_text", "row 13", "conversations[1].value"),
        "robot": ("bad_role", "row 14", "conversations[0].from", "'robot'"),
        "order": ("bad_turns", "row 15"),
        "noconv": ("missing_field", "row 16", "'conversations'"),
    } | {"ok1": ("duplicate_id", "row 10", "first seen at train.json[row 0]")})  # fmt: skip
    assert m.extra["quarantine_reasons"]["path_traversal"] == 3
    r1 = ok["ok1"]
    assert r1["messages"] == [
        {"role": "user", "content": "<image>\nWhat colour is it?"},
        {"role": "assistant", "content": "Red."},
    ]
    assert (r1["kind"], r1["source"], r1["media_kind"]) == ("sft", "mine", "image")
    assert r1["images"][0]["data"] == (img / "a.png").read_bytes() and r1["images"][0]["width"] == 20
    r2 = ok["ok2"]  # LLaVA convention: a placeholder is prepended to the first user turn
    assert r2["messages"][0]["content"] == "<image>\nDescribe."
    assert json.loads(r2["meta"])["ingest"]["placeholders_added"] == 1 and m.extra["placeholders_added"] == 1
    assert [x["role"] for x in ok["ok3"]["messages"]] == ["system", "user", "assistant"] and ok["ok3"][
        "media_kind"
    ] == "none"
    assert [i["format"] for i in ok["4"]["images"]] == ["png", "jpeg"]
    assert decode_image(ok["4"]["images"][1]["data"]).size == (16, 16)


def test_llava_malformed_json_and_wrong_shape(tmp_path):
    bad = write(tmp_path / "broken.json", '[{"id": "a", "conversations": [}]')
    with pytest.raises(
        DatasetError, match=r"broken\.json: malformed JSON at line 1 column \d+.*expected a JSON list"
    ):
        run_ingest(bad, tmp_path / "o1", IngestConfig(format="llava"))
    obj = write(tmp_path / "obj.json", '{"id": "a"}')
    with pytest.raises(DatasetError, match=r"obj\.json: expected a JSON list of LLaVA samples"):
        run_ingest(obj, tmp_path / "o2", IngestConfig(format="llava"))
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        run_ingest(tmp_path / "nothing.json", tmp_path / "o3", IngestConfig(format="llava"))
    assert not (tmp_path / "o1").exists() and not [p for p in tmp_path.iterdir() if ".staging" in p.name]


def test_coco(tmp_path):
    img = images_dir(tmp_path)
    coco = {
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "gone.png"},
                   {"id": 3, "file_name": "trunc.png"}, {"id": 4, "file_name": "../outside.png"}],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A red square."},
            {"id": 11, "image_id": 2, "caption": "Missing file."},
            {"id": 12, "image_id": 1, "caption": "Red again."},
            {"id": 13, "image_id": 3, "caption": "Broken."},
            {"id": 14, "image_id": 99, "caption": "No such image."},
            {"id": 15, "image_id": 1, "caption": ""},
            {"id": 10, "image_id": 1, "caption": "Duplicate id."},
            {"id": 16, "image_id": 4, "caption": "Escapes."},
            {"id": 17, "caption": "No image id."},
            {"image_id": 1, "caption": "Annotation without an id."},
        ],
    }  # fmt: skip
    src = write(tmp_path / "captions.json", json.dumps(coco))
    m, ok, bad = run(src, tmp_path / "out", format="coco", image_root=img)
    assert m.counts["input"] == 10 and set(ok) == {"10", "12", "captions-9"}
    assert ok["10"]["text"] == "<image>A red square." and ok["12"]["text"] == "<image>Red again."
    assert ok["10"]["images"] == ok["12"]["images"] and ok["10"]["kind"] == "caption"
    assert_reasons(bad, {
        "11": ("missing_image", "captions.json[annotation 1]", "'file_name'", "gone.png"),
        "13": ("bad_image", "annotation 3", "'file_name'"),
        "14": ("missing_image", "annotation 4", "'image_id'", "99"),
        "15": ("empty_text", "annotation 5", "'caption'"),
        "16": ("path_traversal", "annotation 7", "outside the image root"),
        "17": ("missing_field", "annotation 8", "'image_id'"),
    } | {"10": ("duplicate_id", "annotation 6")})  # fmt: skip
    with pytest.raises(DatasetError, match=r"captions2\.json: expected a COCO captions object"):
        run_ingest(
            write(tmp_path / "captions2.json", '{"images": []}'), tmp_path / "o2", IngestConfig(format="coco")
        )


def test_jsonl(tmp_path):
    lines = [
        json.dumps({"id": "t1", "text": "Hello world.", "meta": {"lang": "en"}}).encode(),
        json.dumps({"text": "No id here."}).encode(),
        b'{"id": "latin1", "text": "caf\xe9"}',
        b"",
        json.dumps({"id": "empty", "text": " "}).encode(),
        json.dumps({"id": "notext", "body": "x"}).encode(),
        json.dumps({"id": "t1", "text": "Again."}).encode(),
        b'{"id": "surrogate", "text": "bad \\ud800 char"}',
        json.dumps(
            {
                "id": "chat",
                "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
            }
        ).encode(),
        json.dumps({"id": "badmeta", "text": "x", "meta": [1]}).encode(),
        json.dumps({"id": "img", "text": "<image> mentioned but absent"}).encode(),
    ]
    src = write(tmp_path / "docs.jsonl", b"\n".join(lines) + b"\n")
    m, ok, bad = run(src, tmp_path / "out", format="jsonl", source="web")
    assert m.counts["input"] == 10  # the blank line is not a row
    assert set(ok) == {"t1", "docs-0000002", "chat"}
    assert ok["t1"]["text"] == "Hello world." and ok["t1"]["kind"] == "text" and ok["t1"]["source"] == "web"
    assert json.loads(ok["t1"]["meta"])["lang"] == "en" and ok["chat"]["kind"] == "sft"
    assert_reasons(bad, {
        "<no id> docs.jsonl:line 3": ("bad_utf8", "docs.jsonl:line 3", "0xe9", "byte offset 29"),
        "empty": ("empty_text", "line 5", "'text'"),
        "notext": ("missing_field", "line 6", "'text'"),
        "surrogate": ("bad_utf8", "line 8", "'text'"),
        "badmeta": ("bad_field", "line 10", "'meta'"),
        "img": ("placeholder_mismatch", "line 11", "1 <image> placeholders", "0 images"),
    } | {"t1": ("duplicate_id", "line 7")})  # fmt: skip
    assert "caf" in json.loads(bad["<no id> docs.jsonl:line 3"]["meta"])["raw"]
    # a line that is not a JSON object (a syntax error, a truncated last line, a list) is one bad row: the
    # other lines of the file are ingested and the bad one is quarantined with its text
    broken = write(tmp_path / "broken" / "x.jsonl", b'{"text": "ok"}\n{"text": oops}\n[1, 2]\n{"text": "tr')
    m, ok, bad = run(broken.parent, tmp_path / "o2", format="jsonl")
    assert m.counts["input"] == 4 and list(ok) == ["x-0000001"]
    assert_reasons(bad, {
        "<no id> x.jsonl:line 2": ("bad_json", "malformed JSON", "column 10", "one JSON object per line"),
        "<no id> x.jsonl:line 3": ("bad_json", "expected a JSON object, got a JSON list"),
        "<no id> x.jsonl:line 4": ("bad_json", "malformed JSON", "Unterminated string"),
    })  # fmt: skip
    assert json.loads(bad["<no id> x.jsonl:line 2"]["meta"])["raw"] == '{"text": oops}'


def tar_shard(path: Path, members: list[tuple[str, bytes | None]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
                continue
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_webdataset(tmp_path):
    good = png_bytes()
    shard = tar_shard(tmp_path / "shards" / "000.tar", [
        ("d", None),
        ("d/k1.png", good), ("d/k1.txt", b"A red picture."),
        ("d/k2.jpg", png_bytes(fmt="JPEG")), ("d/k2.json", json.dumps({"caption": "From json."}).encode()),
        ("d/k3.txt", b"caption without image"),
        ("d/k4.png", good), ("d/k4.txt", b"caf\xe9"),
        ("d/k5.png", good[:50]), ("d/k5.txt", b"Truncated."),
        ("d/k6.png", good), ("d/k6.json", b"{not json"),
        ("d/k7.png", good),
        ("d/.hidden.txt", b"ignored"),
        ("d/k1.png", good), ("d/k1.txt", b"Same key again."),
    ])  # fmt: skip
    m, ok, bad = run(shard.parent, tmp_path / "out", format="webdataset")
    assert m.counts["input"] == 8 and set(ok) == {"d/k1", "d/k2"}
    assert ok["d/k1"]["text"] == "<image>A red picture." and ok["d/k1"]["images"][0]["data"] == good
    assert ok["d/k2"]["text"] == "<image>From json." and ok["d/k2"]["images"][0]["format"] == "jpeg"
    assert_reasons(bad, {
        "d/k3": ("missing_field", "000.tar[key d/k3]", "'image'"),
        "d/k4": ("bad_utf8", "[key d/k4]", "'txt'", "0xe9"),
        "d/k5": ("bad_image", "[key d/k5]", "'png'"),
        "d/k6": ("bad_json", "[key d/k6]", "'json'"),
        "d/k7": ("missing_field", "[key d/k7]", "'txt'"),
    } | {"d/k1": ("duplicate_id", "first seen at 000.tar[key d/k1]")})  # fmt: skip
    junk = write(tmp_path / "junk" / "bad.tar", b"\x00\x01 not a tar" * 10)
    with pytest.raises(DatasetError, match=r"bad\.tar: not a readable tar archive"):
        run_ingest(junk, tmp_path / "o2", IngestConfig(format="webdataset"))


def rec(rid, text=None, images=(), messages=None, media_kind=None, meta="{}", **kw):
    imgs = [{"data": d, "width": w, "height": h, "format": f} for d, w, h, f in images]
    return {"id": rid, "kind": kw.get("kind", "caption"), "source": "up", "text": text, "messages": messages,
            "images": imgs, "media_kind": media_kind or ("image" if imgs else "none"), "meta": meta}  # fmt: skip


def test_parquet(tmp_path):
    good = png_bytes(20, 16)
    rows = [
        rec("p1", "<image>Red.", [(good, 20, 16, "png")]),
        rec("p2", "Plain text.", kind="text"),
        rec(
            "p3",
            None,
            messages=[{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
            kind="sft",
        ),
        rec("size", "<image>Lies.", [(good, 99, 16, "png")]),
        rec("trunc", "<image>Cut.", [(good[:40], 20, 16, "png")]),
        rec("p1", "Duplicate."),
        rec("ph", "<image><image>Two?", [(good, 20, 16, "png")]),
        rec("both", "x", messages=[{"role": "user", "content": "Q"}]),
        rec("kind", "x", kind="poetry"),
        rec("vid", "<video>Frames.", [(good, 20, 16, "png")] * 3, media_kind="video"),
        rec("meta", "x", meta="[1, 2]"),
    ]
    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:6], schema=RECORD_SCHEMA), d / "a.parquet")
    loose = pa.Table.from_pylist(rows[6:])  # inferred schema: all nullable, but the same types
    pq.write_table(loose.cast(pa.schema([pa.field(f.name, f.type) for f in RECORD_SCHEMA])), d / "b.parquet")
    m, ok, bad = run(d, tmp_path / "out", format="parquet")
    assert m.counts["input"] == 11 and set(ok) == {"p1", "p2", "p3", "vid"}
    assert ok["p1"]["images"][0]["data"] == good and ok["vid"]["media_kind"] == "video"
    assert json.loads(ok["p2"]["meta"])["ingest"] == {"format": "parquet", "file": "a.parquet", "row": 1}
    assert_reasons(bad, {
        "size": ("bad_image", "a.parquet[row 3]", "images[0]", "declared 99x16"),
        "trunc": ("bad_image", "a.parquet[row 4]", "images[0]"),
        "ph": ("placeholder_mismatch", "b.parquet[row 0]"),
        "both": ("bad_field", "b.parquet[row 1]", "exactly one of text and messages"),
        "kind": ("bad_field", "row 2", "'kind'", "'poetry'"),
        "meta": ("bad_field", "row 4", "'meta'", "JSON object"),
    } | {"p1": ("duplicate_id", "a.parquet[row 5]")})  # fmt: skip
    wrong = pa.table({"id": ["x"], "text": ["t"], "foo": [1]})
    pq.write_table(wrong, tmp_path / "wrong.parquet")
    with pytest.raises(
        DatasetError,
        match=r"wrong\.parquet: not in RECORD_SCHEMA: missing columns \['images', 'kind'.*extra columns \['foo'\]",
    ):
        run_ingest(tmp_path / "wrong.parquet", tmp_path / "o2", IngestConfig(format="parquet"))
    typed = pa.Table.from_pylist(rows[:1], schema=RECORD_SCHEMA).set_column(7, "meta", pa.array([1]))
    pq.write_table(typed, tmp_path / "typed.parquet")
    with pytest.raises(DatasetError, match=r"typed\.parquet: column 'meta' has type int64, expected string"):
        run_ingest(tmp_path / "typed.parquet", tmp_path / "o3", IngestConfig(format="parquet"))


def test_skip_when_up_to_date_and_rerun_on_change(tmp_path):
    img = images_dir(tmp_path)
    src = write(
        tmp_path / "train.json", json.dumps([{"id": "a", "image": "images/a.png", "conversations": QA}])
    )
    cfg = IngestConfig(format="llava")
    first = run_ingest(src, tmp_path / "out", cfg)
    stamp = (tmp_path / "out" / "manifest.json").stat().st_mtime_ns
    assert run_ingest(src, tmp_path / "out", cfg).content_hash == first.content_hash
    assert (tmp_path / "out" / "manifest.json").stat().st_mtime_ns == stamp
    write(img / "a.png", png_bytes(30, 30, (1, 2, 3)))  # a referenced image changed -> not up to date
    second = run_ingest(src, tmp_path / "out", cfg)
    assert second.content_hash != first.content_hash and read_manifest(tmp_path / "out") == second
    assert run_ingest(src, tmp_path / "o2", cfg).content_hash == second.content_hash  # deterministic


def test_config_validation():
    with pytest.raises(pydantic.ValidationError, match="kind must be one of"):
        IngestConfig(format="jsonl", kind="poetry")
    with pytest.raises(pydantic.ValidationError):
        IngestConfig(format="csv")
    with pytest.raises(pydantic.ValidationError):
        IngestConfig(format="jsonl", source="has space")
    with pytest.raises(pydantic.ValidationError):
        IngestConfig(format="jsonl", imageroot="x")


def test_cli_ingest_options_and_errors(tmp_path):
    """`kimivl data ingest`: counts as JSON on stdout; --kind / --source / --max-image-pixels reach the
    records; a bad option or a missing source exits 2 naming it, and writes nothing."""
    from typer.testing import CliRunner

    from flows.cli import app

    src = write(
        tmp_path / "docs.jsonl", '{"id": "a", "text": "one two three"}\n{"id": "b", "text": "four"}\n'
    )

    def ingest(*args: str):
        return CliRunner().invoke(app, ["data", "ingest", *args], env={"COLUMNS": "300", "NO_COLOR": "1"})

    res = ingest(
        str(src), "--format", "jsonl", "--out", str(tmp_path / "o"), "--kind", "long_doc", "--source", "notes"
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1]) == {
        "accepted": 2,
        "images": 0,
        "input": 2,
        "quarantined": 0,
    }
    rows = list(iter_rows(tmp_path / "o", RECORD_SCHEMA))
    assert {(r["kind"], r["source"]) for r in rows} == {("long_doc", "notes")}

    pic = write(tmp_path / "img" / "a.png", png_bytes(20, 16))
    llava = write(tmp_path / "l.json", json.dumps([{"id": "x", "image": pic.name, "conversations": [
        {"from": "human", "value": "What?"}, {"from": "gpt", "value": "Red."}]}]))  # fmt: skip
    res = ingest(str(llava), "--format", "llava", "--out", str(tmp_path / "l"), "--image-root", str(pic.parent),
                 "--max-image-pixels", "100")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["quarantined"] == 1  # 20 x 16 > 100 pixels

    for args, piece in [
        (["--kind", "poetry"], "--kind"),
        (["--max-image-pixels", "0"], "--max-image-pixels"),
        (["--source", "bad name!"], "--source"),
        (["--format", "csv"], "--format"),
    ]:
        opts = {"--format": "jsonl", **dict(zip(args[::2], args[1::2], strict=True))}
        flat = [x for kv in opts.items() for x in kv]
        res = ingest(str(src), "--out", str(tmp_path / "bad"), *flat)
        assert res.exit_code == 2 and piece in res.output, (args, res.output)
    res = ingest(str(tmp_path / "missing.jsonl"), "--format", "jsonl", "--out", str(tmp_path / "bad"))
    assert res.exit_code == 2 and "missing.jsonl" in res.output and "does not exist" in res.output
    assert not (tmp_path / "bad").exists()
