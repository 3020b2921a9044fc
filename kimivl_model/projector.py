"""MLP projector from MoonViT features to the language model (Kimi-VL Sec. 2.1).

Pixel shuffle: each image's (h, w) grid of patch features is grouped into kh x kw (2 x 2) neighbourhoods,
turning (h*w, d) into (h/kh * w/kw, kh*kw*d): 4x fewer tokens, 4x wider. Inside a group the order is
(kernel_row, kernel_col) row-major, and groups follow row-major order over the merged grid. A LayerNorm over
d is applied to every patch before the concatenation, then Linear(4d -> 4d) -> GELU (exact) ->
Linear(4d -> LM hidden). One image yields (h/2)*(w/2) LM tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimivl_model.config import ProjectorConfig


def _check_grid(grid_hws: torch.Tensor, kernel: tuple[int, int]) -> list[tuple[int, int]]:
    if grid_hws.dim() != 2 or grid_hws.shape[1] != 2:
        raise ValueError(f"grid_hws must be (num_images, 2), got shape {tuple(grid_hws.shape)}")
    kh, kw = kernel
    grids = [(int(h), int(w)) for h, w in grid_hws.tolist()]
    for i, (h, w) in enumerate(grids):
        if h <= 0 or w <= 0 or h % kh or w % kw:
            raise ValueError(
                f"grid_hws[{i}] = ({h}, {w}): rows must be a positive multiple of {kh} and cols of {kw} "
                f"for the {kh}x{kw} pixel shuffle (pad images to a multiple of patch*merge)"
            )
    return grids


def num_image_tokens(grid_hws: torch.Tensor, merge_kernel: tuple[int, int] = (2, 2)) -> list[int]:
    """LM tokens per image after the pixel shuffle: (h/kh) * (w/kw)."""
    kh, kw = merge_kernel
    return [(h // kh) * (w // kw) for h, w in _check_grid(grid_hws, merge_kernel)]


def pixel_shuffle(
    features: torch.Tensor, grid_hws: torch.Tensor, kernel: tuple[int, int] = (2, 2)
) -> torch.Tensor:
    """(sum h*w, d) row-major patch features -> (sum h/kh*w/kw, kh*kw, d), images concatenated in order."""
    grids = _check_grid(grid_hws, kernel)
    total = sum(h * w for h, w in grids)
    if features.dim() != 2 or features.shape[0] != total:
        raise ValueError(
            f"features must be (sum(h*w)={total}, hidden) for grid_hws {grids}, got {tuple(features.shape)}"
        )
    kh, kw = kernel
    d = features.shape[-1]
    out, start = [], 0
    for h, w in grids:
        x = features[start : start + h * w]  # (h*w, d)
        start += h * w
        x = x.view(h // kh, kh, w // kw, kw, d).permute(0, 2, 1, 3, 4)  # (h/kh, w/kw, kh, kw, d)
        out.append(x.reshape((h // kh) * (w // kw), kh * kw, d))
    return torch.cat(out, dim=0)


class Projector(nn.Module):
    """(P, vit_hidden) + (N, 2) grids -> (sum h*w/4, lm_hidden) LM-space image tokens."""

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        merged = cfg.merged_hidden_size  # kh * kw * vit_hidden
        self.pre_norm = nn.LayerNorm(cfg.vit_hidden_size, eps=cfg.layer_norm_eps)
        self.linear_1 = nn.Linear(merged, merged, bias=True)
        self.linear_2 = nn.Linear(merged, cfg.lm_hidden_size, bias=True)

    def num_image_tokens(self, grid_hws: torch.Tensor) -> list[int]:
        return num_image_tokens(grid_hws, self.cfg.merge_kernel)

    def forward(self, features: torch.Tensor, grid_hws: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(features)  # (P, d): per-patch norm, equal before or after the shuffle
        x = pixel_shuffle(x, grid_hws, self.cfg.merge_kernel).flatten(1)  # (P/4, 4d)
        return self.linear_2(F.gelu(self.linear_1(x)))  # (P/4, lm_hidden)
