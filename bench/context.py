"""Context length under a fixed memory cap: sequence parallelism over 2 ranks vs 1 rank.

    python -m bench.context [--quick]

The LM of a preset (``--quick``: ``tiny``; default: ``small``) trains on packed sequences of 1,024-token
documents (Muon-free: the cap holds fp32 weights, gradients and one micro-batch's activations, which is what
sequence parallelism divides). Each configuration runs in its own torchrun job (gloo, CPU, one thread per
rank): ``sp1`` = 1 rank holding whole sequences, ``sp2`` = 2 ranks with ``sequence_parallel: 2``
(``kimivl_model/sequence_parallel.py``). A probe at length L is one forward + backward on top of accumulated
gradients (as in training) under ``torch.distributed._tools.mem_tracker.MemTracker``: the peak bytes of every
tensor the rank holds (weights, gradients, activations, the all-to-all buffers), the highest rank's; tensor
bytes, not RSS, so the allocator's caching does not blur it. The cap is the rank's weights + gradients plus
the activation plan (``tasks/train/activations.py``) of ``base`` tokens (quick 2,048; default 4,096);
the longest L (a multiple of 128) whose peak fits is found by doubling, then bisection.

``ratio`` = longest sp2 length / longest sp1 length (goal >= 1.8: the slice's activations are half; the
states are not split). ``tokens_per_s``: one training step at the sp1 longest length, median of 3, both
configurations (sp2 runs 2 processes on 2 cores, sp1 one on one: the figure is what the second rank buys,
communication included); ``throughput_ratio`` = sp2 / sp1 tokens/s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import bench_main, rnd, torchrun_module

ROOT = Path(__file__).resolve().parents[1]
DOC = 1024  # tokens per packed document
GRAIN = 128  # lengths are searched in multiples of this


def _rank_setup(preset_name: str) -> tuple[Any, Any, Any]:
    """One rank of a job (gloo, one thread): the preset's LM, its config, and ``step(n)``: one forward +
    backward of an n-token sequence of 1,024-token documents (this rank's slice of it under SP)."""
    import dataclasses

    import torch
    import torch.distributed as dist

    from kimivl_model.config import preset
    from kimivl_model.lm import KimiLM
    from kimivl_model.sequence_parallel import SequenceShard, shard_tokens

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = dataclasses.replace(preset(preset_name).lm, max_position_embeddings=1 << 20)
    torch.manual_seed(0)
    model = KimiLM(cfg, attn_backend="sdpa", expert_impl="loop").train()

    def batch(n: int) -> tuple[dict[str, Any], Any]:
        g = torch.Generator().manual_seed(n)
        ids = torch.randint(14, cfg.vocab_size, (n,), generator=g)
        cuts = [*range(0, n, DOC), n]
        labels = ids.roll(-1).clone()
        labels[torch.tensor(cuts[1:]) - 1] = -100  # no target across a document end
        b = {"input_ids": ids, "labels": labels, "cu_seqlens": torch.tensor(cuts)}
        if world == 1:
            return b, None
        b = shard_tokens(b, rank, world)
        return b, SequenceShard.from_batch(b, None)

    def step(n: int) -> None:
        b, shard = batch(n)
        o = model(
            b["input_ids"], cu_seqlens=b["cu_seqlens"], labels=b["labels"], return_logits=False, shard=shard
        )
        (o.loss_sum / max(n, 1) + o.aux_loss / world).backward()

    return model, cfg, step


def _worker(preset_name: str, base: int, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed._tools.mem_tracker import MemTracker

    from tasks.train.activations import FP32, micro_batch_activations

    model, cfg, step = _rank_setup(preset_name)
    rank, world = dist.get_rank(), dist.get_world_size()

    def peak(length: int) -> int:
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            step(length)
        mine = torch.tensor(max(dev["Total"] for dev in tracker.get_tracker_snapshot("peak").values()))
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        return int(mine)

    step(2 * GRAIN)  # gradients exist from here on: every probe accumulates on top of them
    states = 2 * FP32 * sum(p.numel() for p in model.parameters())
    plan = micro_batch_activations(
        cfg, None, None, tokens=base, patches=0, lm_trains=True, head_trains=True, vit_trains=False,
        projector_trains=False, checkpointing=False, act=FP32, device="cpu",
    )  # fmt: skip
    cap = states + plan.total
    probes: list[list[int]] = []

    def fits(length: int) -> bool:
        p = peak(length)
        probes.append([length, p])
        return p <= cap

    lo, hi = 0, GRAIN * world
    while fits(hi):  # doubling: the first length that does not fit
        lo, hi = hi, hi * 2
    while hi - lo > GRAIN:  # bisection on multiples of GRAIN
        mid = (lo + hi) // 2 // GRAIN * GRAIN
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    result = {"world": world, "cap": cap, "states": states, "longest": lo, "probes": probes}
    if rank == 0:
        (out / f"sp{world}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _timing_worker(preset_name: str, length: int, out: Path) -> None:
    import torch.distributed as dist

    _, _, step = _rank_setup(preset_name)
    rank, world = dist.get_rank(), dist.get_world_size()
    times = []
    for _ in range(4):  # the first is a warm-up
        dist.barrier()
        t0 = time.perf_counter()
        step(length)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        (out / f"time{world}.json").write_text(json.dumps({"seconds": statistics.median(times[1:])}))
    dist.barrier()
    dist.destroy_process_group()


def _launch(nproc: int, args: list[str]) -> None:
    torchrun_module("bench.context", nproc, args)


def run(quick: bool) -> dict[str, Any]:
    preset_name, base = ("tiny", 2048) if quick else ("small", 4096)
    work = Path(tempfile.mkdtemp(prefix="bench-context-"))
    try:
        found = {}
        for sp in (1, 2):
            _launch(
                sp,
                ["--worker", "memory", "--preset", preset_name, "--base", str(base), "--workdir", str(work)],
            )
            found[sp] = json.loads((work / f"sp{sp}.json").read_text())
        length = found[1]["longest"]
        speed = {}
        for sp in (1, 2):
            _launch(
                sp,
                [
                    "--worker",
                    "time",
                    "--preset",
                    preset_name,
                    "--length",
                    str(length),
                    "--workdir",
                    str(work),
                ],
            )
            speed[sp] = length / json.loads((work / f"time{sp}.json").read_text())["seconds"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = found[2]["longest"] / found[1]["longest"]
    return {
        "what": f"{preset_name} LM, 1,024-token documents: longest trainable sequence under one memory cap, "
        "sequence_parallel 2 (2 gloo ranks) vs 1 rank; tokens/s at the 1-rank longest length",
        "ours": {
            "longest_tokens": found[2]["longest"],
            "tokens_per_s": rnd(speed[2]),
            "probes": found[2]["probes"],
        },
        "baseline": {
            "longest_tokens": found[1]["longest"],
            "tokens_per_s": rnd(speed[1]),
            "probes": found[1]["probes"],
        },
        "cap_bytes": found[1]["cap"],
        "states_bytes": found[1]["states"],
        "ratio": rnd(ratio),
        "throughput_ratio": rnd(speed[2] / speed[1]),
        "goal": "ratio >= 1.8",
        "goal_met": bool(ratio >= 1.8),
        "preset": preset_name,
    }


def main(argv: list[str] | None = None) -> dict:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--worker", choices=["memory", "time"])
    known, rest = pre.parse_known_args(argv)
    if known.worker:  # one rank of a job launched by _launch
        ap = argparse.ArgumentParser()
        ap.add_argument("--preset", default="small")
        ap.add_argument("--base", type=int, default=4096)
        ap.add_argument("--length", type=int, default=4096)
        ap.add_argument("--workdir", type=Path, required=True)
        args = ap.parse_args(rest)
        if known.worker == "memory":
            _worker(args.preset, args.base, args.workdir)
        else:
            _timing_worker(args.preset, args.length, args.workdir)
        return {}
    return bench_main("context", __doc__, run, argv)


if __name__ == "__main__":
    main()
