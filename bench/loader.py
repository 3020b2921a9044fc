"""Training input as a stream: peak memory against dataset size, and throughput with data workers.

    python -m bench.loader [--quick]

Corpus: the data pipeline's tokenized datasets (the tiny corpus of ``params.yaml``; ``--quick``: a smaller
one), and the same rows replicated 10x into new Lance datasets (fresh ids, same manifest facts scaled).

``rss_ratio`` (goal <= 1.2): peak RSS (sampled after every batch; the process's start-up peak, which
imports dominate, is reported as ``max_rss_mb``) of a fresh process that is one training rank of 2 —
it builds the ``PackedLoader`` over every source, plans 60 global batches and reads and decodes the
tokens and images of its half — on the 10x corpus over the 1x corpus. Baseline ``baseline_rss_ratio``: the
same process holding every source's table in memory first, as the loader did before it streamed
(``read_table`` per source on every rank).

``workers_ratio`` (goal >= 1.6 on a 2-core machine): micro-batches read and decoded per second, an
image-heavy mixture (every source with images), 2 DataLoader workers vs 0; the rank's threads as in
training (``tasks.train.threads``: with 0 workers the rank decodes with all cores' threads). Rounds
interleaved (0, 2, 2, 0, ...), each on a fresh loader after 2 warm-up batches (worker start-up excluded).

``images_decoded_per_rank``: each of 2 ranks' loaders, reading its own micro-batches, decodes its half.
"""

from __future__ import annotations

import gc
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import bench_main, rnd

RSS_GOAL, WORKERS_GOAL = 1.2, 1.6
IMAGE_SOURCES = ("caption", "ocr", "grounding", "chart_qa", "doc_qa", "interleaved", "video_qa")


def corpus(root: Path, quick: bool) -> Path:
    """The data pipeline's output under ``root`` (tiny corpus; quick: smaller); returns DATA/tokenized."""
    import yaml

    from tasks.data.pipeline import DataRecipe, run_data_all
    from tasks.data.synth import SynthConfig

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["data"]
    recipe = DataRecipe.model_validate(raw)
    if quick:
        small = SynthConfig(
            caption=32, grounding=16, ocr=16, chart_qa=8, doc_qa=8, interleaved=8, video_qa=6,
            video_haystack=1, long_doc=2, text=32, sft=16, cot=16, long_doc_words=400,
        )  # fmt: skip
        recipe = recipe.model_copy(update={"synth": small})
    run_data_all(recipe, root, log=lambda *_: None)
    return root / "tokenized"


def replicate(src: Path, dst: Path, times: int) -> None:
    """``src``'s rows ``times`` times (ids suffixed) as a new tokenized dataset at ``dst``."""
    from tasks.data.row_store import RowStore, RowWriter
    from tasks.data.schema import TOKENIZED_SCHEMA
    from tasks.io.manifest import read_manifest, write_manifest

    m = read_manifest(src)
    w = RowWriter(dst, TOKENIZED_SCHEMA)
    for k in range(times):
        for row in RowStore(src, TOKENIZED_SCHEMA).iter_rows():
            w.write({**row, "id": f"{row['id']}#{k}"})
    w.close()
    tokens = {key: v * times for key, v in m.counts["tokens"].items()}
    counts = {"accepted": m.counts["accepted"] * times, "tokens": tokens}
    write_manifest(
        dst, kind="tokenized", step="bench", config={"times": times}, counts=counts, extra=m.extra,
        content_hash=w.content_hash,
    )  # fmt: skip


def mixture(tokenized: Path, names: list[str], seq_len: int = 2048) -> Any:
    from tasks.data.loader import MixtureConfig, SourceSpec

    return MixtureConfig(
        sources=[SourceSpec(name=n, path=tokenized / n, weight=1.0) for n in names],
        seq_len=seq_len,
        micro_batch_tokens=seq_len,
        seed=0,
    )


def sources(tokenized: Path) -> list[str]:
    return sorted(p.name for p in tokenized.iterdir() if (p / "manifest.json").is_file())


def rss_child(tokenized: str, whole: bool, batches: int) -> dict[str, Any]:
    """In a fresh process: one rank of 2 drawing ``batches`` micro-batches and reading its half."""
    import psutil

    from tasks.data.loader import PackedLoader
    from tasks.data.row_store import read_rows

    me = psutil.Process()
    root = Path(tokenized)
    names = sources(root)
    held = [read_rows(root / n) for n in names] if whole else []  # the old loader: every table in memory
    loader = PackedLoader(mixture(root, names))
    peak = 0
    for i in range(batches):
        b = next(loader)
        if i % 2 == 0:
            b["input_ids"], b["pixel_values"]
        peak = max(peak, me.memory_info().rss)
    return {
        "peak_rss_mb": peak / 2**20,  # while training: sampled after every batch
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # incl. start-up spikes
        "held_mb": sum(t.nbytes for t in held) / 2**20,
        "images_decoded": loader.images_decoded,
    }


def measure_rss(tokenized: Path, whole: bool, batches: int) -> dict[str, Any]:
    code = (
        "import json, sys; from bench.loader import rss_child; "
        f"print(json.dumps(rss_child({str(tokenized)!r}, {whole!r}, {batches})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu(p: Any) -> float:
    """CPU seconds of a process; 0 once it is gone (a previous round's worker shutting down)."""
    import psutil

    try:
        t = p.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return t.user + t.system


def samples_per_s(tokenized: Path, workers: int, batches: int) -> dict[str, float]:
    """Micro-batches read and decoded per second by one rank reading every batch, and the CPU time per
    batch of the rank alone and of the rank with its workers."""
    import psutil

    from tasks.data.loader import PackedLoader
    from tasks.train.threads import rank_threads

    torch.set_num_threads(rank_threads(workers))
    loader = PackedLoader(mixture(tokenized, list(IMAGE_SOURCES)))
    if workers:
        loader.use_workers(workers, lambda b: True, prefetch=2)
    for _ in range(2):  # warm-up: workers started, first batches in flight
        b = next(loader)
        b["input_ids"], b["pixel_values"]
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    start, t0 = [_cpu(p) for p in procs], time.perf_counter()
    for _ in range(batches):
        b = next(loader)
        b["input_ids"], b["pixel_values"]
    wall = time.perf_counter() - t0
    deltas = [max(0.0, _cpu(p) - c) for p, c in zip(procs, start, strict=True)]
    cpu, main = sum(deltas), deltas[0]
    loader.use_workers(0, lambda b: True)  # workers stop: wait for them, or the next round pays for it
    gc.collect()
    psutil.wait_procs(procs[1:], timeout=15)
    return {
        "per_s": batches / wall,
        "cpu_ms_per_batch": 1000 * cpu / batches,
        "rank_cpu_ms_per_batch": 1000 * main / batches,
        "cores_busy": cpu / wall,
    }


def run(quick: bool) -> dict[str, Any]:
    from tasks.data.loader import PackedLoader

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        one = corpus(Path(tmp) / "data", quick)
        ten = Path(tmp) / "x10"
        for n in sources(one):
            replicate(one / n, ten / n, 10)
        rss = {
            (label, whole): measure_rss(root, whole, 60)
            for label, root in (("x1", one), ("x10", ten))
            for whole in (False, True)
        }
        # each of 2 ranks decodes the images of its own micro-batches only
        names = sources(one)
        per_rank = []
        for rank in range(2):
            ld = PackedLoader(mixture(one, names))
            for i in range(20):
                b = next(ld)
                if i % 2 == rank:
                    b["pixel_values"]
            per_rank.append(ld.images_decoded)
        ref = PackedLoader(mixture(one, names))
        total = sum(int(next(ref)["grid_hws"].shape[0]) for _ in range(20))
        rounds = 2 if quick else 4
        n = 40 if quick else 200
        speed: dict[int, list[dict[str, float]]] = {0: [], 2: []}
        for r in range(rounds):
            for w in (0, 2) if r % 2 == 0 else (2, 0):
                speed[w].append(samples_per_s(one, w, n))
        torch.set_num_threads(threads)
    rss_ratio = rss[("x10", False)]["peak_rss_mb"] / rss[("x1", False)]["peak_rss_mb"]
    base_ratio = rss[("x10", True)]["peak_rss_mb"] / rss[("x1", True)]["peak_rss_mb"]

    def med(w: int, key: str) -> float:
        return statistics.median(x[key] for x in speed[w])

    workers_ratio = med(2, "per_s") / med(0, "per_s")
    return {
        "what": "streaming loader: peak RSS of a rank on a 10x corpus vs 1x (ratio), and micro-batches/s "
        "with 2 data workers vs 0 (workers_ratio)",
        "ours": {
            "peak_rss_mb_x1": rnd(rss[("x1", False)]["peak_rss_mb"], 4),
            "peak_rss_mb_x10": rnd(rss[("x10", False)]["peak_rss_mb"], 4),
            "batches_per_s_2_workers": rnd(med(2, "per_s"), 3),
            "cpu_ms_per_batch_2_workers": rnd(med(2, "cpu_ms_per_batch"), 3),
            "rank_cpu_ms_per_batch_2_workers": rnd(med(2, "rank_cpu_ms_per_batch"), 3),
            "cores_busy_2_workers": rnd(med(2, "cores_busy"), 2),
        },
        "baseline": {
            "what": "every source's table held in memory (the loader before streaming); 0 workers",
            "peak_rss_mb_x1": rnd(rss[("x1", True)]["peak_rss_mb"], 4),
            "peak_rss_mb_x10": rnd(rss[("x10", True)]["peak_rss_mb"], 4),
            "held_mb_x10": rnd(rss[("x10", True)]["held_mb"], 3),
            "batches_per_s_0_workers": rnd(med(0, "per_s"), 3),
            "cpu_ms_per_batch_0_workers": rnd(med(0, "cpu_ms_per_batch"), 3),
            "cores_busy_0_workers": rnd(med(0, "cores_busy"), 2),
        },
        "ratio": rnd(rss_ratio),
        "rss_ratio": rnd(rss_ratio),
        "baseline_rss_ratio": rnd(base_ratio),
        "workers_ratio": rnd(workers_ratio),
        "batches_per_s": {str(k): [rnd(x["per_s"], 3) for x in v] for k, v in speed.items()},
        "images_decoded_per_rank": per_rank,
        "images_total": total,
        "goal": f"rss_ratio <= {RSS_GOAL} and workers_ratio >= {WORKERS_GOAL}",
        "goal_met": bool(rss_ratio <= RSS_GOAL and workers_ratio >= WORKERS_GOAL),
    }


def main(argv: list[str] | None = None) -> dict:
    return bench_main("loader", __doc__, run, argv)


if __name__ == "__main__":
    main()
