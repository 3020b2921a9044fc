"""``kimivl_model/moe_ep.py`` on 2 gloo ranks (CPU) against the single-process ``RoutedExperts`` holding all
experts: each rank's outputs and input gradients, and every expert's weight gradient (summed over both
ranks' tokens), incl. a routing where one rank's experts get no token at all."""

from __future__ import annotations

import dataclasses
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kimivl_model.config import preset
from kimivl_model.moe import RoutedExperts

WORLD = 2
T, K = 24, 2


def _cfg():
    return dataclasses.replace(
        preset("tiny").lm,
        hidden_size=32,
        moe_intermediate_size=16,
        num_routed_experts=8,
        num_experts_per_tok=K,
    )


def _inputs(rank: int, all_to_first_half: bool):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(T, 32, generator=g)
    e = _cfg().num_routed_experts
    hi = e // 2 if all_to_first_half else e
    idx = torch.stack([torch.randperm(hi, generator=g)[:K] for _ in range(T)])  # distinct experts per token
    w = torch.rand(T, K, generator=g)
    gout = torch.randn(T, 32, generator=g)
    return x, idx, w, gout


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
        from kimivl_model.moe_ep import ExpertParallelExperts

        cfg = _cfg()
        torch.manual_seed(0)
        full = RoutedExperts(cfg, impl="loop")
        ep = ExpertParallelExperts(cfg, impl="loop")
        ep.load_from_full(full)
        report = {}
        for case in (False, True):
            ep.zero_grad(set_to_none=True)
            full.zero_grad(set_to_none=True)
            x, idx, w, gout = _inputs(rank, case)
            xi = x.clone().requires_grad_()
            out = ep(xi, idx, w)
            (out * gout).sum().backward()
            # reference: all experts in one process, both ranks' tokens (their gradients add up per expert)
            ref_dx = None
            for r in range(WORLD):
                xr, idxr, wr, goutr = _inputs(r, case)
                xr = xr.clone().requires_grad_()
                ref = full(xr, idxr, wr)
                (ref * goutr).sum().backward()
                if r == rank:
                    ref_out, ref_dx = ref.detach(), xr.grad
            sl = slice(ep.first, ep.first + ep.num_local)
            report[case] = {
                "out": float((out.detach() - ref_out).abs().max()),
                "dx": float((xi.grad - ref_dx).abs().max()),
                "dw": max(
                    float((getattr(ep, n).grad - getattr(full, n).grad[sl]).abs().max())
                    for n in ("gate_proj", "up_proj", "down_proj")
                ),
                "dw_norm": float(
                    sum(getattr(ep, n).grad.norm() for n in ("gate_proj", "up_proj", "down_proj"))
                ),
            }
        torch.save(report, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()
    except Exception:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


@pytest.mark.timeout(120)
def test_expert_parallel_layer_matches_all_experts_in_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    errors = [p.read_text() for p in tmp_path.glob("*.err")]
    assert not errors, errors
    for rank in range(WORLD):
        report = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for case, r in report.items():
            assert r["out"] < 1e-5 and r["dx"] < 1e-5 and r["dw"] < 1e-5, (rank, case, r)
            if case and rank == 1:  # every token routed to rank 0's experts: rank 1's experts get zero grads
                assert r["dw_norm"] == 0.0
            else:
                assert r["dw_norm"] > 0
