"""Muon optimizer step vs AdamW step, and distributed Muon's communication vs ZeRO-1 AdamW.

    python -m bench.muon [--quick] [--threads N]

(1) Time of one optimizer step on the ``small`` preset LM's parameters (fixed random gradients): our
    ``Muon`` (Moonlight variant: Newton-Schulz on every matrix, AdamW on embeddings/head/norms, as
    ``build_param_groups`` splits them) vs ``torch.optim.AdamW`` on every parameter. Goal: ratio <= 1.3.
    Also the analytic Newton-Schulz FLOPs per step and the tokens per step at which Muon's extra time
    would be <= 30% of a training step (from the measured fp32 GEMM rate and 6 * N_activated FLOPs/token).
(2) Bytes communicated per optimizer step and rank, world sizes 2..64, counted analytically from
    ``tasks/train/distributed_muon.py``'s scheme (greedy whole-tensor ownership ``assign_owners``; one
    flags all-reduce; one reduce + one broadcast per (owner, dtype) bucket) vs ZeRO-1 AdamW (reduce-scatter
    grads + all-gather params). Two counts: payload (the sum of tensor sizes handed to collectives, what
    ``DistributedMuon.comm_bytes`` reports) and wire bytes sent per rank under bandwidth-optimal ring
    algorithms. REFERENCE.md: Moonlight's distributed Muon costs 1-1.25x ZeRO-1 AdamW. In full mode the
    analytic payload is cross-checked against ``DistributedMuon.comm_bytes`` in a real 2-process gloo run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket

import torch

from bench.common import bench_main, median, rnd, time_interleaved
from kimivl_model.config import preset
from kimivl_model.lm import KimiLM, lm_param_counts
from kimivl_model.muon import Muon, build_param_groups, matrix_shape
from tasks.train.distributed_muon import assign_owners

GOAL_STEP = 1.3
GOAL_COMM = "1.0-1.25 (REFERENCE.md)"
WORLD_SIZES = (2, 4, 8, 16, 32, 64)


def ns_flops(shape: tuple[int, ...], steps: int = 5) -> int:
    """FLOPs of ``steps`` quintic Newton-Schulz iterations on one parameter (per stacked matrix for 3-D)."""
    rows, cols = matrix_shape(shape)
    m, n = min(rows, cols), max(rows, cols)
    stack = shape[0] if len(shape) == 3 else 1
    return stack * steps * (4 * m * m * n + 2 * m**3)  # A = X X^T, A @ A, B @ X


def comm_model(numels: list[list[int]], world: int, bytes_per: int = 4) -> dict:
    """Per-rank bytes of one step: DistributedMuon (whole-tensor ownership) vs ZeRO-1 AdamW."""
    total = sum(sum(g) for g in numels)
    n_tensors = sum(len(g) for g in numels)
    owners = assign_owners(numels, world)
    load = [0] * world
    for g, grp in enumerate(numels):
        for i, n in enumerate(grp):
            load[owners[g][i]] += n
    buckets = len({o for grp in owners for o in grp})  # one (owner, fp32) bucket per owning rank
    frac = (world - 1) / world
    flags = 4 * n_tensors  # int32 all-reduce of "has a grad" flags
    muon_payload = flags + 2 * total * bytes_per  # every rank hands its full grads (reduce) + params (bcast)
    zero1_payload = 2 * total * bytes_per  # reduce-scatter input + all-gather output
    muon_wire = 2 * frac * flags + 2 * frac * total * bytes_per  # ring reduce/broadcast: (W-1)/W * b each
    zero1_wire = 2 * frac * total * bytes_per
    return {
        "world_size": world,
        "muon_payload_bytes": muon_payload,
        "zero1_payload_bytes": zero1_payload,
        "payload_ratio": rnd(muon_payload / zero1_payload, 6),
        "muon_wire_bytes": round(muon_wire),
        "zero1_wire_bytes": round(zero1_wire),
        "wire_ratio": rnd(muon_wire / zero1_wire, 6),
        "muon_collectives": 1 + 2 * buckets,
        "zero1_collectives": 2,
        "state_imbalance_max_over_mean": rnd(max(load) / (total / world)),
    }


def _rank_main(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    from tasks.train.distributed_muon import DistributedMuon

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = KimiLM(preset("tiny").lm)
    opt = DistributedMuon(build_param_groups(model, lr=1e-3))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    queue.put((rank, opt.comm_bytes))
    dist.destroy_process_group()


def measured_comm_bytes(world: int = 2) -> list[int]:
    """``DistributedMuon.comm_bytes`` of each rank after one step of the tiny LM (gloo, ``world`` procs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, q)) for r in range(world)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return [got[r] for r in range(world)]


def _group_numels(model: torch.nn.Module) -> list[list[int]]:
    return [[p.numel() for p in g["params"]] for g in build_param_groups(model, lr=1e-3)]


def run(quick: bool = False, repeats: int = 5) -> dict:
    name = "tiny" if quick else "small"
    lm = preset(name).lm
    if quick:
        repeats = 1
    torch.manual_seed(0)
    model_m, model_a = KimiLM(lm), KimiLM(lm)
    model_a.load_state_dict(model_m.state_dict())
    g = torch.Generator().manual_seed(1)
    for pm, pa in zip(model_m.parameters(), model_a.parameters(), strict=True):
        pm.grad = torch.randn(pm.shape, generator=g) * 1e-3
        pa.grad = pm.grad.clone()
    groups = build_param_groups(model_m, lr=1e-3)
    muon = Muon(groups)
    adamw = torch.optim.AdamW(model_a.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    s = time_interleaved({"muon": muon.step, "adamw": adamw.step}, repeats=repeats, warmup=1)
    t_muon, t_adamw = median(s["muon"]), median(s["adamw"])
    ratio = t_muon / t_adamw

    muon_params = [p for grp in groups if grp["use_muon"] for p in grp["params"]]
    flops_ns = sum(ns_flops(tuple(p.shape)) for p in muon_params)
    counts = lm_param_counts(lm)
    flops_tok = 6 * (counts["activated_no_embed"] + lm.vocab_size * lm.hidden_size)
    ns_rate = flops_ns / max(t_muon - t_adamw, 1e-9)  # achieved FLOP/s of the Newton-Schulz work
    # tokens/step so that (t_muon - t_adamw) <= 0.3 * (fwd+bwd time + t_adamw), fwd+bwd at the NS rate
    break_even = max(0.0, ((t_muon - t_adamw) / 0.3 - t_adamw) * ns_rate / flops_tok)

    numels = _group_numels(model_m)
    comm = [comm_model(numels, w) for w in WORLD_SIZES]
    check = None
    if not quick:
        measured = measured_comm_bytes(2)
        analytic = comm_model(_group_numels(KimiLM(preset("tiny").lm)), 2)["muon_payload_bytes"]
        check = {"world_size": 2, "model": "tiny", "analytic": analytic, "measured_per_rank": measured}
        check["agree"] = all(m == analytic for m in measured)
    comm_ratio = max(c["wire_ratio"] for c in comm)
    return {
        "what": "optimizer step time: Muon (Moonlight) vs torch AdamW on the LM's parameters; distributed "
        "Muon bytes/step vs ZeRO-1 AdamW (analytic, world 2..64)",
        "preset": name,
        "params": {
            "total": sum(p.numel() for p in model_m.parameters()),
            "muon": sum(p.numel() for p in muon_params),
            "muon_tensors": len(muon_params),
        },
        "repeats": repeats,
        "cpu_share": s.cpu_share,
        "ours": {"name": "Muon", "step_ms": rnd(1e3 * t_muon)},
        "baseline": {"name": "torch.optim.AdamW (foreach default)", "step_ms": rnd(1e3 * t_adamw)},
        "ratio": rnd(ratio),
        "ratio_is": "Muon step time / AdamW step time",
        "goal": f"<= {GOAL_STEP}",
        "goal_met": bool(ratio <= GOAL_STEP),
        "newton_schulz": {
            "gflop_per_step": rnd(flops_ns / 1e9),
            "achieved_gflop_per_s": rnd(ns_rate / 1e9),
            "train_gflop_per_token": rnd(flops_tok / 1e9),
            "tokens_per_step_for_30pct_overhead": round(break_even),
        },
        "comm": {
            "goal": GOAL_COMM,
            "max_wire_ratio": comm_ratio,
            "goal_met": bool(comm_ratio <= 1.25),
            "per_world_size": comm,
            "measured_check": check,
        },
        "samples_ms": {k: [rnd(1e3 * t) for t in v] for k, v in s.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    return bench_main("muon", __doc__, run, argv)


if __name__ == "__main__":
    main()
