"""``DistributedMuon.load_resharded``: the state 2 gloo ranks saved (momentum, AdamW moments, fp32 masters
of bf16-held matrices) lands on its new owner in a 1-rank optimizer, and bad shard sets are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kimivl_model.muon import build_param_groups
from tasks.train.distributed_muon import DistributedMuon
from tests.gloo_ranks import run_ranks


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def _opt(model: nn.Module) -> DistributedMuon:
    opt = DistributedMuon(build_param_groups(model, lr=0.02))
    opt.hold_in_low_precision([model[2].weight])  # one bf16-held matrix with an fp32 master
    return opt


def _train_and_save(rank: int, out_dir: Path) -> None:
    model = _model()
    opt = _opt(model)
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()
    torch.save(opt.state_dict(), out_dir / f"shard{rank}.pt")


@pytest.mark.timeout(360)
def test_two_rank_state_lands_on_one_rank(tmp_path):
    run_ranks(_train_and_save, tmp_path)
    shards = [torch.load(tmp_path / f"shard{r}.pt", weights_only=True) for r in range(2)]
    owned = [set(sd["state"]) for sd in shards]
    assert owned[0] and owned[1] and not owned[0] & owned[1]
    model = _model()
    opt = _opt(model)
    assert opt.world_size == 1
    opt.load_resharded(shards)
    state = opt.state_dict()["state"]
    assert set(state) == owned[0] | owned[1]
    for sd in shards:
        for pid, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    assert torch.equal(state[pid][k], v), (pid, k)
    master = opt.state[model[2].weight]["master"]
    assert master.dtype == torch.float32 and model[2].weight.dtype == torch.bfloat16

    with pytest.raises(ValueError, match="expected rank 1 of 2"):
        opt.load_resharded([shards[0], shards[0]])
    with pytest.raises(ValueError, match="expected rank 0 of 1"):
        opt.load_resharded([shards[1]])
