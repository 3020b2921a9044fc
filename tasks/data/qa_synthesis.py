"""QA synthesis with rejection sampling (Kimi-VL cooldown data: "a low ratio of synthetic QA, rejection-sampled").

For every source record of the chosen kinds, a generator proposes question-answer candidates and a
verifier checks each against ground truth the record itself guarantees (``qa_facts``: metadata of the
synthetic renderers, the record's passage). Rejection sampling: only verified candidates are kept, up to
``n_per_record`` per record, resampling for at most ``max_attempts`` generations.

- ``MetadataQAGenerator`` (default, deterministic): questions from ``meta`` (counts, colours, positions,
  chart max/min/values/comparisons, document fields, OCR lines, video motion) and, for prose records
  (``text`` set), from the passage (cloze, "which word comes right after X"). With probability ``noise_rate`` it answers WRONG (an off-by-one count,
  another colour, a corrupted string...): this simulates an imperfect model generator so the verifier has
  something to reject, and the manifest reports how many planted errors it caught.
- ``OpenAICompatibleGenerator`` (``qa_openai.py``, optional): the user's own chat-completions server.
- ``Verifier``: matches a question to its fact (same wording), to a cloze/follows pattern re-resolved in the
  passage, or (free-form questions, ``allow_extractive``) requires the answer to occur verbatim in the
  passage; answers compare after normalisation, numbers within a relative tolerance.

Outputs of ``run_qa_synthesis``: ``out_dir/part-*.parquet`` (kind ``synthetic_qa``, one user/assistant
pair each, with the source's images and ``<image>``/``<video>`` placeholders when the question is about
them, else with the passage), ``out_dir/quarantine/`` (every rejected candidate, reason
``"verifier: expected X, got Y"``), counts ``{input_records, candidates, accepted, rejected,
acceptance_rate, ...}`` with ``accepted + rejected == candidates``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from data_contracts.derive import parse_meta
from tasks.data.io import DEFAULT_ROWS_PER_SHARD, ShardWriter, iter_rows
from tasks.data.qa_facts import (
    Candidate,
    Fact,
    answers_match,
    meta_facts,
    normalize,
    record_passage,
    tokens,
)
from tasks.data.qa_openai import GeneratorError, GeneratorOutputError, OpenAICompatibleGenerator
from tasks.data.qa_passage import passage_fact_for, sample_passage_fact
from tasks.data.schema import IMAGE_TOKEN, KINDS, QUARANTINE_SCHEMA, RECORD_SCHEMA, VIDEO_TOKEN
from tasks.io.files import staged_dir
from tasks.io.manifest import Manifest, is_up_to_date, read_manifest, write_manifest

__all__ = [
    "Candidate",
    "GeneratorError",
    "MetadataQAGenerator",
    "OpenAICompatibleGenerator",
    "QAGenerator",
    "QASynthConfig",
    "Verification",
    "Verifier",
    "run_qa_synthesis",
]
STEP = "qa_synthesis"
DEFAULT_KINDS = ("caption", "grounding", "ocr", "chart_qa", "doc_qa", "video_qa", "text")


class QAGenerator(Protocol):
    name: str

    def generate(
        self, record: dict[str, Any], n: int, rng: random.Random, avoid: Collection[str] = ()
    ) -> list[Candidate]:
        """Up to ``n`` candidates for ``record``; ``avoid`` = normalised questions already accepted."""
        ...


class MetadataQAGenerator:
    name = "metadata"

    def __init__(
        self, noise_rate: float = 0.0, max_context_chars: int = 2000, passage_questions: bool = True
    ):
        if not 0.0 <= noise_rate <= 1.0:
            raise ValueError(f"noise_rate must be in [0, 1], got {noise_rate}")
        self.noise_rate = noise_rate
        self.max_context_chars = max_context_chars
        self.passage_questions = passage_questions

    def generate(
        self, record: dict[str, Any], n: int, rng: random.Random, avoid: Collection[str] = ()
    ) -> list[Candidate]:
        meta = parse_meta(record.get("meta")) or {}
        seen = set(avoid)
        pool: list[Fact] = []
        for f in meta_facts(meta, record.get("media_kind") or "none"):
            if normalize(f.question) not in seen:
                seen.add(normalize(f.question))
                pool.append(f)
        # passage questions only for prose records (a conversation's text is not a reading passage)
        use_passage = self.passage_questions and record.get("text") is not None
        passage = record_passage(record, self.max_context_chars) if use_passage else ""
        for _ in range(n if passage else 0):
            f = sample_passage_fact(passage, rng)
            if f is not None and normalize(f.question) not in seen:
                seen.add(normalize(f.question))
                pool.append(f)
        out = []
        for f in rng.sample(pool, min(n, len(pool))):
            if self.noise_rate > 0 and f.wrong and rng.random() < self.noise_rate:
                out.append(
                    Candidate(f.question, rng.choice(f.wrong), f"from {f.source}", injected_error=True)
                )
            else:
                out.append(Candidate(f.question, f.answer, f"from {f.source}"))
        return out


@dataclass(frozen=True)
class Verification:
    verified: bool
    method: str  # "fact" | "passage" | "extractive" | "none"
    expected: str | None
    got: str
    source: str | None  # the fact's source ("objects", "chart", "cloze", ...)
    uses_media: bool  # the question is about the images/video
    reason: str  # "" when verified

    def to_dict(self) -> dict[str, Any]:
        return {"verified": self.verified, "method": self.method, "expected": self.expected, "got": self.got}


class Verifier:
    """Checks candidates against the ground truth of their record (see module docstring)."""

    def __init__(
        self,
        max_context_chars: int = 2000,
        rel_tol: float = 0.01,
        abs_tol: float = 1e-6,
        allow_extractive: bool = True,
    ):
        self.max_context_chars = max_context_chars
        self.rel_tol = rel_tol
        self.abs_tol = abs_tol
        self.allow_extractive = allow_extractive

    def verify(self, record: dict[str, Any], cand: Candidate) -> Verification:
        got = cand.answer
        passage = record_passage(record, self.max_context_chars)
        facts = {
            normalize(f.question): f
            for f in meta_facts(parse_meta(record.get("meta")) or {}, record.get("media_kind") or "none")
        }
        fact = facts.get(normalize(cand.question))
        method = "fact"
        if fact is None:
            pf = passage_fact_for(cand.question, passage)
            if pf == "ambiguous":
                return Verification(
                    False,
                    "passage",
                    None,
                    got,
                    None,
                    False,
                    f"verifier: ambiguous in the passage: {cand.question!r}, got {got!r}",
                )
            fact, method = pf, "passage"
        if fact is not None:
            ok = answers_match(fact, got, self.rel_tol, self.abs_tol)
            reason = "" if ok else f"verifier: expected {fact.answer!r}, got {got!r}"
            return Verification(ok, method, fact.answer, got, fact.source, fact.uses_media, reason)
        ans = tokens(got)
        found = (
            bool(ans)
            and f" {ans} " in f" {tokens(passage)} "
            and f" {ans} " not in f" {tokens(cand.question)} "
        )
        if self.allow_extractive and found and len(ans.split()) <= 12:
            return Verification(True, "extractive", got, got, "passage", bool(record.get("images")), "")
        why = "not found in the passage" if self.allow_extractive else "no ground truth for this question"
        return Verification(
            False,
            "none",
            None,
            got,
            None,
            False,
            f"verifier: expected an answer from the record ({why}), got {got!r}",
        )


class QASynthConfig(BaseModel):
    """Generator, rejection-sampling budget and which source kinds to use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    generator: Literal["metadata", "openai"] = Field("metadata", description="candidate generator backend")
    base_url: str | None = Field(
        None, description="openai: base URL of the server, e.g. http://127.0.0.1:8000/v1"
    )
    model: str | None = Field(None, description="openai: model name sent in the request")
    api_key_env: str | None = Field(None, description="openai: NAME of the env variable holding the API key")
    timeout_s: float = Field(60.0, gt=0, description="openai: HTTP timeout per request (s)")
    max_retries: int = Field(3, ge=0, le=10, description="openai: retries on 429/5xx/connection errors")
    backoff_s: float = Field(1.0, ge=0, description="openai: first retry delay (doubles each retry)")
    temperature: float = Field(0.7, ge=0, le=2, description="openai: sampling temperature")
    n_per_record: int = Field(2, ge=1, le=64, description="verified QA pairs wanted per source record")
    max_attempts: int = Field(4, ge=1, le=100, description="generations per record before giving up")
    noise_rate: float = Field(0.1, ge=0, le=1, description="metadata: share of deliberately wrong answers")
    seed: int = Field(0, description="seed of the per-record sampling streams")
    kinds: tuple[str, ...] = Field(DEFAULT_KINDS, min_length=1, description="source record kinds to use")
    max_context_chars: int = Field(2000, ge=100, description="passage length used for and shown with QA")
    rel_tolerance: float = Field(0.01, ge=0, le=0.1, description="relative tolerance of numeric answers")
    allow_extractive: bool = Field(True, description="accept free-form answers found verbatim in the passage")
    rows_per_shard: int = Field(DEFAULT_ROWS_PER_SHARD, ge=1, description="rows per output Parquet shard")

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [k for k in v if k not in KINDS]
        if bad:
            raise ValueError(f"kinds: unknown {bad}, expected a subset of {KINDS}")
        return v

    @model_validator(mode="after")
    def _endpoint(self) -> QASynthConfig:
        if self.generator == "openai" and not (self.base_url and self.model):
            raise ValueError("generator 'openai' needs base_url and model")
        return self


def make_generator(cfg: QASynthConfig) -> QAGenerator:
    if cfg.generator == "metadata":
        return MetadataQAGenerator(cfg.noise_rate, cfg.max_context_chars)
    return OpenAICompatibleGenerator(
        cfg.base_url or "",
        cfg.model or "",
        cfg.api_key_env,
        timeout_s=cfg.timeout_s,
        max_retries=cfg.max_retries,
        backoff_s=cfg.backoff_s,
        temperature=cfg.temperature,
        max_context_chars=cfg.max_context_chars,
    )


def _record_rng(seed: int, record_id: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(f"{seed}:{record_id}".encode()).digest()[:8], "big"))


def qa_record(
    src: dict[str, Any],
    cand: Candidate,
    ver: Verification,
    qa_id: str,
    generator: str,
    attempt: int,
    passage: str,
) -> dict[str, Any]:
    """A ``synthetic_qa`` record for one candidate (media when the question is about it, else the passage)."""
    media = ver.uses_media and bool(src.get("images"))
    prefix = ""
    if media:
        prefix = (
            f"{VIDEO_TOKEN}\n" if src["media_kind"] == "video" else f"{IMAGE_TOKEN}\n" * len(src["images"])
        )
    context = f"{passage}\n\n" if (not ver.uses_media or ver.method == "extractive") and passage else ""
    meta = {
        "source_id": src["id"],
        "source_kind": src["kind"],
        "source": src["source"],
        "generator": generator,
        "attempt": attempt,
        "fact_source": ver.source,
        "rationale": cand.rationale,
        "injected_error": cand.injected_error,
        "verification": ver.to_dict(),
    }
    return {
        "id": qa_id,
        "kind": "synthetic_qa",
        "source": f"{STEP}/{generator}",
        "text": None,
        "messages": [
            {"role": "user", "content": prefix + context + cand.question},
            {"role": "assistant", "content": cand.answer},
        ],
        "images": list(src["images"]) if media else [],
        "media_kind": src["media_kind"] if media else "none",
        "meta": json.dumps(meta, sort_keys=True),
    }


def _endpoint_info(cfg: QASynthConfig, gen: QAGenerator) -> dict[str, Any]:
    """Which server/model made the candidates (lineage); the key's variable NAME only, never its value."""
    if not isinstance(gen, OpenAICompatibleGenerator):
        return {}
    return {"endpoint": {"base_url": cfg.base_url, "model": cfg.model, "api_key_env": cfg.api_key_env}}


def _reject(counts: dict[str, Any], key: str) -> None:
    counts["rejected_by_reason"][key] = counts["rejected_by_reason"].get(key, 0) + 1


def run_qa_synthesis(
    in_dirs: list[Path], out_dir: Path, cfg: QASynthConfig, generator: QAGenerator | None = None
) -> Manifest:
    """Rejection-sampled QA from ``in_dirs`` into ``out_dir``; ``generator`` overrides ``cfg.generator``
    (a custom generator is not part of the config hash, so the up-to-date skip is not used then)."""
    in_dirs, out_dir = [Path(d) for d in in_dirs], Path(out_dir)
    for d in in_dirs:
        if not d.is_dir():
            raise FileNotFoundError(
                f"qa_synthesis input dataset {d} does not exist (expected a dataset directory)"
            )
    parents = [read_manifest(d).parent_of(d) for d in in_dirs]
    if generator is None and is_up_to_date(out_dir, config=cfg, parents=parents):
        return read_manifest(out_dir)
    gen = generator or make_generator(cfg)
    verifier = Verifier(cfg.max_context_chars, cfg.rel_tolerance, allow_extractive=cfg.allow_extractive)
    counts: dict[str, Any] = {
        "input_records": 0,
        "used_records": 0,
        "records_with_qa": 0,
        "candidates": 0,
        "accepted": 0,
        "rejected": 0,
        "rejected_by_reason": {},
        "generation_failures": 0,
        "injected_errors": 0,
        "injected_errors_rejected": 0,
    }
    with staged_dir(out_dir) as stage:
        acc = ShardWriter(stage, RECORD_SCHEMA, cfg.rows_per_shard)
        quar = ShardWriter(stage / "quarantine", QUARANTINE_SCHEMA, cfg.rows_per_shard)
        for d in in_dirs:
            for src in iter_rows(d, RECORD_SCHEMA):
                counts["input_records"] += 1
                if src["kind"] not in cfg.kinds:
                    continue
                counts["used_records"] += 1
                _synthesize_one(src, gen, verifier, cfg, acc, quar, counts)
        n_acc, n_rej = acc.close(), quar.close()
        if (n_acc, n_rej) != (counts["accepted"], counts["rejected"]) or n_acc + n_rej != counts[
            "candidates"
        ]:
            raise AssertionError(f"qa_synthesis lost candidates: {n_acc} + {n_rej} != {counts['candidates']}")
        counts["acceptance_rate"] = round(n_acc / counts["candidates"], 6) if counts["candidates"] else 0.0
        # the convention of filtering steps: input = candidates, quarantined = rejected
        counts.update(input=counts["candidates"], quarantined=n_rej)
        counts["rejected_by_reason"] = dict(sorted(counts["rejected_by_reason"].items()))
        manifest = write_manifest(
            stage,
            kind="dataset",
            step=STEP,
            config=cfg,
            parents=parents,
            counts=counts,
            extra={
                "generator": gen.name,
                "acceptance_rate": counts["acceptance_rate"],
                **_endpoint_info(cfg, gen),
            },
        )
    return manifest


def _synthesize_one(
    src: dict[str, Any],
    gen: QAGenerator,
    verifier: Verifier,
    cfg: QASynthConfig,
    acc: ShardWriter,
    quar: ShardWriter,
    counts: dict[str, Any],
) -> None:
    rng = _record_rng(cfg.seed, src["id"])
    passage = record_passage(src, cfg.max_context_chars)
    accepted: set[str] = set()
    n_rej = 0
    for attempt in range(cfg.max_attempts):
        need = cfg.n_per_record - len(accepted)
        if need <= 0:
            break
        try:
            cands = gen.generate(src, need, rng, avoid=frozenset(accepted))
        except GeneratorOutputError:
            counts["generation_failures"] += 1
            continue
        if not cands:
            break  # the generator has nothing (more) to ask about this record
        for cand in cands:
            counts["candidates"] += 1
            counts["injected_errors"] += cand.injected_error
            ver = verifier.verify(src, cand)
            q = normalize(cand.question)
            if not ver.verified:
                reason, key = ver.reason, "verifier_" + ver.method
                counts["injected_errors_rejected"] += cand.injected_error
            elif q in accepted:
                reason, key = "duplicate: this question was already accepted for the record", "duplicate"
            elif len(accepted) >= cfg.n_per_record:
                reason, key = f"surplus: the record already has {cfg.n_per_record} accepted QA", "surplus"
            else:
                accepted.add(q)
                counts["accepted"] += 1
                acc.write(
                    qa_record(
                        src, cand, ver, f"{src['id']}#qa{len(accepted) - 1}", gen.name, attempt, passage
                    )
                )
                continue
            counts["rejected"] += 1
            _reject(counts, key)
            row = qa_record(src, cand, ver, f"{src['id']}#rej{n_rej}", gen.name, attempt, passage)
            quar.write({**row, "reason": reason, "step": STEP})
            n_rej += 1
    counts["records_with_qa"] += bool(accepted)
