"""Checkpoint save + load on 2 ranks: gathered (rank 0 writes the whole fp32 model, each rank its optimizer
shard) vs sharded (``train.checkpoint_format: sharded``: every rank writes its share through
``torch.distributed.checkpoint``, nothing gathered).

    python -m bench.checkpoint [--quick] [--repeats N]

Each format runs in its own 2-rank torchrun job (gloo, CPU, one thread per rank) so each process's peak RSS
belongs to one format: the ``small`` preset's LM (85M parameters; ``--quick``: ``tiny``) with Muon and its
state after one training step, then ``repeats`` rounds of save + load of the same engine (loading restores
weights, optimizer state and RNG). Times are the slowest rank's, medians over the rounds;
``peak_rss_growth_mb`` is the highest rank's peak RSS over its RSS just before the first save (VmHWM, reset
there), ``save_peak_rss_growth_mb`` the same after the first save only.

``ratio`` = gathered / sharded seconds (save + load): > 1 means the sharded format is faster.
``rss_ratio`` = gathered / sharded peak RSS growth.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import bench_main, rnd, torchrun_module

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    """This process's current RSS (MiB) from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux: ``clear_refs`` value 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_mb() -> float:
    """Peak RSS (MiB) since the last ``_reset_peak`` (VmHWM)."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _worker(fmt: str, preset_name: str, repeats: int, out: Path) -> None:
    import dataclasses

    import torch
    import torch.distributed as dist

    from kimivl_model.config import preset
    from kimivl_model.lm import KimiLM
    from tasks.train.checkpoint import checkpoint_path
    from tasks.train.engine import EngineConfig, LossResult, TrainEngine

    def loss_fn(model: KimiLM, mb: dict[str, torch.Tensor]) -> LossResult:
        out = model(mb["input_ids"], cu_seqlens=mb["cu_seqlens"], labels=mb["labels"], return_logits=False)
        n = int(out.num_loss_tokens)
        return LossResult(
            loss_sum=out.loss_sum, num_tokens=n, extra_loss=out.aux_loss, expert_load=out.expert_load
        )

    torch.set_num_threads(1)
    cfg = dataclasses.replace(preset(preset_name).lm, max_position_embeddings=512)
    torch.manual_seed(0)
    model = KimiLM(cfg, attn_backend="sdpa")
    ecfg = EngineConfig(optimizer="muon", precision="fp32", micro_batches_per_step=2, checkpoint_format=fmt)
    engine = TrainEngine(model, ecfg, loss_fn)
    g = torch.Generator().manual_seed(engine.rank)
    ids = torch.randint(4, cfg.vocab_size, (256,), generator=g)
    mb = {
        "input_ids": ids,
        "labels": torch.cat((ids[1:], torch.tensor([-100]))),
        "cu_seqlens": torch.tensor([0, 256]),
    }
    engine.train_step([mb])  # Muon momentum and AdamW moments exist from here on
    dist.barrier()
    before = _rss_mb()
    _reset_peak()  # the training step's transient peak (flattened reduce/broadcast buckets) is not ours
    saves, loads = [], []
    for r in range(repeats):
        target = checkpoint_path(out / fmt, r)
        dist.barrier()
        t0 = time.perf_counter()
        engine.save_checkpoint(target, {"round": r})
        dist.barrier()
        t1 = time.perf_counter()
        if r == 0:
            save_peak = _peak_mb()
        engine.load_checkpoint(target)
        dist.barrier()
        saves.append(t1 - t0)
        loads.append(time.perf_counter() - t1)
    peak = _peak_mb()
    size = sum(p.stat().st_size for p in (out / fmt).rglob("*") if p.is_file()) / repeats / 2**20
    result = {
        "save_s": saves,
        "load_s": loads,
        "rss_before_mb": before,
        "peak_rss_mb": peak,
        "save_peak_rss_mb": save_peak,
        "size_mb": size,
    }
    (out / f"{fmt}-rank{engine.rank}.json").write_text(json.dumps(result))
    dist.barrier()


def _launch(fmt: str, preset_name: str, repeats: int, out: Path) -> list[dict[str, Any]]:
    args = ["--worker", fmt, "--preset", preset_name, "--repeats", str(repeats), "--workdir", str(out)]
    torchrun_module("bench.checkpoint", 2, args)
    return [json.loads((out / f"{fmt}-rank{r}.json").read_text()) for r in range(2)]


def _summary(ranks: list[dict[str, Any]]) -> dict[str, float]:
    save = statistics.median(max(x) for x in zip(*(r["save_s"] for r in ranks), strict=True))
    load = statistics.median(max(x) for x in zip(*(r["load_s"] for r in ranks), strict=True))
    growth = max(r["peak_rss_mb"] - r["rss_before_mb"] for r in ranks)
    save_growth = max(r["save_peak_rss_mb"] - r["rss_before_mb"] for r in ranks)
    return {
        "save_s": rnd(save),
        "load_s": rnd(load),
        "seconds": rnd(save + load),
        "peak_rss_growth_mb": rnd(max(growth, 1.0)),
        "save_peak_rss_growth_mb": rnd(max(save_growth, 0.0)),
        "checkpoint_mb": rnd(ranks[0]["size_mb"]),
    }


def run(quick: bool, repeats: int = 3) -> dict[str, Any]:
    preset_name = "tiny" if quick else "small"
    repeats = 2 if quick else repeats
    work = Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))
    try:
        gathered = _summary(_launch("gathered", preset_name, repeats, work))
        sharded = _summary(_launch("sharded", preset_name, repeats, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = gathered["seconds"] / sharded["seconds"]
    rss_ratio = gathered["peak_rss_growth_mb"] / sharded["peak_rss_growth_mb"]
    return {
        "what": f"2 gloo ranks, {preset_name} LM + Muon state: save + load, gathered vs sharded (DCP)",
        "ours": sharded,
        "baseline": gathered,
        "ratio": rnd(ratio),
        "rss_ratio": rnd(rss_ratio),
        "goal": "ratio > 1 and sharded peak RSS below gathered",
        "goal_met": bool(ratio > 1 and rss_ratio > 1),
        "repeats": repeats,
        "preset": preset_name,
    }


def main(argv: list[str] | None = None) -> dict:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--worker")
    known, rest = pre.parse_known_args(argv)
    if known.worker:  # one rank of a 2-rank job (launched by _launch)
        ap = argparse.ArgumentParser()
        ap.add_argument("--preset", default="small")
        ap.add_argument("--repeats", type=int, default=3)
        ap.add_argument("--workdir", type=Path, required=True)
        args = ap.parse_args(rest)
        _worker(known.worker, args.preset, args.repeats, args.workdir)
        return {}

    def add(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--repeats", type=int, default=3, help="save + load rounds per format")

    return bench_main("checkpoint", __doc__, run, argv, add)


if __name__ == "__main__":
    main()
