"""Data contracts: per-kind GX suites, row-level quarantine reasons, and the validate step's invariants."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from data_contracts.validate import validate_records
from tasks.data.io import count_rows, iter_rows
from tasks.data.schema import KINDS, QUARANTINE_SCHEMA, RECORD_SCHEMA
from tasks.data.special_tokens import THINK_END, THINK_START
from tasks.data.validate import GX_RESULTS, ValidateConfig, run_validate
from tests.unit.data.records import make_record, picture, write_dataset

PROSE = (
    "The river bends twice before it reaches the old mill. Farmers bring their grain there every autumn. "
    "The miller keeps a ledger of every sack and its weight. "
)


def msgs(*turns: str) -> list[dict[str, str]]:
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


def clean(kind: str, i: int = 0) -> dict[str, Any]:
    """A record that satisfies ``kind``'s contract (built by hand, independently of the suites)."""
    rid = f"{kind}-{i}"
    pic = picture(i)
    if kind == "caption":
        return make_record(rid, kind, images=[pic])
    if kind == "grounding":
        return make_record(rid, kind, text="<image>\nThe red ball is at <box>(120,80),(560,700)</box>.", images=[pic],
                           meta={"boxes": [[120, 80, 560, 700]]})  # fmt: skip
    if kind == "ocr":
        return make_record(rid, kind, text="<image>\nHELLO 42", images=[pic], meta={"lines": ["HELLO 42"]})
    if kind in ("chart_qa", "doc_qa"):
        return make_record(rid, kind, messages=msgs("<image>\nWhich bar is highest?", "apple"), images=[pic])
    if kind == "interleaved":
        text = f"<image>\nThe first picture. {PROSE}\n<image>\nThe second picture."
        return make_record(rid, kind, text=text, images=[pic, picture(i + 100)])
    if kind == "video_qa":
        frames = [picture(i, (64, 48)) for _ in range(3)]
        return make_record(rid, kind, messages=msgs("<video>\nWhere does it move?", "left"), images=frames,
                           media_kind="video")  # fmt: skip
    if kind == "video_haystack":
        frames = [picture(i + k, (64, 48)) for k in range(4)]
        return make_record(
            rid, kind, text="<video>\nA clip of four frames.", images=frames, media_kind="video"
        )
    if kind == "long_doc":
        return make_record(rid, kind, text=PROSE * 4)
    if kind == "text":
        return make_record(rid, kind, text=PROSE)
    if kind == "sft":
        m = [
            {"role": "system", "content": "Be brief."},
            *msgs("<image>\nWhat is it?", "A ball.", "Colour?", "Red."),
        ]
        return make_record(rid, kind, messages=m, images=[pic])
    if kind == "cot":
        answer = f"{THINK_START}\nThree boxes of four is 3 * 4 = 12.\n{THINK_END}\nThe answer is 12."
        return make_record(rid, kind, messages=msgs("How many pencils in 3 boxes of 4?", answer),
                           meta={"answer": 12, "verified": True})  # fmt: skip
    assert kind == "synthetic_qa"
    return make_record(rid, kind, messages=msgs("<image>\nHow many balls?", "1"), images=[pic],
                       meta={"source_id": "x", "verification": {"verified": True}})  # fmt: skip


def bad_bytes(rec: dict[str, Any], **changes: Any) -> dict[str, Any]:
    im = dict(rec["images"][0], **changes)
    return {**rec, "images": [im, *rec["images"][1:]]}


NN, IN, BT, LEN, UQ = (
    "expect_column_values_to_not_be_null",
    "expect_column_values_to_be_in_set",
    "expect_column_values_to_be_between",
    "expect_column_value_lengths_to_be_between",
    "expect_column_values_to_be_unique",
)

# (kind, case name, mutation of a clean record, every label the broken row must be quarantined with)
# fmt: off
BROKEN: list[tuple[str, str, Any, set[str]]] = [
    ("caption", "null id", lambda r: {**r, "id": None}, {f"{NN}(id)"}),
    ("caption", "empty id", lambda r: {**r, "id": ""}, {f"{LEN}(id)"}),
    ("caption", "empty source", lambda r: {**r, "source": ""}, {f"{LEN}(source)"}),
    ("caption", "other kind", lambda r: {**r, "kind": "ocr"}, {f"{IN}(kind)"}),
    ("caption", "null kind", lambda r: {**r, "kind": None}, {f"{NN}(kind)"}),
    ("caption", "text and messages", lambda r: {**r, "messages": msgs("a", "b")}, {f"{IN}(content_form)"}),
    (
        "caption",
        "neither",
        lambda r: {**r, "text": None},
        {f"{IN}(content_form)", f"{IN}(placeholders_match)", f"{BT}(text_chars)"},
    ),
    ("caption", "short text", lambda r: {**r, "text": "<image>\nA"}, {f"{BT}(text_chars)"}),
    ("caption", "placeholder missing", lambda r: {**r, "text": "A red ball."}, {f"{IN}(placeholders_match)"}),
    (
        "caption",
        "bad media kind",
        lambda r: {**r, "media_kind": "audio"},
        {f"{IN}(media_kind)", f"{IN}(placeholders_match)"},
    ),
    (
        "caption",
        "two images",
        lambda r: {**r, "text": "<image><image> two", "images": r["images"] * 2},
        {f"{BT}(num_images)"},
    ),
    (
        "caption",
        "tiny image",
        lambda r: make_record(r["id"], images=[picture(1, (24, 24))]),
        {f"{BT}(image_min_side)"},
    ),
    (
        "caption",
        "thin image",
        lambda r: make_record(r["id"], images=[picture(1, (1260, 42))]),
        {f"{BT}(image_max_aspect)"},
    ),
    (
        "caption",
        "truncated png",
        lambda r: bad_bytes(r, data=r["images"][0]["data"][:200]),
        {f"{IN}(images_well_formed)"},
    ),
    ("caption", "wrong width", lambda r: bad_bytes(r, width=95), {f"{IN}(images_well_formed)"}),
    ("caption", "unknown format", lambda r: bad_bytes(r, format="gif"), {f"{IN}(images_well_formed)"}),
    ("caption", "meta list", lambda r: {**r, "meta": "[1, 2]"}, {f"{IN}(meta_is_json_object)"}),
    ("caption", "meta garbage", lambda r: {**r, "meta": "{oops"}, {f"{IN}(meta_is_json_object)"}),
    (
        "caption",
        "special token",
        lambda r: {**r, "text": r["text"] + " <|im_end|>"},
        {f"{IN}(has_reserved_tokens)"},
    ),
    (
        "caption",
        "control chars",
        lambda r: {**r, "text": r["text"] + "\x00\x07\ufffd"},
        {f"{BT}(control_chars)"},
    ),
    (
        "chart_qa",
        "as text",
        lambda r: {**r, "messages": None, "text": "<image>\nQ? apple"},
        {f"{IN}(content_form)", f"{NN}(last_role)"},
    ),
    (
        "chart_qa",
        "assistant first",
        lambda r: {**r, "messages": r["messages"][::-1]},
        {f"{IN}(roles_valid)", f"{IN}(last_role)"},
    ),
    (
        "chart_qa",
        "ends on user",
        lambda r: {**r, "messages": [*r["messages"], {"role": "user", "content": "And?"}]},
        {f"{IN}(last_role)"},
    ),
    (
        "chart_qa",
        "bad role",
        lambda r: {**r, "messages": [r["messages"][0], {"role": "bot", "content": "x"}]},
        {f"{IN}(roles_valid)", f"{IN}(last_role)"},
    ),
    (
        "chart_qa",
        "empty answer",
        lambda r: {**r, "messages": [r["messages"][0], {"role": "assistant", "content": " "}]},
        {f"{IN}(turns_nonempty)"},
    ),
    (
        "chart_qa",
        "no messages",
        lambda r: {**r, "messages": []},
        {
            f"{IN}(roles_valid)",
            f"{IN}(placeholders_match)",
            f"{NN}(last_role)",
            f"{BT}(text_chars)",
            f"{BT}(num_turns)",
        },
    ),
    (
        "cot",
        "wrong final answer",
        lambda r: {**r, "messages": msgs("Q?", f"{THINK_START} 12 {THINK_END} It is 13.")},
        {f"{IN}(answer_verified)"},
    ),
    (
        "cot",
        "answer prefix only",
        lambda r: {**r, "messages": msgs("Q?", f"{THINK_START} x {THINK_END} It is 120.")},
        {f"{IN}(answer_verified)"},
    ),
    (
        "cot",
        "not verified",
        lambda r: {**r, "meta": json.dumps({"answer": 12, "verified": False})},
        {f"{IN}(answer_verified)"},
    ),
    ("cot", "no ground truth", lambda r: {**r, "meta": "{}"}, {f"{IN}(answer_verified)"}),
    (
        "synthetic_qa",
        "unverified",
        lambda r: {**r, "meta": json.dumps({"verification": {"verified": False}})},
        {f"{IN}(answer_verified)"},
    ),
    (
        "grounding",
        "box outside",
        lambda r: {**r, "meta": json.dumps({"boxes": [[100, 100, 1200, 300]]})},
        {f"{IN}(boxes_in_range)"},
    ),
    (
        "grounding",
        "inverted box",
        lambda r: {**r, "meta": json.dumps({"boxes": [[500, 100, 400, 300]]})},
        {f"{IN}(boxes_in_range)"},
    ),
    ("grounding", "no boxes", lambda r: {**r, "meta": "{}"}, {f"{IN}(boxes_in_range)"}),
    (
        "grounding",
        "pixel box too big",
        lambda r: {**r, "meta": json.dumps({"boxes": [[0, 0, 97, 10]], "box_format": "xyxy_pixel"})},
        {f"{IN}(boxes_in_range)"},
    ),
    (
        "video_haystack",
        "one frame",
        lambda r: {**r, "images": r["images"][:1]},
        {f"{BT}(num_frames)", f"{BT}(num_images)"},
    ),
    (
        "video_qa",
        "image placeholders",
        lambda r: {**r, "media_kind": "image"},
        {f"{IN}(media_kind)", f"{IN}(placeholders_match)", f"{NN}(num_frames)"},
    ),
    (
        "video_qa",
        "two video tokens",
        lambda r: {**r, "messages": msgs("<video><video>\nWhere?", "left")},
        {f"{IN}(placeholders_match)"},
    ),
    (
        "text",
        "with an image",
        lambda r: make_record(r["id"], "text", text="<image>\n" + PROSE, images=[picture(3)]),
        {f"{IN}(media_kind)", f"{BT}(num_images)"},
    ),
    ("long_doc", "too short", lambda r: {**r, "text": "Short."}, {f"{BT}(text_chars)"}),
]
# fmt: on


@cache
def _validated(kind: str):
    """One GX run per kind: two clean rows, then every broken variant of that kind."""
    cases = [c for c in BROKEN if c[0] == kind]
    rows = [clean(kind, 0), clean(kind, 1)] + [
        mutate(clean(kind, 10 + j)) for j, (_, _, mutate, _) in enumerate(cases)
    ]
    return validate_records(rows, kind), [c[1] for c in cases]


def test_clean_dataset_of_each_kind_passes_and_auto_uses_each_rows_own_suite():
    rows = [clean(k, i) for k in KINDS for i in (0, 1)]
    n = len(rows)
    rows.append({**clean("text", 5), "kind": "poetry"})
    rows.append({**clean("ocr", 6), "id": "caption-0"})  # clashes with a row of another kind
    res = validate_records(rows, "auto")
    assert res.accepted_indices == list(range(1, n))  # every clean row but the id clash
    assert res.quarantined[n] == f"{IN}(kind): value 'poetry' not in {list(KINDS)!r}"
    assert res.quarantined[0] == res.quarantined[n + 1] == f"{UQ}(id): value 'caption-0' is not unique"
    suites = {s["suite"]: s for s in res.gx_result["suites"]}
    assert set(suites) == {"dataset", "unknown_kind", *KINDS}
    assert all(suites[k]["rows"] == 2 + (k == "ocr") and suites[k]["success"] for k in KINDS if k != "ocr")


@pytest.mark.parametrize(("kind", "name", "mutate", "labels"), BROKEN, ids=[f"{c[0]}:{c[1]}" for c in BROKEN])
def test_each_broken_field_is_quarantined_with_the_named_expectation(kind, name, mutate, labels):
    res, names = _validated(kind)
    i = 2 + names.index(name)
    assert 0 in res.accepted_indices and 1 in res.accepted_indices  # the clean rows next to it still pass
    assert i in res.quarantined, f"{name} was accepted"
    got = {part.split(": ", 1)[0] for part in res.quarantined[i].split("; ")}
    assert got == labels, res.quarantined[i]


def test_reason_lists_every_failure_with_the_offending_value():
    rec = {**clean("caption"), "text": "A", "meta": "[]"}
    res = validate_records([rec], "caption")
    reason = res.quarantined[0]
    assert f"{IN}(placeholders_match): value False not in [True]" in reason
    assert f"{BT}(text_chars): value 1 not in [3" in reason
    assert f"{IN}(meta_is_json_object): value False" in reason
    assert res.by_expectation == {
        f"{IN}(meta_is_json_object)": 1,
        f"{IN}(placeholders_match)": 1,
        f"{BT}(text_chars)": 1,
    }


def test_duplicate_ids_quarantine_every_copy():
    a, b = clean("caption", 0), clean("caption", 1)
    res = validate_records([a, b, dict(a)], "caption")
    assert res.accepted_indices == [1]
    assert res.quarantined[0] == res.quarantined[2] == f"{UQ}(id): value 'caption-0' is not unique"


def test_gx_result_maps_failures_to_rows_and_is_json():
    rows = [clean("text", 0), {**clean("text", 1), "text": "tiny"}, clean("text", 2)]
    res = validate_records(rows, "text")
    data = json.loads(json.dumps(res.gx_result))
    assert [s["suite"] for s in data["suites"]] == ["dataset", "text"]
    suite = data["suites"][1]
    failed = [e for e in suite["expectations"] if not e["success"]]
    assert [(e["expectation"], e["unexpected"]) for e in failed] == [
        (f"{BT}(text_chars)", [{"row": 1, "value": 4}])
    ]
    assert suite["evaluated_expectations"] == len(suite["expectations"]) > 20


def test_bounds_override_and_config_validation():
    res = validate_records([clean("caption", 0)], "caption", bounds={"caption": {"text_chars": (1000, None)}})
    assert f"{BT}(text_chars)" in res.quarantined[0]
    res = validate_records([clean("caption", 0)], "caption", bounds={"*": {"image_min_side": (200, None)}})
    assert f"{BT}(image_min_side)" in res.quarantined[0]
    with pytest.raises(ValidationError, match="unknown column"):
        ValidateConfig(bounds={"caption": {"nope": (1, 2)}})
    with pytest.raises(ValidationError, match="unknown kind"):
        ValidateConfig(bounds={"poetry": {"text_chars": (1, 2)}})
    with pytest.raises(ValidationError, match="min 5.0 > max 1.0"):
        ValidateConfig(bounds={"text": {"text_chars": (5, 1)}})
    with pytest.raises(ValidationError, match="kind must be"):
        ValidateConfig(kind="poetry")


def _mixed_rows() -> list[dict[str, Any]]:
    rows = []
    for k in ("caption", "text", "chart_qa", "cot", "video_qa"):
        rows += [clean(k, 0), clean(k, 1)]
    rows[1] = {**rows[1], "text": "no placeholder here"}
    rows[3] = {**rows[3], "meta": "not json"}
    rows[7] = {**rows[7], "messages": msgs("Q?", f"{THINK_START} x {THINK_END} The answer is 7.")}
    return rows


def test_run_validate_splits_rows_and_writes_gx_results(tmp_path):
    rows = _mixed_rows()
    write_dataset(tmp_path / "in", rows)
    m = run_validate(tmp_path / "in", tmp_path / "out", ValidateConfig(rows_per_shard=4))
    assert m.counts["input"] == len(rows) == m.counts["accepted"] + m.counts["quarantined"]
    assert m.counts["quarantined"] == 3
    assert m.counts["by_expectation"] == {
        f"{IN}(answer_verified)": 1,
        f"{IN}(meta_is_json_object)": 1,
        f"{IN}(placeholders_match)": 1,
    }
    accepted = list(iter_rows(tmp_path / "out", RECORD_SCHEMA))
    assert accepted == [r for i, r in enumerate(rows) if i not in (1, 3, 7)]  # unchanged, in order
    quarantined = list(iter_rows(tmp_path / "out" / "quarantine", QUARANTINE_SCHEMA))
    assert [q["id"] for q in quarantined] == [rows[i]["id"] for i in (1, 3, 7)]
    assert all(q["step"] == "validate" for q in quarantined)
    assert "placeholders_match" in quarantined[0]["reason"] and "answer_verified" in quarantined[2]["reason"]
    gx_res = json.loads((tmp_path / "out" / GX_RESULTS).read_text())
    assert gx_res["rows"] == len(rows) and gx_res["success"] is False
    assert GX_RESULTS in {f["path"] for f in m.files}


def test_run_validate_all_fail_and_empty(tmp_path):
    rows = [{**clean("caption", i), "meta": "[]"} for i in range(5)]
    write_dataset(tmp_path / "bad", rows)
    m = run_validate(tmp_path / "bad", tmp_path / "bad_out", ValidateConfig(kind="caption"))
    assert (m.counts["input"], m.counts["accepted"], m.counts["quarantined"]) == (5, 0, 5)
    assert count_rows(tmp_path / "bad_out") == 0 and count_rows(tmp_path / "bad_out" / "quarantine") == 5
    write_dataset(tmp_path / "empty", [])
    m = run_validate(tmp_path / "empty", tmp_path / "empty_out", ValidateConfig())
    assert (m.counts["input"], m.counts["accepted"], m.counts["quarantined"]) == (0, 0, 0)
    assert json.loads((tmp_path / "empty_out" / GX_RESULTS).read_text())["success"] is True


def test_run_validate_is_deterministic_and_skips_when_up_to_date(tmp_path):
    rows = [clean("text", i) for i in range(4)]
    rows[2] = {**rows[2], "text": "short"}
    write_dataset(tmp_path / "in", rows)
    cfg = ValidateConfig(kind="text")
    m1 = run_validate(tmp_path / "in", tmp_path / "a", cfg)
    m2 = run_validate(tmp_path / "in", tmp_path / "b", cfg)
    assert m1.content_hash == m2.content_hash and m1.counts["quarantined"] == 1
    before = (tmp_path / "a" / "manifest.json").stat().st_mtime_ns
    assert run_validate(tmp_path / "in", tmp_path / "a", cfg).content_hash == m1.content_hash
    assert (tmp_path / "a" / "manifest.json").stat().st_mtime_ns == before  # skipped, not rewritten
    m3 = run_validate(
        tmp_path / "in", tmp_path / "a", ValidateConfig(kind="text", bounds={"text": {"text_chars": (1, 50)}})
    )
    # the config change forced a rerun: now the three prose rows are too long and "short" passes
    assert (m3.counts["accepted"], m3.counts["quarantined"]) == (1, 3)
    assert m3.content_hash != m1.content_hash


def test_decode_images_catches_corrupt_pixel_data(tmp_path):
    rec = clean("caption", 0)
    data = bytearray(rec["images"][0]["data"])
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(64)  # header, size and end marker intact; compressed pixels destroyed
    rows = [bad_bytes(rec, data=bytes(data)), clean("caption", 1)]
    write_dataset(tmp_path / "in", rows)
    m = run_validate(tmp_path / "in", tmp_path / "fast", ValidateConfig(kind="caption"))
    assert m.counts["quarantined"] == 0  # cheap checks cannot see it
    m = run_validate(tmp_path / "in", tmp_path / "full", ValidateConfig(kind="caption", decode_images=True))
    assert m.counts["quarantined"] == 1 and m.counts["by_expectation"] == {f"{IN}(images_well_formed)": 1}


def test_run_validate_missing_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_validate(tmp_path / "nope", tmp_path / "out", ValidateConfig())
    assert not (tmp_path / "out").exists()


def test_accepted_plus_quarantined_equals_input_on_random_damage(tmp_path):
    import random

    rng = random.Random(0)
    damage = [c[2] for c in BROKEN if c[0] == "caption"]
    rows = [
        rng.choice(damage)(clean("caption", i)) if rng.random() < 0.5 else clean("caption", i)
        for i in range(40)
    ]
    rows = [r for r in rows if r["id"] and r["kind"] and r["source"] is not None]  # keep schema-valid rows
    write_dataset(tmp_path / "in", rows, rows_per_shard=7)
    m = run_validate(tmp_path / "in", tmp_path / "out", ValidateConfig(kind="caption", rows_per_shard=5))
    assert m.counts["accepted"] + m.counts["quarantined"] == m.counts["input"] == len(rows)
    assert count_rows(tmp_path / "out") == m.counts["accepted"]
    assert count_rows(tmp_path / "out" / "quarantine") == m.counts["quarantined"]
    assert isinstance(Path(tmp_path / "out" / GX_RESULTS).read_text(), str)
