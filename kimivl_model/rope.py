"""Rotary position embeddings: 1D (language model, caption towers) and 2D (MoonViT).

Both use the *adjacent-pair* convention: channel pair (2i, 2i+1) is one complex number rotated by an
angle. This is the layout of the public Kimi-VL / DeepSeek-V3 weights (DeepSeek-V3's reference code
de-interleaves before a rotate-half, which is the same rotation up to a permutation that q and k share,
so attention scores are identical).

- 1D (RoFormer, Su et al. 2021): angle of pair i at position p is p * theta^(-2i/d).
- 2D (Kimi-VL Sec. 2.1, MoonViT): frequencies f_i = theta^(-4i/d) for i < d/4; complex slot 2i rotates by
  the column index times f_i and slot 2i+1 by the row index times f_i, so half the pairs encode x and half
  y, and q.k depends only on the 2D offset between two patches.

The theta of the 1D table can be changed on a trained model (``set_theta``): the long-context stage raises
it from 50,000 to 800,000 (Kimi-VL Sec. 2.3).
"""

from __future__ import annotations

import torch
from torch import nn


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x``.

    x:   (T, H, D) or (T, D) with D even
    cos: (T, D/2), sin: (T, D/2) (fp32); broadcast over heads.
    Computed in fp32 and cast back to x's dtype.
    """
    dtype = x.dtype
    xf = x.float().unflatten(-1, (-1, 2))  # (..., D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    if x.dim() == 3:
        cos, sin = cos[:, None, :], sin[:, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(dtype)


class RotaryEmbedding1D(nn.Module):
    """cos/sin tables for 1D RoPE at arbitrary (packed, per-document reset) positions."""

    def __init__(self, dim: int, theta: float) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"RotaryEmbedding1D.dim must be even, got {dim}")
        self.dim = dim
        self.theta = float(theta)
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def reset_buffers(self, device: torch.device | None = None) -> None:
        """Recompute the (non-persistent) table, e.g. for a model built on the meta device."""
        self.inv_freq = self._inv_freq(device)

    def _inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        i = torch.arange(0, self.dim, 2, dtype=torch.float64, device=device)
        return (1.0 / (self.theta ** (i / self.dim))).float()  # (D/2,)

    def set_theta(self, theta: float) -> None:
        """Change the RoPE base in place (e.g. 50,000 -> 800,000 for long context)."""
        if theta <= 0:
            raise ValueError(f"rope theta must be > 0, got {theta}")
        self.theta = float(theta)
        self.inv_freq = self._inv_freq(self.inv_freq.device)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (T,) int -> cos, sin: (T, D/2) fp32
        angles = position_ids.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return angles.cos(), angles.sin()


class RotaryEmbedding2D(nn.Module):
    """cos/sin tables for MoonViT's 2D RoPE over packed images given their patch grids."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RotaryEmbedding2D.head_dim must be divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        self.theta = float(theta)
        self.register_buffer("freqs", self._freqs(), persistent=False)

    def _freqs(self, device: torch.device | None = None) -> torch.Tensor:
        i = torch.arange(0, self.head_dim // 4, dtype=torch.float64, device=device)
        return (1.0 / (self.theta ** (4.0 * i / self.head_dim))).float()  # (D/4,)

    def reset_buffers(self, device: torch.device | None = None) -> None:
        """Recompute the (non-persistent) table, e.g. for a model built on the meta device."""
        self.freqs = self._freqs(device)

    @staticmethod
    def grid_positions(grid_hws: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """(rows, cols) of every patch of every image, row-major per image: (sum h*w, 2) long."""
        pos = []
        for h, w in grid_hws.tolist():
            rr, cc = torch.meshgrid(
                torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
            )
            pos.append(torch.stack((rr.reshape(-1), cc.reshape(-1)), dim=-1))
        if not pos:
            return torch.zeros(0, 2, dtype=torch.long, device=device)
        return torch.cat(pos, dim=0)

    def forward_positions(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # rows, cols: (T,) -> cos, sin: (T, D/2) with slot 2i <- col * f_i and slot 2i+1 <- row * f_i
        ax = cols.to(torch.float32)[:, None] * self.freqs[None, :]  # (T, D/4)
        ay = rows.to(torch.float32)[:, None] * self.freqs[None, :]  # (T, D/4)
        angles = torch.stack((ax, ay), dim=-1).flatten(-2)  # (T, D/2) interleaved x, y
        return angles.cos(), angles.sin()

    def forward(self, grid_hws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = self.grid_positions(grid_hws, device=self.freqs.device)
        return self.forward_positions(pos[:, 0], pos[:, 1])
