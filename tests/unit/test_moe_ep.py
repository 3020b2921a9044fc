"""``kimivl_model/moe_ep.py`` on 2 gloo ranks (CPU) against the single-process ``RoutedExperts`` holding all
experts: each rank's outputs and input gradients, and every expert's weight gradient (summed over both
ranks' tokens), incl. a routing where one rank's experts get no token at all."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from kimivl_model.config import preset
from kimivl_model.moe import RoutedExperts
from tests.gloo_ranks import run_ranks

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


def _spawn(body, tmp_path: Path) -> None:
    run_ranks(body, tmp_path, world=WORLD)


def _layer_body(rank: int, out_dir: Path) -> None:
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
            "dw_norm": float(sum(getattr(ep, n).grad.norm() for n in ("gate_proj", "up_proj", "down_proj"))),
        }
    torch.save(report, out_dir / f"rank{rank}.pt")


@pytest.mark.timeout(360)
def test_expert_parallel_layer_matches_all_experts_in_one_process(tmp_path):
    _spawn(_layer_body, tmp_path)
    for rank in range(WORLD):
        report = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for case, r in report.items():
            assert r["out"] < 1e-5 and r["dx"] < 1e-5 and r["dw"] < 1e-5, (rank, case, r)
            if case and rank == 1:  # every token routed to rank 0's experts: rank 1's experts get zero grads
                assert r["dw_norm"] == 0.0
            else:
                assert r["dw_norm"] > 0


def _lm_body(rank: int, out_dir: Path) -> None:
    import copy

    from kimivl_model.lm import KimiLM
    from kimivl_model.moe_ep import ExpertParallelExperts, shard_experts

    cfg = dataclasses.replace(
        preset("tiny").lm, vocab_size=300, num_layers=2, first_k_dense=1, num_routed_experts=8
    )
    torch.manual_seed(0)
    full = KimiLM(cfg, expert_impl="loop").train()
    sharded = copy.deepcopy(full)
    assert shard_experts(sharded) == 1
    experts = [m for m in sharded.modules() if isinstance(m, ExpertParallelExperts)]

    def batch(r: int):
        g = torch.Generator().manual_seed(7 + r)
        lens = [40, 24] if r == 0 else [64]
        ids = torch.randint(4, cfg.vocab_size, (sum(lens),), generator=g)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
        labels = torch.cat([torch.cat((d[1:], torch.tensor([-100]))) for d in ids.split(lens)])
        return ids, cu, labels

    def step(model, r):
        ids, cu, labels = batch(r)
        out = model(ids, cu_seqlens=cu, labels=labels, return_logits=False)
        (out.loss + out.aux_loss).backward()
        return float(out.loss)

    loss = step(sharded, rank)
    ref_grads, ref_loss = {}, None
    for r in range(WORLD):  # the unsharded model on both ranks' batches: expert grads add up
        full.zero_grad(set_to_none=True)
        lr = step(full, r)
        for n, p in full.named_parameters():
            if p.grad is None:
                continue
            if ".experts." in n:
                ref_grads[n] = ref_grads.get(n, 0) + p.grad
            elif r == rank:
                ref_grads[n] = p.grad.clone()
        if r == rank:
            ref_loss = lr
    sl = slice(experts[0].first, experts[0].first + experts[0].num_local)
    worst = 0.0
    for n, p in sharded.named_parameters():
        ref = ref_grads[n][sl] if ".experts." in n else ref_grads[n]
        worst = max(worst, float((p.grad - ref).abs().max()))
    shard_numel = sum(p.numel() for p in experts[0].parameters())
    torch.save(
        {"loss": (loss, ref_loss), "worst_grad": worst, "shard_numel": shard_numel},
        out_dir / f"lm{rank}.pt",
    )


@pytest.mark.timeout(360)
def test_sharded_kimilm_matches_the_unsharded_model(tmp_path):
    """``shard_experts(KimiLM)`` on 2 ranks: each rank's loss, the gradients of everything replicated, and
    its experts' gradients (over both ranks' tokens) equal the unsharded model's; half the experts each."""
    _spawn(_lm_body, tmp_path)
    full_numel = 3 * 8 * preset("tiny").lm.hidden_size * preset("tiny").lm.moe_intermediate_size
    for rank in range(WORLD):
        r = torch.load(tmp_path / f"lm{rank}.pt", weights_only=True)
        assert abs(r["loss"][0] - r["loss"][1]) < 1e-5, r
        assert r["worst_grad"] < 1e-5, r
        assert 2 * r["shard_numel"] == full_numel
