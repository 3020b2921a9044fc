"""Data-pipeline throughput and packing efficiency, measured in one run.

    python -m bench.data_pipeline [--scale N] [--seq-len 512] [--threads N] [--quick]

Prints one JSON object (and writes ``bench/results/data_pipeline.json``): rows/s of synthesis, filter,
dedup, tokenize and pack on the synthetic corpus (default row counts x ``--scale``; ``--quick``: 1/4 of
the default counts (``scale`` 0 in the JSON) and sequences of 256), and ``packing_efficiency`` (real
tokens / row capacity of packed ``seq_len`` rows) with its ``ratio`` against pad-to-longest batching of
the same documents in the same order (the baseline most trainers use without packing). Timing lives
here, never in tests.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.common import bench_main
from tasks.data.dedup import DedupConfig, run_dedup
from tasks.data.filter import FilterConfig, run_filter
from tasks.data.io import count_rows
from tasks.data.pack import Document, MediaIds, pack_documents
from tasks.data.pipeline import DataRecipe, step_tokenizer, step_validate
from tasks.data.row_store import iter_rows as iter_tokenized
from tasks.data.schema import TOKENIZED_SCHEMA
from tasks.data.synth import SynthConfig, run_synth
from tasks.data.text_tokenizer import load_tokenizer
from tasks.data.tokenize import TokenizeConfig, run_tokenize

KINDS = ("caption", "interleaved", "ocr", "grounding", "text", "sft", "chart_qa")


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def pad_to_longest_efficiency(lengths: list[int], batch_docs: int) -> float:
    """Real tokens / (batch * longest) over consecutive batches of ``batch_docs`` documents."""
    real = cap = 0
    for i in range(0, len(lengths), batch_docs):
        chunk = lengths[i : i + batch_docs]
        real += sum(chunk)
        cap += len(chunk) * max(chunk)
    return real / cap


GOAL_EFFICIENCY = 0.95


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--scale", type=int, default=4, help="multiplier on the default synthetic row counts")
    ap.add_argument("--seq-len", type=int, default=512, help="packed row length (tokens)")


def run(quick: bool = False, scale: int = 4, seq_len: int = 512) -> dict:
    if scale < 1 or seq_len < 2:
        raise ValueError(f"--scale must be >= 1 and --seq-len >= 2, got {scale} and {seq_len}")
    base = SynthConfig()
    others = ("cot", "doc_qa", "video_qa", "video_haystack", "long_doc")
    counts = {k: getattr(base, k) * scale for k in KINDS}
    if quick:  # a quarter of the default corpus, short rows
        counts, scale, seq_len = {k: max(8, getattr(base, k) // 4) for k in KINDS}, 0, 256
    counts |= dict.fromkeys(others, 0)
    synth = SynthConfig(**counts)
    recipe = DataRecipe(synth=synth)
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, t = _timed(lambda: run_synth(root / "raw", synth))
        rows = {k: count_rows(root / "raw" / k) for k in KINDS}
        total_rows = sum(rows.values())
        res["synth_rows_per_s"] = round(total_rows / t, 1)
        _, t = _timed(
            lambda: [run_filter(root / "raw" / k, root / "filtered" / k, FilterConfig()) for k in KINDS]
        )
        res["filter_rows_per_s"] = round(total_rows / t, 1)
        frows = sum(count_rows(root / "filtered" / k) for k in KINDS)
        _, t = _timed(
            lambda: [run_dedup(root / "filtered" / k, root / "dedup" / k, DedupConfig()) for k in KINDS]
        )
        res["dedup_rows_per_s"] = round(frows / t, 1)
        step_validate(recipe, root / "dedup", root / "validated", log=lambda *_: None)
        step_tokenizer(recipe, root / "validated", root / "tokenizer", log=lambda *_: None)
        vrows = sum(count_rows(root / "validated" / k) for k in KINDS)
        _, t = _timed(
            lambda: [
                run_tokenize(
                    root / "validated" / k, root / "tokenizer", root / "tokenized" / k, TokenizeConfig()
                )
                for k in KINDS
            ]
        )
        res["tokenize_rows_per_s"] = round(vrows / t, 1)
        media = MediaIds.of(load_tokenizer(root / "tokenizer").special)
        docs = []
        for k in KINDS:
            for i, row in enumerate(iter_tokenized(root / "tokenized" / k, TOKENIZED_SCHEMA)):
                if len(row["input_ids"]) <= seq_len:
                    docs.append(Document.from_row(row, media, source=k, row_index=i))
        order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(0)).tolist()
        docs = [docs[i] for i in order]
        seqs, t = _timed(lambda: pack_documents(docs, seq_len))
        res["pack_docs_per_s"] = round(len(docs) / t, 1)
        real = sum(len(s.input_ids) for s in seqs)
        packing = real / (len(seqs) * seq_len)
        lengths = [len(d.input_ids) for d in docs]
        mean_len = sum(lengths) / len(lengths)
        batch_docs = max(1, round(seq_len / mean_len))  # same tokens per batch on average
        padded = pad_to_longest_efficiency(lengths, batch_docs)
    if not seqs or real != sum(lengths):
        raise AssertionError(f"packing lost tokens: {real} packed of {sum(lengths)} in {len(docs)} documents")
    ratio = packing / padded
    return {
        "what": "data pipeline throughput (rows/s per step) and packing efficiency vs pad-to-longest batches",
        "rows": total_rows,
        **res,
        "seq_len": seq_len,
        "scale": scale,
        "documents_packed": len(docs),
        "packing_efficiency": round(packing, 4),
        "ours": {
            "name": "pack_documents (buffered: oldest piece first, then first-fit-decreasing)",
            "efficiency": round(packing, 4),
        },
        "baseline": {"name": "pad_to_longest", "batch_docs": batch_docs, "efficiency": round(padded, 4)},
        "ratio": round(ratio, 3),
        "goal": f"packing_efficiency >= {GOAL_EFFICIENCY} and ratio > 1",
        "goal_met": bool(packing >= GOAL_EFFICIENCY and ratio > 1),
    }


def main(argv: list[str] | None = None) -> dict:
    return bench_main("data_pipeline", __doc__, run, argv, add_args)


if __name__ == "__main__":
    main()
