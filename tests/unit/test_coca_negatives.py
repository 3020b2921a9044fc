"""SigLIP negatives over all data-parallel ranks (``coca_negatives: all_ranks``): on 2 gloo ranks holding
half a batch each, the ranks' mean loss and the averaged gradients equal one process on the whole batch;
without gathering they do not (each rank only sees its own half's negatives)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from kimivl_model.coca import CoCaHead
from kimivl_model.config import preset
from tests.gloo_ranks import run_ranks

N = 4  # captions per rank


def _head() -> CoCaHead:
    torch.manual_seed(0)
    return CoCaHead(preset("tiny").coca, preset("tiny").vit.hidden_size, attn_backend="sdpa")


def _batch(lo: int, hi: int):
    g = torch.Generator().manual_seed(5)
    grids = torch.tensor([[4, 4]] * (2 * N))
    feats = torch.randn(16 * 2 * N, preset("tiny").vit.hidden_size, generator=g)
    lens = [3, 5, 4, 6, 3, 4, 5, 6][: 2 * N]
    ids = torch.randint(4, preset("tiny").coca.vocab_size, (sum(lens),), generator=g)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    # images lo..hi-1 and their captions
    f = feats[16 * lo : 16 * hi]
    c = ids[cu[lo] : cu[hi]]
    return f, grids[lo:hi], c, cu[lo : hi + 1] - cu[lo]


def _siglip_grads(head: CoCaHead, batch) -> tuple[float, dict[str, torch.Tensor]]:
    feats, grids, ids, cu = batch
    x = head.encode_image(feats, grids)
    y = head.encode_text(ids, cu)
    loss = head.siglip(x, y)
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}


def _rank(rank: int, out_dir: Path) -> None:
    for gather in (True, False):
        head = _head()
        head.siglip.gather_negatives = gather
        loss, grads = _siglip_grads(head, _batch(rank * N, (rank + 1) * N))
        t = torch.tensor([loss])
        dist.all_reduce(t)
        for g in grads.values():
            dist.all_reduce(g)
            g.div_(2)
        torch.save({"loss": float(t) / 2, "grads": grads}, out_dir / f"rank{rank}_{int(gather)}.pt")


@pytest.mark.timeout(360)
def test_negatives_from_all_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    run_ranks(_rank, tmp_path)
    ref_loss, ref_grads = _siglip_grads(_head(), _batch(0, 2 * N))
    for gather in (True, False):
        got = [torch.load(tmp_path / f"rank{r}_{int(gather)}.pt", weights_only=True) for r in range(2)]
        same = abs(got[0]["loss"] - ref_loss) < 1e-6 * abs(ref_loss) and all(
            torch.allclose(got[0]["grads"][n], g, rtol=1e-4, atol=1e-7) for n, g in ref_grads.items()
        )
        assert same == gather, (gather, got[0]["loss"], ref_loss)
        assert got[0]["loss"] == got[1]["loss"]


def test_the_phase_field_reaches_the_model(tmp_path):
    import yaml

    from tasks.recipe import recipe_from_dict
    from tasks.train.phase_model import build_model

    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    vit = next(p for p in raw["phases"] if p.get("objective") == "coca")
    vit.update(init_from="scratch", coca_negatives="all_ranks")
    recipe = recipe_from_dict(raw, "params.yaml")
    model, _, _ = build_model(recipe, recipe.phase(vit["name"]), tmp_path)
    assert model.coca.siglip.gather_negatives is True
    assert recipe.phase("text_pretrain").coca_negatives == "micro_batch"
    lm = next(p for p in raw["phases"] if p["name"] == "text_pretrain")
    lm["coca_negatives"] = "all_ranks"
    with pytest.raises(ValueError, match="coca_negatives is for objective 'coca'"):
        recipe_from_dict(raw, "params.yaml")
