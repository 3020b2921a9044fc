"""``DistributedMuon.shard_gradients`` on 2 gloo ranks against one process on the whole batch: ranks whose
micro-batches touch different parameters (one rank never uses a branch, as a text-only micro-batch never
uses the vision tower) neither deadlock nor disagree, every gradient lives only on its owner after the
backward, and the updated weights equal the single-process Muon step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kimivl_model.muon import Muon, build_param_groups
from tasks.train.distributed_muon import DistributedMuon
from tests.gloo_ranks import run_ranks

LR = 0.02


class TwoBranch(nn.Module):
    """A trunk every micro-batch uses, and a ``vision`` branch only 'image' micro-batches use."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vision = nn.Linear(6, 8)
        self.trunk = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor, image: bool) -> torch.Tensor:
        h = self.vision(x) if image else x.new_zeros(x.shape[0], 8) + x[:, :1]
        return self.head(self.norm(torch.tanh(self.trunk(h))))


def _micro_batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    """Global batch of 4 micro-batches: 0 and 2 with images (rank 0's), 1 and 3 text-only (rank 1's)."""
    out = []
    for j in range(4):
        g = torch.Generator().manual_seed(100 * step + j)
        x = torch.randn(5, 6, generator=g)
        out.append((x, torch.randn(5, 2, generator=g), j % 2 == 0))
    return out


def _loss(model: nn.Module, mb) -> torch.Tensor:
    x, y, image = mb
    return nn.functional.mse_loss(model(x, image), y) / 4  # mean over the global batch's 4 micro-batches


def _sharded(rank: int, out_dir: Path) -> None:
    model = TwoBranch()
    opt = DistributedMuon(build_param_groups(model, lr=LR))
    opt.shard_gradients([p for p in reversed(list(model.parameters()))], bucket_bytes=256)
    held = []
    for step in range(3):
        for mb in _micro_batches(step)[rank::2]:
            (_loss(model, mb) * 2).backward()  # x world: the owners average over the ranks
            opt.finish_backward()
            held.append(sum(p.grad is not None for p in model.parameters()))
        owned = {n for n, p in model.named_parameters() if id(p) in opt._main}
        opt.step()
    torch.save(
        {
            "params": {n: p.detach() for n, p in model.named_parameters()},
            "held": held,
            "owned": sorted(owned),
        },
        out_dir / f"rank{rank}.pt",
    )


@pytest.mark.timeout(360)
def test_sharded_gradients_on_two_ranks_equal_one_process(tmp_path):
    run_ranks(_sharded, tmp_path)
    ref = TwoBranch()
    opt = Muon(build_param_groups(ref, lr=LR))
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        for mb in _micro_batches(step):
            _loss(ref, mb).backward()
        opt.step()
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r in res:
        assert r["held"] == [0] * len(r["held"])  # no gradient left in p.grad after any backward
        for name, want in ref.named_parameters():
            assert torch.allclose(r["params"][name], want.detach(), atol=1e-6, rtol=1e-5), name
    owned = [set(r["owned"]) for r in res]
    names = {n for n, _ in ref.named_parameters()}
    assert owned[0] | owned[1] == names and not owned[0] & owned[1]  # each main gradient on one rank


def test_shard_gradients_needs_every_param_once():
    model = TwoBranch()
    opt = DistributedMuon(build_param_groups(model, lr=LR))
    with pytest.raises(ValueError, match="every param of the optimizer once"):
        opt.shard_gradients(list(model.parameters())[1:])
