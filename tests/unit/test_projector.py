"""Projector: pixel-shuffle order against a hand-built reference, shapes, errors, per-image independence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimivl_model.config import preset
from kimivl_model.projector import Projector, num_image_tokens, pixel_shuffle


@pytest.fixture(scope="module")
def cfg():
    return preset("tiny").projector


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    model = Projector(cfg)
    with torch.no_grad():  # non-trivial norm affine so the test sees it
        model.pre_norm.weight.uniform_(0.5, 1.5)
        model.pre_norm.bias.uniform_(-0.5, 0.5)
    return model


def _hand_shuffle(feats: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Token (i, j) of the merged grid = concat of patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)."""
    rows = []
    for i in range(h // 2):
        for j in range(w // 2):
            group = [feats[(2 * i + kr) * w + (2 * j + kc)] for kr in range(2) for kc in range(2)]
            rows.append(torch.stack(group))
    return torch.stack(rows)  # (h/2*w/2, 4, d)


def test_pixel_shuffle_order_tiny_tensor():
    h, w = 4, 6
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    feats = torch.stack((r.reshape(-1), c.reshape(-1)), dim=-1).float()  # patch (r, c) carries [r, c]
    out = pixel_shuffle(feats, torch.tensor([[h, w]]))
    assert out.shape == (6, 4, 2)
    torch.testing.assert_close(out, _hand_shuffle(feats, h, w))
    # spelled out: merged token 4 = merged (row 1, col 1) holds patches (2,2), (2,3), (3,2), (3,3)
    assert out[4].tolist() == [[2.0, 2.0], [2.0, 3.0], [3.0, 2.0], [3.0, 3.0]]


def test_projector_matches_reference_and_shapes(cfg):
    model = _model(cfg)
    grids = [(4, 6), (2, 2), (6, 2)]
    n = sum(h * w for h, w in grids)
    feats = torch.randn(n, cfg.vit_hidden_size)
    out = model(feats, torch.tensor(grids))
    assert out.shape == (n // 4, cfg.lm_hidden_size)
    assert num_image_tokens(torch.tensor(grids)) == [6, 1, 3] == model.num_image_tokens(torch.tensor(grids))
    ref, start = [], 0
    for h, w in grids:
        f = feats[start : start + h * w]
        start += h * w
        f = F.layer_norm(
            f, (cfg.vit_hidden_size,), model.pre_norm.weight, model.pre_norm.bias, cfg.layer_norm_eps
        )
        x = _hand_shuffle(f, h, w).flatten(1)
        x = F.gelu(x @ model.linear_1.weight.T + model.linear_1.bias)  # exact GELU
        ref.append(x @ model.linear_2.weight.T + model.linear_2.bias)
    torch.testing.assert_close(out, torch.cat(ref), atol=1e-5, rtol=1e-5)


def test_per_image_independence(cfg):
    model = _model(cfg, seed=1)
    grids = [(2, 4), (4, 4)]
    feats = torch.randn(24, cfg.vit_hidden_size)
    packed = model(feats, torch.tensor(grids))
    a = model(feats[:8], torch.tensor([grids[0]]))
    b = model(feats[8:], torch.tensor([grids[1]]))
    torch.testing.assert_close(packed, torch.cat((a, b)), atol=1e-6, rtol=1e-6)
    feats2 = feats.clone()
    feats2[8:] += 1.0
    torch.testing.assert_close(model(feats2, torch.tensor(grids))[:2], packed[:2], atol=0, rtol=0)


@pytest.mark.parametrize("grid", [(3, 4), (4, 5), (1, 2)])
def test_odd_grid_raises(cfg, grid):
    model = _model(cfg)
    feats = torch.randn(grid[0] * grid[1], cfg.vit_hidden_size)
    with pytest.raises(ValueError, match="grid_hws"):
        model(feats, torch.tensor([grid]))
    with pytest.raises(ValueError, match="grid_hws"):
        num_image_tokens(torch.tensor([grid]))


def test_feature_count_mismatch_raises(cfg):
    model = _model(cfg)
    with pytest.raises(ValueError, match="features"):
        model(torch.randn(10, cfg.vit_hidden_size), torch.tensor([[2, 4]]))


def test_names_and_full_size_count():
    with torch.device("meta"):
        model = Projector(preset("a3b").projector)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == {
        "pre_norm.weight": (1152,),
        "pre_norm.bias": (1152,),
        "linear_1.weight": (4608, 4608),
        "linear_1.bias": (4608,),
        "linear_2.weight": (2048, 4608),
        "linear_2.bias": (2048,),
    }
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(30.7, abs=0.05)
