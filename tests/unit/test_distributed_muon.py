"""Tests for tasks/train/distributed_muon.py: 2 gloo ranks == 1 process on the global batch."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from kimivl_model.muon import Muon, build_param_groups
from tasks.train.distributed_muon import DistributedMuon, assign_owners
from tests.gloo_ranks import run_ranks

WORLD = 2
STEPS = 5
LR = 0.02
# Muon and (with a tiny eps) Adam are invariant to the grad scale; a large eps makes a wrong grad
# average (e.g. SUM without / world) visible in the AdamW params
GROUP_KW = {"adamw_eps": 1e-3}


class Net(nn.Module):
    """Linear + 3-D expert weight (Muon) with norm, biases (AdamW) and one param that never gets a grad."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 16)
        self.experts = nn.Parameter(0.2 * torch.randn(3, 8, 16))  # (E, out, in)
        self.norm = nn.LayerNorm(24)
        self.out = nn.Linear(24, 2)
        self.unused = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, 6)
        h = torch.tanh(self.fc1(x))  # (B, 16)
        e = torch.einsum("bi,eoi->beo", h, self.experts).flatten(1)  # (B, 24)
        return self.out(self.norm(e))  # (B, 2)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10 + step)
    x = torch.randn(16, 6, generator=gen)  # global batch
    return x, torch.stack([x[:, 0] * x[:, 1], torch.cos(x[:, 2])], dim=1)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)


def _worker(rank: int, out_dir: Path) -> None:
    for averaged in (False, True):
        model = Net()
        opt = DistributedMuon(build_param_groups(model, lr=LR, **GROUP_KW), grads_are_averaged=averaged)
        for step in range(STEPS):
            x, y = _batch(step)
            half = slice(rank * 8, (rank + 1) * 8)
            opt.zero_grad(set_to_none=True)
            _loss(model, x[half], y[half]).backward()
            if averaged:  # what DDP / DeepSpeed ZeRO 0 would have done
                for p in model.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad.div_(WORLD)
            opt.step()
        names = {id(p): n for n, p in model.named_parameters()}
        has_state = sorted(names[id(p)] for p, s in opt.state.items() if len(s) > 0)
        owner = {
            n: opt.owner_of(g, i)
            for g, grp in enumerate(opt.param_groups)
            for i, n in enumerate(grp["names"])
        }
        reloaded = DistributedMuon(build_param_groups(Net(), lr=LR, **GROUP_KW), grads_are_averaged=averaged)
        reloaded.load_state_dict(copy.deepcopy(opt.state_dict()))
        torch.save(
            {
                "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                "has_state": has_state,
                "owner": owner,
                "comm_bytes": opt.comm_bytes,
                "reloaded_state_keys": len(reloaded.state),
            },
            out_dir / f"rank{rank}_avg{int(averaged)}.pt",
        )


def _reference() -> dict[str, torch.Tensor]:
    model = Net()
    opt = Muon(build_param_groups(model, lr=LR, **GROUP_KW))
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        _loss(model, *_batch(step)).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.timeout(360)
def test_two_ranks_match_single_process(tmp_path):
    run_ranks(_worker, tmp_path, world=WORLD)
    ref = _reference()
    init = {n: p.detach() for n, p in Net().named_parameters()}
    active = [n for n in ref if not n.startswith("unused")]
    numel = {n: t.numel() for n, t in ref.items()}
    for averaged in (0, 1):
        res = [torch.load(tmp_path / f"rank{r}_avg{averaged}.pt", weights_only=True) for r in range(WORLD)]
        for name, want in ref.items():
            for r in range(WORLD):
                torch.testing.assert_close(res[r]["params"][name], want, atol=1e-6, rtol=0, msg=name)
            assert torch.equal(res[0]["params"][name], res[1]["params"][name]), name
        for name in ("unused.weight", "unused.bias"):  # never had a grad: untouched everywhere
            assert torch.equal(res[0]["params"][name], init[name])
        owner = res[0]["owner"]
        assert res[1]["owner"] == owner and set(owner) == set(ref) and set(owner.values()) == {0, 1}
        for r in range(WORLD):  # state only on the owner; every trained param has state on exactly one rank
            assert res[r]["has_state"] == sorted(n for n in active if owner[n] == r)
            assert res[r]["reloaded_state_keys"] == len(res[r]["has_state"])
        # comm: grad-presence flags, then (unless averaged) grad reduce, then param broadcast, fp32
        n_active = sum(numel[n] for n in active)
        expect = 4 * len(ref) + 4 * n_active * (1 if averaged else 2)
        assert [x["comm_bytes"] for x in res] == [expect, expect]


def test_assign_owners_greedy_and_deterministic():
    assert assign_owners([[10, 3], [7, 7]], 2) == [[0, 0], [1, 1]]
    assert assign_owners([[5, 5, 5]], 3) == [[0, 1, 2]]  # ties: lower (group, index) first, lowest rank
    assert assign_owners([[4, 1]], 1) == [[0, 0]]
    with pytest.raises(ValueError, match="world_size"):
        assign_owners([[1]], 0)
    # expert-parallel shards go to the ranks holding the same experts, after the replicated params
    owners = assign_owners([[10, 8, 8], [6, 1]], 4, expert={(0, 1), (0, 2)}, expert_ranks=[1, 3])
    assert owners == [[0, 3, 1], [1, 2]]
    assert assign_owners([[10, 3], [7, 7]], 2, expert=set()) == [[0, 0], [1, 1]]  # no experts: unchanged


def test_expert_params_need_sharded_gradients_and_the_world_group():
    model = nn.Linear(4, 4, bias=False)
    opt = DistributedMuon(build_param_groups(model, lr=0.1))
    opt.set_expert_params([model.weight], None, [0], ep_size=1, ep_rank=0)
    assert opt.state_dict()["experts"] == [[0, 0]]
    model.weight.grad = torch.ones_like(model.weight)
    with pytest.raises(RuntimeError, match="need shard_gradients"):
        opt.step()
    with pytest.raises(RuntimeError, match="call once"):
        opt.set_expert_params([model.weight], None, [0], ep_size=1, ep_rank=0)
    with pytest.raises(ValueError, match="data-parallel ranks"):
        DistributedMuon(build_param_groups(model, lr=0.1)).set_expert_params([model.weight], None, [1], 1, 0)


def test_single_rank_without_process_group_equals_muon():
    # no process group, or the single-rank one an in-process engine of an earlier test left up
    assert not dist.is_initialized() or dist.get_world_size() == 1
    a, b = Net(), Net()
    opt_a = Muon(build_param_groups(a, lr=LR))
    opt_b = DistributedMuon(build_param_groups(b, lr=LR))
    assert opt_b.world_size == 1 and opt_b.rank == 0
    for step in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad(set_to_none=True)
            _loss(model, *_batch(step)).backward()
            opt.step()
    assert opt_b.comm_bytes == 0
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_state_dict_validation_and_resume():
    def train(model, opt, steps):
        for step in steps:
            opt.zero_grad(set_to_none=True)
            _loss(model, *_batch(step)).backward()
            opt.step()

    full = Net()
    train(full, DistributedMuon(build_param_groups(full, lr=LR)), range(6))
    part = Net()
    opt = DistributedMuon(build_param_groups(part, lr=LR))
    train(part, opt, range(3))
    sd = opt.state_dict()
    assert sd["world_size"] == 1 and sd["rank"] == 0 and sd["ownership"] == opt.owners
    resumed = Net()
    resumed.load_state_dict(part.state_dict())
    opt2 = DistributedMuon(build_param_groups(resumed, lr=LR))
    opt2.load_state_dict(copy.deepcopy(sd))
    train(resumed, opt2, range(3, 6))
    for pa, pb in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(pa, pb)
    with pytest.raises(ValueError, match="world_size"):
        opt2.load_state_dict({**sd, "world_size": 2})
    with pytest.raises(ValueError, match="ownership"):
        opt2.load_state_dict({**sd, "ownership": [[1] * len(o) for o in sd["ownership"]]})
    with pytest.raises(ValueError, match="missing"):
        opt2.load_state_dict(Muon(build_param_groups(Net(), lr=LR)).state_dict())
