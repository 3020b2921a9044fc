"""MoonViT: the native-resolution vision encoder of Kimi-VL (arXiv 2504.07491, Sec. 2.1).

- NaViT packing (Kimi-VL Sec. 2.1, after Dehghani et al. 2023): every image keeps its own (h, w) patch grid;
  the patches of all images form ONE sequence and attention is non-causal and never crosses images
  (``varlen_attention`` over ``cu_seqlens = cumsum([0, h1*w1, h2*w2, ...])``).
- Two position signals (Sec. 2.1): a learnable absolute table of 64 x 64 x hidden (inherited from
  SigLIP-so400m), bicubically interpolated to each image's (h, w) and added after the patch projection;
  and 2D RoPE on q and k in every layer (``rope.RotaryEmbedding2D``: slot 2i rotates by the column, slot
  2i+1 by the row).
- Blocks are pre-LayerNorm (with bias): x += wo(attn(norm0(x))); x += fc1(gelu_tanh(fc0(norm1(x)))); a
  final LayerNorm ends the encoder. Softmax scale 1/sqrt(head_dim).

Parameter names follow the public Kimi-VL checkpoint layout (``patch_embed.proj``, ``patch_embed.pos_emb``,
``encoder.blocks.{i}.{norm0,wqkv,wo,norm1,mlp.fc0,mlp.fc1}``, ``encoder.final_layernorm``) so it can be
mapped onto later. Preprocessing (resize/pad/patchify) lives in ``image_processing.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kimivl_model.attention import varlen_attention
from kimivl_model.config import MoonViTConfig
from kimivl_model.rope import RotaryEmbedding2D, apply_rotary


def grid_cu_seqlens(grid_hws: torch.Tensor) -> torch.Tensor:
    """cu_seqlens of packed images: cumsum([0, h1*w1, h2*w2, ...]) as int64 on grid_hws' device."""
    lens = (grid_hws[:, 0] * grid_hws[:, 1]).to(torch.int64)  # (N,)
    return F.pad(lens.cumsum(0), (1, 0))  # (N+1,)


def check_grid_hws(grid_hws: torch.Tensor, num_patches: int) -> None:
    """Validate grid_hws: (N, 2) integer, positive, and sum(h*w) == num_patches."""
    if grid_hws.dim() != 2 or grid_hws.shape[1] != 2:
        raise ValueError(f"grid_hws must be (num_images, 2) (rows, cols), got shape {tuple(grid_hws.shape)}")
    if grid_hws.is_floating_point():
        raise ValueError(f"grid_hws must be an integer tensor, got {grid_hws.dtype}")
    if grid_hws.numel() and int(grid_hws.min()) <= 0:
        raise ValueError(f"grid_hws entries must be > 0, got {grid_hws.tolist()}")
    total = int((grid_hws[:, 0] * grid_hws[:, 1]).sum()) if grid_hws.numel() else 0
    if total != num_patches:
        raise ValueError(
            f"grid_hws: sum(h*w) = {total} does not match the number of patches in pixel_values = {num_patches}"
        )


class PositionEmbedding2D(nn.Module):
    """Learnable absolute position table (rows, cols, hidden), bicubically resized per image (Sec. 2.1)."""

    # an embedding table, not a matrix: the optimizer sends it to AdamW (REFERENCE.md, Muon)
    _adamw_params = ("weight",)

    def __init__(self, rows: int, cols: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, cols, hidden))  # (rows, cols, hidden)
        nn.init.normal_(self.weight, std=0.02)

    def interpolate(self, h: int, w: int) -> torch.Tensor:
        """The table resized to (h, w), flattened row-major: (h*w, hidden). Native size is returned as-is."""
        rows, cols, hidden = self.weight.shape
        if (h, w) == (rows, cols):
            return self.weight.reshape(rows * cols, hidden)
        return self.resize(self.weight, h, w)

    @staticmethod
    def resize(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
        # table (rows, cols, hidden) -> (1, hidden, rows, cols) -> bicubic (1, hidden, h, w) -> (h*w, hidden)
        grid = F.interpolate(
            table.permute(2, 0, 1)[None].float(), size=(h, w), mode="bicubic", align_corners=False
        )
        return grid[0].flatten(1).transpose(0, 1).to(table.dtype)

    def forward(self, grid_hws: torch.Tensor) -> torch.Tensor:
        # grid_hws (N, 2) -> (sum h*w, hidden); each distinct size is interpolated once per call
        per_size: dict[tuple[int, int], torch.Tensor] = {}
        out = []
        for h, w in grid_hws.tolist():
            if (h, w) not in per_size:
                per_size[(h, w)] = self.interpolate(h, w)
            out.append(per_size[(h, w)])
        return torch.cat(out, dim=0)


class PatchEmbed(nn.Module):
    """Conv patch projection (kernel = stride = patch) + the interpolated absolute position table."""

    def __init__(self, cfg: MoonViTConfig) -> None:
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=p, stride=p, bias=True)
        self.pos_emb = PositionEmbedding2D(*cfg.pos_table_size, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor, grid_hws: torch.Tensor) -> torch.Tensor:
        # pixel_values (P, C, p, p) -> (P, hidden, 1, 1) -> (P, hidden)
        x = self.proj(pixel_values.to(self.proj.weight.dtype)).view(pixel_values.shape[0], -1)
        return x + self.pos_emb(grid_hws).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.fc0 = nn.Linear(hidden, intermediate)
        self.fc1 = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(F.gelu(self.fc0(x), approximate="tanh"))


class MoonViTBlock(nn.Module):
    """Pre-LN block: x += wo(attn(norm0(x))), x += mlp(norm1(x)); 2D RoPE on q, k; varlen attention."""

    def __init__(self, cfg: MoonViTConfig, attn_backend: str = "auto") -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.attn_backend = attn_backend
        self.norm0 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.wqkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.wo = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def attention(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.wqkv(x).view(t, 3, self.num_heads, self.head_dim)  # (T, 3, H, D), [q | k | v]
        q, k, v = qkv.unbind(dim=1)  # each (T, H, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = varlen_attention(
            q, k, v, cu_seqlens, causal=False, softmax_scale=self.head_dim**-0.5, backend=self.attn_backend
        )  # (T, H, D)
        return self.wo(o.reshape(t, -1))

    def forward(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.attention(self.norm0(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm1(x))


class MoonViTEncoder(nn.Module):
    def __init__(self, cfg: MoonViTConfig, attn_backend: str = "auto") -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MoonViTBlock(cfg, attn_backend) for _ in range(cfg.num_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.rope_2d = RotaryEmbedding2D(cfg.head_dim, cfg.rope_theta)

    def forward(self, x: torch.Tensor, grid_hws: torch.Tensor, use_checkpoint: bool = False) -> torch.Tensor:
        # x (P, hidden); the RoPE tables are computed once and shared by all layers
        cu_seqlens = grid_cu_seqlens(grid_hws).to(x.device)  # (N+1,)
        cos, sin = self.rope_2d(grid_hws)  # (P, D/2) each, fp32
        for block in self.blocks:
            if use_checkpoint:
                x = checkpoint(block, x, cu_seqlens, cos, sin, use_reentrant=False)
            else:
                x = block(x, cu_seqlens, cos, sin)
        return self.final_layernorm(x)


class MoonViT(nn.Module):
    """Packed native-resolution ViT: (P, C, patch, patch) patches + (N, 2) grids -> (P, hidden) features."""

    def __init__(self, cfg: MoonViTConfig, attn_backend: str = "auto") -> None:
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing: bool = False  # checkpoint every block while training
        self.patch_embed = PatchEmbed(cfg)
        self.encoder = MoonViTEncoder(cfg, attn_backend)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, pixel_values: torch.Tensor, grid_hws: torch.Tensor) -> torch.Tensor:
        c, p = self.cfg.in_channels, self.cfg.patch_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (c, p, p):
            raise ValueError(
                f"pixel_values must be (num_patches, {c}, {p}, {p}), got shape {tuple(pixel_values.shape)}"
            )
        check_grid_hws(grid_hws, pixel_values.shape[0])
        x = self.patch_embed(pixel_values, grid_hws)  # (P, hidden)
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        return self.encoder(x, grid_hws, use_checkpoint=use_ckpt)  # (P, hidden)
