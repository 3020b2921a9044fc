"""QA synthesis: rejection sampling against ground truth, outputs, determinism, the OpenAI-compatible backend."""

from __future__ import annotations

import base64
import json
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from pydantic import ValidationError

from tasks.data.io import iter_rows
from tasks.data.qa_facts import Candidate
from tasks.data.qa_openai import GeneratorError, OpenAICompatibleGenerator
from tasks.data.qa_synthesis import MetadataQAGenerator, QASynthConfig, Verifier, run_qa_synthesis
from tasks.data.schema import QUARANTINE_SCHEMA, RECORD_SCHEMA
from tests.unit.data.records import make_record, picture, write_dataset

PROSE = (
    "The river bends twice before it reaches the old mill. Farmers bring their grain there every autumn. "
    "The miller keeps a ledger of every sack and its weight. Children watch the heavy wheel turning slowly."
)
OBJECTS = [
    {"shape": "circle", "color": "red", "size": "small", "position": "top left"},
    {"shape": "square", "color": "blue", "size": "large", "position": "bottom right"},
    {"shape": "circle", "color": "green", "size": "medium", "position": "center"},
]
CHART = {"title": "Fruit sold", "labels": ["apple", "pear", "fig"], "values": [12, 30, 7]}
FIELDS = {"Invoice No": "4821", "Customer": "Dana Cohen", "Total": "99.50"}
LINES = ["HELLO world", "4821 2020-01-02", "Total due soon"]
MOTION = {"shape": "star", "color": "pink", "direction": "left", "num_frames": 3, "num_shapes": 2}


def qa(q: str, a: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def source_records() -> list[dict[str, Any]]:
    frames = [picture(k, (64, 48)) for k in range(3)]
    return [
        make_record("scene", "caption", text="<image>\nThree shapes drawn on a white page for a small test.",
                    images=[picture(1)], meta={"scene": {"objects": OBJECTS}}),
        make_record("chart", "chart_qa", messages=qa("<image>\nWhich is highest?", "pear"), images=[picture(2)],
                    meta=CHART),
        make_record("doc", "doc_qa", messages=qa("<image>\nWho?", "Dana Cohen"), images=[picture(3)],
                    meta={"title": "Invoice 7", "fields": FIELDS}),
        make_record("ocr", "ocr", text="<image>\n" + "\n".join(LINES), images=[picture(4)],
                    meta={"lines": LINES}),
        make_record("video", "video_qa", messages=qa("<video>\nWhere?", "left"), images=frames, media_kind="video",
                    meta=MOTION),
        make_record("prose", "text", text=PROSE),
    ]  # fmt: skip


def reference_answer(src_id: str, question: str) -> str | None:
    """Ground truth written independently of the generator (by hand from the constants above)."""
    q = question
    if src_id == "scene":
        if q == "How many objects are in the image?":
            return "3"
        if m := re.fullmatch(r"How many (\w+)s are in the image\?", q):
            return str(sum(o["shape"] == m[1] for o in OBJECTS))
        if m := re.fullmatch(r"What color is the (\w+) in the image\?", q):
            return next(o["color"] for o in OBJECTS if o["shape"] == m[1])
        if m := re.fullmatch(r"What shape is the (\w+) object in the image\?", q):
            return next(o["shape"] for o in OBJECTS if o["color"] == m[1])
        if m := re.fullmatch(r"(Where|What size) is the (\w+) (\w+) in the image\?", q):
            o = next(o for o in OBJECTS if o["color"] == m[2] and o["shape"] == m[3])
            return o["position"] if m[1] == "Where" else o["size"]
    if src_id == "chart":
        vals = dict(zip(CHART["labels"], CHART["values"], strict=True))
        if "highest" in q:
            return "pear"
        if "lowest" in q:
            return "fig"
        if m := re.fullmatch(r"What is the value of (\w+) in the chart\?", q):
            return str(vals[m[1]])
        if m := re.fullmatch(r"Is the value of (\w+) greater than the value of (\w+)\?", q):
            return "yes" if vals[m[1]] > vals[m[2]] else "no"
        if m := re.fullmatch(r"By how much does the value of (\w+) exceed the value of (\w+)\?", q):
            return str(vals[m[1]] - vals[m[2]])
    if src_id == "doc":
        if q == "What is the title of the document?":
            return "Invoice 7"
        if m := re.fullmatch(r"According to the document, what is the (.+)\?", q):
            return FIELDS[m[1]]
    if src_id == "ocr" and (m := re.fullmatch(r"What text is written on line (\d) of the image\?", q)):
        return LINES[int(m[1]) - 1]
    if src_id == "video":
        if q == "In which direction does the pink star move in the video?":
            return "left"
        if q == "How many frames does the video have?":
            return "3"
        if q == "How many shapes are in the video?":
            return "2"
    return None


def passage_answer_ok(passage: str, question: str, answer: str) -> bool | None:
    """Cloze: the filled sentence occurs in the passage; follows: "phrase answer" occurs in it."""
    flat = " ".join(passage.split())
    if m := re.fullmatch(r'Fill in the blank in this sentence from the passage: "(.*)"', question):
        return m[1].replace("____", answer) in flat
    if m := re.fullmatch(r'In the passage, which word comes right after "(.*)"\?', question):
        return f"{m[1]} {answer}" in flat
    return None


def is_correct(src: dict[str, Any], question: str, answer: str) -> bool:
    ref = reference_answer(src["id"], question)
    if ref is not None:
        return answer.strip().lower() == ref.lower()
    ok = passage_answer_ok(src["text"] or "", question, answer)
    assert ok is not None, f"test has no reference for {question!r}"
    return ok


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("qa") / "src"
    rows = source_records()
    write_dataset(d, rows)
    return d, {r["id"]: r for r in rows}


def run(tmp_path, src_dir, name="out", generator=None, **cfg):
    kinds = ("caption", "chart_qa", "doc_qa", "ocr", "video_qa", "text")
    return run_qa_synthesis([src_dir], tmp_path / name, QASynthConfig(kinds=kinds, **cfg), generator)


def test_oracle_generator_accepts_everything(tmp_path, sources):
    m = run(tmp_path, sources[0], noise_rate=0.0, n_per_record=3)
    c = m.counts
    assert c["acceptance_rate"] == 1.0 and c["rejected"] == 0 and c["quarantined"] == 0
    assert c["accepted"] == c["candidates"] == c["input"] == 6 * 3
    assert c["records_with_qa"] == c["input_records"] == 6
    assert list(iter_rows(tmp_path / "out" / "quarantine", QUARANTINE_SCHEMA)) == []


def test_noisy_generator_rejects_exactly_the_wrong_ones(tmp_path, sources):
    src_dir, by_id = sources
    m = run(tmp_path, src_dir, noise_rate=0.5, n_per_record=4, max_attempts=6, seed=3)
    c = m.counts
    assert c["accepted"] + c["rejected"] == c["candidates"]
    assert 0 < c["rejected"] == c["injected_errors"] == c["injected_errors_rejected"]
    assert (
        m.extra["acceptance_rate"] == c["acceptance_rate"] == round(c["accepted"] / c["candidates"], 6) < 1.0
    )
    accepted = list(iter_rows(tmp_path / "out", RECORD_SCHEMA))
    rejected = list(iter_rows(tmp_path / "out" / "quarantine", QUARANTINE_SCHEMA))
    assert len(accepted) == c["accepted"] and len(rejected) == c["rejected"]
    for r in accepted:  # every kept answer is right, by the test's own ground truth
        meta = json.loads(r["meta"])
        question = r["messages"][0]["content"].split("\n")[-1]
        assert is_correct(by_id[meta["source_id"]], question, r["messages"][1]["content"]), r
    for r in rejected:  # and every rejected one is wrong
        meta = json.loads(r["meta"])
        question, answer = r["messages"][0]["content"].split("\n")[-1], r["messages"][1]["content"]
        assert not is_correct(by_id[meta["source_id"]], question, answer), r
        assert r["reason"].startswith("verifier: expected ") and f"got {answer!r}" in r["reason"]
        assert r["step"] == "qa_synthesis" and meta["verification"]["verified"] is False
    per_record = {}
    for r in accepted:
        per_record[json.loads(r["meta"])["source_id"]] = (
            per_record.get(json.loads(r["meta"])["source_id"], 0) + 1
        )
    assert max(per_record.values()) <= 4


def test_output_records_carry_media_or_passage_and_pass_the_contract(tmp_path, sources):
    src_dir, by_id = sources
    run(tmp_path, src_dir, noise_rate=0.0, n_per_record=4)
    rows = list(iter_rows(tmp_path / "out", RECORD_SCHEMA))
    for r in rows:
        meta = json.loads(r["meta"])
        src = by_id[meta["source_id"]]
        user = r["messages"][0]["content"]
        assert r["kind"] == "synthetic_qa" and [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert meta["verification"]["verified"] is True and meta["source_kind"] == src["kind"]
        if r["media_kind"] == "video":
            assert user.startswith("<video>\n") and r["images"] == src["images"]
        elif r["media_kind"] == "image":
            assert user.startswith("<image>\n" * len(src["images"])) and r["images"] == src["images"]
        else:  # a question about the passage shows the passage
            assert (
                r["images"] == []
                and "<image>" not in user
                and src["text"].replace("<image>", "").strip() in user
            )
    assert {r["media_kind"] for r in rows} == {"image", "video", "none"}
    from data_contracts.validate import validate_records

    res = validate_records(rows, "synthetic_qa")
    assert res.quarantined == {}


def test_same_inputs_same_hash_and_skip(tmp_path, sources):
    m1 = run(tmp_path, sources[0], "a", noise_rate=0.3, seed=7)
    m2 = run(tmp_path, sources[0], "b", noise_rate=0.3, seed=7)
    assert m1.content_hash == m2.content_hash
    assert run(tmp_path, sources[0], "a", noise_rate=0.3, seed=7).content_hash == m1.content_hash
    assert run(tmp_path, sources[0], "c", noise_rate=0.3, seed=8).content_hash != m1.content_hash


class AlwaysWrong:
    name = "always_wrong"

    def generate(self, record, n, rng, avoid=()):
        return [Candidate("How many objects are in the image?", "99") for _ in range(n)]


class Surplus:
    name = "surplus"

    def generate(self, record, n, rng, avoid=()):  # ignores n: three different right answers
        qs = [("How many objects are in the image?", "3"), ("How many circles are in the image?", "2"),
              ("How many squares are in the image?", "1")]  # fmt: skip
        return [Candidate(q, a) for q, a in qs]


class Repeats:
    name = "repeats"

    def generate(self, record, n, rng, avoid=()):  # ignores n and avoid: 3 copies of one right answer
        return [Candidate("How many objects are in the image?", "3")] * 3


def test_rejection_sampling_budget_duplicates_and_surplus(tmp_path, sources):
    one = tmp_path / "one"
    write_dataset(one, source_records()[:1])
    m = run_qa_synthesis([one], tmp_path / "w", QASynthConfig(n_per_record=2, max_attempts=3), AlwaysWrong())
    assert (m.counts["candidates"], m.counts["accepted"], m.counts["rejected"]) == (6, 0, 6)
    assert m.counts["records_with_qa"] == 0
    m = run_qa_synthesis([one], tmp_path / "r", QASynthConfig(n_per_record=1, max_attempts=2), Surplus())
    assert m.counts["accepted"] == 1 and m.counts["rejected"] == 2  # one attempt: 1 kept, 2 surplus
    assert m.counts["rejected_by_reason"] == {"surplus": 2}
    m = run_qa_synthesis([one], tmp_path / "d", QASynthConfig(n_per_record=5, max_attempts=2), Repeats())
    assert m.counts["accepted"] == 1 and m.counts["rejected_by_reason"] == {"duplicate": 5}


def test_verifier_matching_rules():
    scene, chart, _, _, _, prose = source_records()
    v = Verifier(rel_tol=0.01)
    ok = lambda rec, q, a: v.verify(rec, Candidate(q, a)).verified  # noqa: E731
    assert ok(scene, "How many circles are in the image?", "2") and ok(
        scene, "How many circles are in the image?", "two"
    )
    assert not ok(scene, "How many circles are in the image?", "3")
    assert ok(scene, "What color is the square in the image?", "The Blue.") and not ok(
        scene, "What color is the square in the image?", "red"
    )
    assert ok(chart, "What is the value of pear in the chart?", "30.2") and not ok(
        chart, "What is the value of pear in the chart?", "31"
    )
    assert ok(chart, "Is the value of apple greater than the value of pear?", "No, it is smaller.")
    assert not ok(chart, "Is the value of apple greater than the value of pear?", "yes")
    assert ok(
        prose,
        'Fill in the blank in this sentence from the passage: "Farmers bring their ____ there every autumn."',
        "grain",
    )
    assert not ok(
        prose,
        'Fill in the blank in this sentence from the passage: "Farmers bring their ____ there every autumn."',
        "wheat",
    )
    ambiguous = v.verify(prose, Candidate('In the passage, which word comes right after "the"?', "river"))
    assert not ambiguous.verified and "ambiguous" in ambiguous.reason
    assert ok(
        prose, "Where do farmers bring their grain?", "the old mill"
    )  # extractive: found in the passage
    assert not ok(prose, "Where do farmers bring their grain?", "the bakery")
    assert not Verifier(allow_extractive=False).verify(prose, Candidate("Where?", "the old mill")).verified


def test_metadata_generator_noise_is_flagged_and_wrong():
    rng = random.Random(0)
    scene = source_records()[0]
    cands = MetadataQAGenerator(noise_rate=1.0).generate(scene, 20, rng)
    assert cands and all(c.injected_error for c in cands)
    assert not any(is_correct(scene, c.question, c.answer) for c in cands)
    with pytest.raises(ValueError, match="noise_rate"):
        MetadataQAGenerator(noise_rate=1.5)


def test_config_validation():
    with pytest.raises(ValidationError, match="needs base_url and model"):
        QASynthConfig(generator="openai")
    with pytest.raises(ValidationError, match="unknown"):
        QASynthConfig(kinds=("caption", "poetry"))
    with pytest.raises(ValidationError):
        QASynthConfig(n_per_record=0)


# ---------------------------------------------------------------------------------------------------
# OpenAI-compatible backend against a local fake server


class FakeServer:
    """Chat-completions stand-in on 127.0.0.1: answers from a queue of (status, body), records requests."""

    def __init__(self):
        self.requests: list[dict[str, Any]] = []
        self.replies: list[tuple[int, Any]] = []
        self.default: tuple[int, Any] = (500, {"error": "no reply queued"})
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, payload = outer.replies.pop(0) if outer.replies else outer.default
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def completion(self, qa_pairs: list[dict[str, str]]) -> tuple[int, Any]:
        return 200, {"choices": [{"message": {"role": "assistant", "content": json.dumps({"qa": qa_pairs})}}]}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


SECRET = "sk-test-not-a-real-key-123"


def test_openai_backend_end_to_end(tmp_path, server, monkeypatch):
    monkeypatch.setenv("QA_TEST_KEY", SECRET)
    chart, prose = source_records()[1], source_records()[5]
    src = tmp_path / "src"
    write_dataset(src, [chart, prose])
    server.replies = [
        server.completion([
            {"question": "Which category has the highest value in the chart?", "answer": "pear", "rationale": "tallest"},
            {"question": "What is the value of apple in the chart?", "answer": "13"},
        ]),
        (200, {"choices": [{"message": {"content": "```json\n" + json.dumps({"qa": [
            {"question": "Where do farmers bring their grain?", "answer": "the old mill"},
            {"question": "Who keeps the ledger?", "answer": "the baker"}]}) + "\n```"}}]}),
    ]  # fmt: skip
    cfg = QASynthConfig(generator="openai", base_url=server.url, model="my-vlm", api_key_env="QA_TEST_KEY",
                        n_per_record=2, max_attempts=1, kinds=("chart_qa", "text"))  # fmt: skip
    m = run_qa_synthesis([src], tmp_path / "out", cfg)
    assert (m.counts["candidates"], m.counts["accepted"], m.counts["rejected"]) == (4, 2, 2)
    assert m.counts["rejected_by_reason"] == {"verifier_fact": 1, "verifier_none": 1}
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["headers"]["Authorization"] == f"Bearer {SECRET}"
    body = req["body"]
    assert body["model"] == "my-vlm" and body["response_format"] == {"type": "json_object"}
    image_parts = [p for p in body["messages"][1]["content"] if p["type"] == "image_url"]
    url = image_parts[0]["image_url"]["url"]
    assert (
        url.startswith("data:image/png;base64,")
        and base64.b64decode(url.split(",", 1)[1]) == chart["images"][0]["data"]
    )
    assert "Farmers bring their grain" in server.requests[1]["body"]["messages"][1]["content"][0]["text"]
    for f in (tmp_path / "out").rglob("*"):  # the key never reaches an output or the manifest
        assert not f.is_file() or SECRET.encode() not in f.read_bytes()
    assert m.extra["endpoint"] == {"base_url": server.url, "model": "my-vlm", "api_key_env": "QA_TEST_KEY"}


def test_openai_backend_retries_5xx_with_backoff_then_fails_clearly(server):
    delays: list[float] = []
    gen = OpenAICompatibleGenerator(server.url, "m", max_retries=3, backoff_s=0.5, sleep=delays.append)
    rec = source_records()[5]
    server.replies = [
        (500, {"error": "busy"}),
        (503, {"error": "busy"}),
        server.completion([{"question": "Q?", "answer": "A"}]),
    ]
    assert gen.generate(rec, 1, random.Random(0)) == [Candidate("Q?", "A")]
    assert len(server.requests) == 3 and delays == [0.5, 1.0]
    server.requests.clear()
    delays.clear()
    with pytest.raises(GeneratorError, match=r"gave up after 4 attempts; last error: HTTP 500"):
        gen.generate(rec, 1, random.Random(0))
    assert len(server.requests) == 4 and delays == [0.5, 1.0, 2.0]
    server.requests.clear()
    server.replies = [(400, {"error": "bad model"})]
    with pytest.raises(GeneratorError, match="HTTP 400"):
        gen.generate(rec, 1, random.Random(0))
    assert len(server.requests) == 1  # a client error is not retried


def test_openai_backend_failures_in_the_step(tmp_path, server, monkeypatch):
    src = tmp_path / "src"
    write_dataset(src, [source_records()[5]])
    base = {
        "generator": "openai",
        "base_url": server.url,
        "model": "m",
        "kinds": ("text",),
        "max_retries": 1,
        "backoff_s": 0.001,
    }
    with pytest.raises(GeneratorError, match="gave up after 2 attempts"):
        run_qa_synthesis([src], tmp_path / "out", QASynthConfig(**base))
    assert not (tmp_path / "out").exists()
    server.replies = [(200, {"choices": [{"message": {"content": "not json"}}]})] * 2
    m = run_qa_synthesis([src], tmp_path / "out", QASynthConfig(**base, max_attempts=2))
    assert m.counts["generation_failures"] == 2 and m.counts["candidates"] == 0
    monkeypatch.delenv("QA_MISSING_KEY", raising=False)
    with pytest.raises(GeneratorError, match="environment variable QA_MISSING_KEY"):
        run_qa_synthesis([src], tmp_path / "out2", QASynthConfig(**base, api_key_env="QA_MISSING_KEY"))
