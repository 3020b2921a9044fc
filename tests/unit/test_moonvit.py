"""MoonViT (packing, position table, checkpointing, names) and the image preprocessing functions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kimivl_model.config import preset
from kimivl_model.image_processing import image_to_patches, pack_images, resized_hw, smart_resize_hw
from kimivl_model.moonvit import MoonViT, PositionEmbedding2D


@pytest.fixture(scope="module")
def cfg():
    return preset("tiny").vit


def _model(cfg, backend="sdpa", seed=0):
    torch.manual_seed(seed)
    return MoonViT(cfg, attn_backend=backend).eval()


def _patches(grids, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(h * w for h, w in grids)
    return torch.randn(n, cfg.in_channels, cfg.patch_size, cfg.patch_size, generator=g), torch.tensor(grids)


def test_shapes(cfg):
    model = _model(cfg)
    pv, grid = _patches([(4, 6), (2, 2)], cfg)
    out = model(pv, grid)
    assert out.shape == (28, cfg.hidden_size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_masked"])
def test_packed_equals_each_image_alone(cfg, backend):
    model = _model(cfg, backend)
    grids = [(4, 6), (2, 2), (6, 4)]
    pv, grid = _patches(grids, cfg)
    with torch.no_grad():
        packed = model(pv, grid)
        start, alone = 0, []
        for h, w in grids:
            alone.append(model(pv[start : start + h * w], torch.tensor([[h, w]])))
            start += h * w
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_grid_mismatch_raises_with_both_numbers(cfg):
    model = _model(cfg)
    pv, _ = _patches([(4, 6)], cfg)
    with pytest.raises(ValueError, match=r"20.*24|24.*20"):
        model(pv, torch.tensor([[4, 5]]))
    with pytest.raises(ValueError, match="pixel_values"):
        model(pv[:, :, :7], torch.tensor([[4, 6]]))


def test_position_table_native_size_is_identity(cfg):
    torch.manual_seed(0)
    pe = PositionEmbedding2D(*cfg.pos_table_size, cfg.hidden_size)
    rows, cols = cfg.pos_table_size
    flat = pe.weight.detach().reshape(rows * cols, -1)
    # the bicubic path at native size reproduces the table ...
    torch.testing.assert_close(pe.resize(pe.weight.detach(), rows, cols), flat, atol=1e-5, rtol=1e-5)
    # ... and the module uses the table as-is there (the parameter itself, so gradients flow straight)
    torch.testing.assert_close(pe.interpolate(rows, cols), flat, atol=0, rtol=0)
    # another size differs from the top-left crop of the table
    small = pe.interpolate(8, 12).detach()
    assert small.shape == (96, cfg.hidden_size)
    assert not torch.allclose(small, pe.weight.detach()[:8, :12].reshape(96, -1), atol=1e-3)


def test_position_table_orientation_row_major():
    rows, cols = 16, 16
    pe = PositionEmbedding2D(rows, cols, 2)
    with torch.no_grad():
        r = torch.arange(rows, dtype=torch.float32)[:, None].expand(rows, cols)
        c = torch.arange(cols, dtype=torch.float32)[None, :].expand(rows, cols)
        pe.weight.copy_(torch.stack((c, r), dim=-1))  # channel 0 = column, channel 1 = row
    h, w = 5, 9
    out = pe.interpolate(h, w).detach().view(h, w, 2)
    # channel 0 varies only along columns, channel 1 only along rows; both increase
    torch.testing.assert_close(out[..., 0], out[:1, :, 0].expand(h, w))
    torch.testing.assert_close(out[..., 1], out[:, :1, 1].expand(h, w))
    assert (out[0, 1:, 0] > out[0, :-1, 0]).all() and (out[1:, 0, 1] > out[:-1, 0, 1]).all()


def test_patch_embed_adds_interpolated_table(cfg):
    model = _model(cfg)
    grids = [(4, 6), (64, 64)]
    pv, grid = _patches(grids, cfg)
    with torch.no_grad():
        got = model.patch_embed(pv, grid)
        proj = F.conv2d(pv, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=cfg.patch_size)
        table = model.patch_embed.pos_emb.weight
        t46 = F.interpolate(table.permute(2, 0, 1)[None], size=(4, 6), mode="bicubic", align_corners=False)
        pos = torch.cat((t46[0].permute(1, 2, 0).reshape(24, -1), table.reshape(4096, -1)))
    torch.testing.assert_close(got, proj.flatten(1) + pos, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_identical(cfg):
    grids = [(4, 2), (2, 6)]
    pv, grid = _patches(grids, cfg)
    results = []
    for ckpt in (False, True):
        model = _model(cfg, seed=3).train()
        model.gradient_checkpointing = ckpt
        x = pv.clone().requires_grad_(True)
        out = model(x, grid)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((out.detach(), x.grad.clone(), grads))
    (o0, x0, g0), (o1, x1, g1) = results
    torch.testing.assert_close(o0, o1, atol=0, rtol=0)
    torch.testing.assert_close(x0, x1, atol=1e-6, rtol=1e-6)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], atol=1e-6, rtol=1e-6, msg=n)


def test_parameter_names_and_full_size_count():
    cfg = preset("a3b").vit
    with torch.device("meta"):
        model = MoonViT(cfg)
    names = dict(model.named_parameters())
    assert names["patch_embed.proj.weight"].shape == (1152, 3, 14, 14)
    assert "patch_embed.proj.bias" in names
    assert names["patch_embed.pos_emb.weight"].shape == (64, 64, 1152)
    for i in (0, 26):
        b = f"encoder.blocks.{i}."
        assert names[b + "wqkv.weight"].shape == (3 * 1152, 1152)
        assert names[b + "wo.weight"].shape == (1152, 1152)
        assert names[b + "mlp.fc0.weight"].shape == (4304, 1152)
        assert names[b + "mlp.fc1.weight"].shape == (1152, 4304)
        for n in ("norm0", "norm1", "wqkv", "wo", "mlp.fc0", "mlp.fc1"):
            assert b + n + ".bias" in names
    assert "encoder.final_layernorm.weight" in names and "encoder.blocks.27.wo.weight" not in names
    assert not any("rope" in k for k in model.state_dict())  # RoPE buffers are non-persistent
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(416.9, abs=0.05)


# ------------------------------------------------------------------------------------- image processing


def test_downscale_rule_large_image():
    h, w = smart_resize_hw(2000, 3000)
    assert h % 28 == 0 and w % 28 == 0
    assert (h // 14) * (w // 14) <= 4096
    rh, rw = resized_hw(2000, 3000)
    s = math.sqrt(4096 / ((2000 / 14) * (3000 / 14)))
    # content downscaled by about sqrt(4096/n) (a bit more only if padding would overshoot), aspect kept
    assert 0.95 * s * 2000 <= rh <= s * 2000 and 0.95 * s * 3000 <= rw <= s * 3000
    assert rw / rh == pytest.approx(1.5, rel=0.01)
    assert h - rh < 28 and w - rw < 28


def test_small_image_is_padded_not_resized():
    assert resized_hw(30, 50) == (30, 50)
    assert smart_resize_hw(30, 50) == (56, 56)
    assert smart_resize_hw(28, 56) == (28, 56)


def test_side_limit_raises():
    with pytest.raises(ValueError, match="512"):
        smart_resize_hw(14, 8000)  # 572 patches wide, no downscale (n < 4096)
    assert smart_resize_hw(28, 7000) == (28, 7000)  # 500 patches wide: allowed


@pytest.mark.parametrize("size", [(1, 1), (13, 15), (29, 57), (100, 33), (895, 895), (897, 900), (4000, 200)])
def test_grids_even_and_within_limits(size):
    h, w = smart_resize_hw(*size)
    assert h % 28 == 0 and w % 28 == 0 and h >= 28 and w >= 28
    assert (h // 14) * (w // 14) <= 4096 and h // 14 < 512 and w // 14 < 512


def test_image_to_patches_layout_and_padding():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(3, 30, 50, generator=g)
    patches, (gh, gw) = image_to_patches(img)
    assert (gh, gw) == (4, 4) and patches.shape == (16, 3, 14, 14)
    canvas = torch.zeros(3, 56, 56)
    canvas[:, :30, :50] = img
    for r in range(gh):
        for c in range(gw):
            torch.testing.assert_close(
                patches[r * gw + c], canvas[:, r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14]
            )


def test_image_to_patches_downscales_large_image():
    img = torch.full((3, 2000, 3000), 0.5)
    patches, (gh, gw) = image_to_patches(img)
    assert gh * gw <= 4096 and gh % 2 == 0 and gw % 2 == 0
    rh, rw = resized_hw(2000, 3000)
    canvas = patches.view(gh, gw, 3, 14, 14).permute(2, 0, 3, 1, 4).reshape(3, gh * 14, gw * 14)
    torch.testing.assert_close(canvas[:, :rh, :rw], torch.full((3, rh, rw), 0.5), atol=1e-4, rtol=0)
    assert canvas[:, rh:].abs().max() == 0 and canvas[:, :, rw:].abs().max() == 0


def test_pack_images():
    imgs = [torch.rand(3, 30, 50), torch.rand(3, 28, 28), torch.rand(3, 60, 20)]
    pv, grid = pack_images(imgs)
    assert grid.dtype == torch.int64 and grid.tolist() == [[4, 4], [2, 2], [6, 2]]
    assert pv.shape == (16 + 4 + 12, 3, 14, 14)
    torch.testing.assert_close(pv[16:20], image_to_patches(imgs[1])[0])
    with pytest.raises(ValueError):
        pack_images([])
