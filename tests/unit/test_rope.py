"""1D/2D RoPE (kimivl_model.rope) against hand-written references and the relative-position property."""

from __future__ import annotations

import math

import pytest
import torch

from kimivl_model.rope import RotaryEmbedding1D, RotaryEmbedding2D, apply_rotary


def _rotate_complex(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Reference rotation: pair (2i, 2i+1) as the complex number x_2i + j x_2i+1, times exp(j angle_i)."""
    xc = torch.complex(x[..., 0::2].double(), x[..., 1::2].double())
    out = xc * torch.exp(1j * angles.double())
    return torch.stack((out.real, out.imag), dim=-1).flatten(-2).float()


def test_apply_rotary_matches_complex_multiplication():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 8, generator=g)
    angles = torch.randn(5, 4, generator=g) * 3
    got = apply_rotary(x, angles.cos(), angles.sin())
    ref = _rotate_complex(x, angles[:, None, :])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # 2-D input (T, D) takes the same path without a head axis
    torch.testing.assert_close(
        apply_rotary(x[:, 0], angles.cos(), angles.sin()), ref[:, 0], atol=1e-5, rtol=1e-5
    )


def _score_2d(rope: RotaryEmbedding2D, q, k, p1, p2) -> float:
    rows = torch.tensor([p1[0], p2[0]])
    cols = torch.tensor([p1[1], p2[1]])
    cos, sin = rope.forward_positions(rows, cols)
    qr = apply_rotary(q[None], cos[:1], sin[:1])[0]
    kr = apply_rotary(k[None], cos[1:], sin[1:])[0]
    return float((qr.double() * kr.double()).sum())


def test_2d_rope_depends_only_on_offset():
    g = torch.Generator().manual_seed(1)
    rope = RotaryEmbedding2D(16, 10000.0)
    for _ in range(5):
        q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)
        s1 = _score_2d(rope, q, k, (3, 7), (1, 2))  # offset (2, 5)
        s2 = _score_2d(rope, q, k, (12, 9), (10, 4))  # offset (2, 5)
        s3 = _score_2d(rope, q, k, (3, 7), (2, 1))  # offset (1, 6): different
        assert s1 == pytest.approx(s2, abs=1e-4)
        assert abs(s1 - s3) > 1e-3


def test_2d_rope_slots_rotate_by_column_and_row():
    d, theta = 16, 10000.0
    rope = RotaryEmbedding2D(d, theta)
    rows = torch.tensor([0, 3, 5, 2])
    cols = torch.tensor([4, 0, 7, 1])
    cos, sin = rope.forward_positions(rows, cols)
    assert cos.shape == (4, d // 2) and cos.dtype == torch.float32
    for i in range(d // 4):
        f = theta ** (-4.0 * i / d)
        for t in range(4):
            col_angle, row_angle = float(cols[t]) * f, float(rows[t]) * f
            assert float(cos[t, 2 * i]) == pytest.approx(math.cos(col_angle), abs=1e-5)
            assert float(sin[t, 2 * i]) == pytest.approx(math.sin(col_angle), abs=1e-5)
            assert float(cos[t, 2 * i + 1]) == pytest.approx(math.cos(row_angle), abs=1e-5)
            assert float(sin[t, 2 * i + 1]) == pytest.approx(math.sin(row_angle), abs=1e-5)


def test_2d_rope_grid_positions_row_major_per_image():
    rope = RotaryEmbedding2D(8)
    grid = torch.tensor([[2, 3], [1, 2]])
    pos = rope.grid_positions(grid)
    expected = [(r, c) for r in range(2) for c in range(3)] + [(0, 0), (0, 1)]
    assert [tuple(p) for p in pos.tolist()] == expected
    cos, sin = rope(grid)
    cos_ref, sin_ref = rope.forward_positions(pos[:, 0], pos[:, 1])
    torch.testing.assert_close(cos, cos_ref)
    torch.testing.assert_close(sin, sin_ref)


def test_2d_rope_rejects_bad_head_dim():
    with pytest.raises(ValueError, match="head_dim"):
        RotaryEmbedding2D(10)


def test_1d_rope_relative_property_and_angles():
    g = torch.Generator().manual_seed(2)
    d, theta = 8, 500.0
    rope = RotaryEmbedding1D(d, theta)
    ref_freq = torch.tensor([theta ** (-2.0 * i / d) for i in range(d // 2)])
    torch.testing.assert_close(rope.inv_freq, ref_freq.float())
    q, k = torch.randn(d, generator=g), torch.randn(d, generator=g)

    def score(pq: int, pk: int) -> float:
        cos, sin = rope(torch.tensor([pq, pk]))
        return float(
            (apply_rotary(q[None], cos[:1], sin[:1]) * apply_rotary(k[None], cos[1:], sin[1:])).sum()
        )

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert abs(score(7, 3) - score(7, 4)) > 1e-4


def test_1d_rope_set_theta_changes_inv_freq():
    rope = RotaryEmbedding1D(8, 50000.0)
    before = rope.inv_freq.clone()
    rope.set_theta(800000.0)
    ref = torch.tensor([800000.0 ** (-2.0 * i / 8) for i in range(4)])
    torch.testing.assert_close(rope.inv_freq, ref.float())
    assert not torch.allclose(before, rope.inv_freq)
    assert "inv_freq" not in rope.state_dict()  # non-persistent: theta comes from the config
    with pytest.raises(ValueError):
        rope.set_theta(0.0)
