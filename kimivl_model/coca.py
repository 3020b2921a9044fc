"""The ViT-stage head: CoCa-style contrastive + captioning objective (Kimi-VL Sec. 2.3; Yu et al. 2022).

Kimi-VL trains MoonViT with L = L_siglip + lambda * L_caption, lambda = 2 (REFERENCE.md "ViT stage loss").

- Image embedding: attention pooling (CoCa Sec. 3.2) -- one learned query attends over the patch features of
  ONE image (per-segment softmax via ``varlen_attention`` with one query per segment) -> Linear -> L2 norm.
- Text embedding: a small non-causal pre-norm transformer over each caption (1D RoPE restarted per caption),
  mean-pooled per caption -> Linear -> L2 norm.
- SigLIP loss (Zhai et al. 2023, Sec. 3; numbers from REFERENCE.md): logits = exp(t) * x @ y^T + b, t init
  log 10, b init -10, label +1 for the matching pair (the diagonal) and -1 elsewhere,
  L = -mean over all N*N pairs of logsigmoid(label * logit). NOTE: the SigLIP paper divides the sum by N
  (the batch size); REFERENCE.md asks for the mean over pairs, i.e. the paper's value / N, which is what
  this code computes. Across data-parallel ranks: with ``SigLIPLoss.gather_negatives`` (the trainer sets it
  from the phase's ``coca_negatives: all_ranks``) each rank's images are scored against the texts of EVERY
  rank's micro-batch (an autograd all-gather of the text embeddings, whose backward returns each text's
  gradient to its rank): rank r's loss is the mean over its N x (W*N) pairs with the positives at columns
  r*N + i, so the ranks' mean is the one-process loss over the global (W*N)^2 pairs.
- Caption loss: a small causal decoder-only LM conditioned on the image as a PREFIX (the ViT features,
  2x2 pixel-shuffled and projected to the decoder width): sequence i = [prefix_i, caption_i], all packed
  with cu_seqlens; next-token cross-entropy averaged over caption tokens only (the first caption token is
  predicted from the last prefix position; prefix positions are never targets).

The decoder's output head carries ``is_output_head = True`` and modules with non-matrix parameters list
them in ``_adamw_params`` so the Muon optimizer sends them to AdamW (REFERENCE.md, Muon).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kimivl_model.attention import varlen_attention
from kimivl_model.config import CoCaConfig
from kimivl_model.moonvit import check_grid_hws, grid_cu_seqlens
from kimivl_model.projector import pixel_shuffle
from kimivl_model.rope import RotaryEmbedding1D, apply_rotary


def segment_lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    return cu_seqlens[1:] - cu_seqlens[:-1]  # (S,)


def segment_positions(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Position of every packed token inside its segment: (T,) int64, restarting at 0 per segment."""
    lens = segment_lengths(cu_seqlens)
    total = int(cu_seqlens[-1])
    starts = torch.repeat_interleave(cu_seqlens[:-1], lens, output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - starts


def segment_mean(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Mean of x (T, d) over each segment -> (S, d); every segment must be non-empty."""
    lens = segment_lengths(cu_seqlens)
    seg = torch.repeat_interleave(torch.arange(lens.numel(), device=x.device), lens, output_size=x.shape[0])
    sums = x.new_zeros(lens.numel(), x.shape[-1]).index_add(0, seg, x)
    return sums / lens.to(x.dtype)[:, None]


def siglip_loss_from_logits(logits: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """-mean over all N*M pairs of logsigmoid(label * logit), label = +1 at (i, offset + i), -1 elsewhere
    (logits (N, M): N images against M >= offset + N texts; offset 0, M = N: the diagonal)."""
    n, m = logits.shape
    labels = torch.full((n, m), -1.0, device=logits.device, dtype=logits.dtype)
    labels[torch.arange(n, device=logits.device), offset + torch.arange(n, device=logits.device)] = 1.0
    return -F.logsigmoid(labels * logits).mean()


@dataclass
class CoCaOutput:
    loss: torch.Tensor  # siglip_loss + caption_loss_weight * caption_loss
    siglip_loss: torch.Tensor
    caption_loss: torch.Tensor
    logit_scale: float  # exp(t), detached
    logit_bias: float  # b, detached
    num_caption_tokens: int  # number of caption targets (= Tc)


# ------------------------------------------------------------------------------- generic transformer block


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(hidden, intermediate, bias=False)
        self.w_up = nn.Linear(hidden, intermediate, bias=False)
        self.w_down = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class PreNormBlock(nn.Module):
    """x += wo(attn(norm0(x))) with 1D RoPE and varlen attention; x += SwiGLU(norm1(x)). RMSNorm."""

    def __init__(
        self, hidden: int, num_heads: int, intermediate: int, eps: float, causal: bool, attn_backend: str
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden // num_heads
        self.causal, self.attn_backend = causal, attn_backend
        self.norm0 = nn.RMSNorm(hidden, eps=eps)
        self.wqkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.wo = nn.Linear(hidden, hidden, bias=False)
        self.norm1 = nn.RMSNorm(hidden, eps=eps)
        self.mlp = SwiGLU(hidden, intermediate)

    def forward(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.wqkv(self.norm0(x)).view(t, 3, self.num_heads, self.head_dim).unbind(1)  # (T, H, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = varlen_attention(
            q,
            k,
            v,
            cu_seqlens,
            causal=self.causal,
            softmax_scale=self.head_dim**-0.5,
            backend=self.attn_backend,
        )
        x = x + self.wo(o.reshape(t, -1))
        return x + self.mlp(self.norm1(x))


class Transformer(nn.Module):
    """A stack of PreNormBlocks over packed segments (1D RoPE restarting per segment) + final RMSNorm."""

    def __init__(self, cfg: CoCaConfig, num_layers: int, causal: bool, attn_backend: str) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.blocks = nn.ModuleList(
            PreNormBlock(h, cfg.num_heads, cfg.intermediate_size, cfg.norm_eps, causal, attn_backend)
            for _ in range(num_layers)
        )
        self.norm = nn.RMSNorm(h, eps=cfg.norm_eps)
        self.rope = RotaryEmbedding1D(h // cfg.num_heads, cfg.rope_theta)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rope(segment_positions(cu_seqlens))  # (T, D/2)
        for block in self.blocks:
            x = block(x, cu_seqlens, cos, sin)
        return self.norm(x)  # (T, hidden)


# ------------------------------------------------------------------------------------------ the two towers


class AttentionPool(nn.Module):
    """One learned query attends over each image's patches (softmax within the image only)."""

    _adamw_params = ("query",)  # a vector, not a matrix

    def __init__(self, dim: int, num_heads: int, eps: float, attn_backend: str) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_backend = attn_backend
        self.query = nn.Parameter(torch.randn(1, dim) * 0.02)  # (1, d)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.wq = nn.Linear(dim, dim)
        self.wkv = nn.Linear(dim, 2 * dim)
        self.wo = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        # x (P, d), cu_seqlens (N+1,) -> (N, d)
        n, (p, d) = cu_seqlens.numel() - 1, x.shape
        k, v = self.wkv(self.norm(x)).view(p, 2, self.num_heads, self.head_dim).unbind(1)  # (P, H, Dh)
        q = self.wq(self.query).view(1, self.num_heads, self.head_dim).expand(n, -1, -1).contiguous()
        cu_q = torch.arange(n + 1, device=x.device, dtype=cu_seqlens.dtype)  # one query per image
        o = varlen_attention(
            q,
            k,
            v,
            cu_q,
            cu_seqlens,
            causal=False,
            softmax_scale=self.head_dim**-0.5,
            backend=self.attn_backend,
        )  # (N, H, Dh)
        return self.wo(o.reshape(n, d))


class TextEncoder(nn.Module):
    """Token embedding + non-causal transformer, mean-pooled per caption: (Tc,) ids -> (N, hidden)."""

    def __init__(self, cfg: CoCaConfig, attn_backend: str) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.transformer = Transformer(
            cfg, cfg.num_text_encoder_layers, causal=False, attn_backend=attn_backend
        )

    def forward(self, ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        return segment_mean(self.transformer(self.token_embedding(ids), cu_seqlens), cu_seqlens)


class SigLIPLoss(nn.Module):
    """Pairwise sigmoid loss with a learnable temperature t (scale exp(t)) and bias b."""

    _adamw_params = ("logit_scale_t", "logit_bias")  # scalars: AdamW, never Muon

    def __init__(self, t_init: float, b_init: float) -> None:
        super().__init__()
        self.gather_negatives = False  # texts of every data-parallel rank's micro-batch (module docstring)
        self.logit_scale_t = nn.Parameter(torch.tensor([float(t_init)]))  # (1,)
        self.logit_bias = nn.Parameter(torch.tensor([float(b_init)]))  # (1,)

    def logits(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x (N, E) image, y (N, E) text, both L2-normalised -> (N, N) fp32; row i = image i
        return self.logit_scale_t.float().exp() * (x.float() @ y.float().T) + self.logit_bias.float()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (self.gather_negatives and dist.is_available() and dist.is_initialized()):
            return siglip_loss_from_logits(self.logits(x, y))
        world, rank = dist.get_world_size(), dist.get_rank()
        if world == 1:
            return siglip_loss_from_logits(self.logits(x, y))
        sizes = [torch.zeros((), dtype=torch.long, device=y.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor(y.shape[0], device=y.device))
        if any(int(s) != y.shape[0] for s in sizes):
            raise ValueError(
                f"SigLIP over all ranks needs the same number of captions per micro-batch on every rank, got "
                f"{[int(s) for s in sizes]}"
            )
        from torch.distributed.nn.functional import all_gather

        texts = torch.cat(all_gather(y.contiguous()), dim=0)  # (W*N, E); backward: each rank's gradient home
        return siglip_loss_from_logits(self.logits(x, texts), offset=rank * y.shape[0])


class CaptionDecoder(nn.Module):
    """Causal decoder over packed [image prefix_i, caption_i] sequences; per-caption-token CE."""

    def __init__(self, cfg: CoCaConfig, vit_hidden: int, attn_backend: str) -> None:
        super().__init__()
        kh, kw = cfg.image_prefix_merge
        self.merge = (kh, kw)
        self.prefix_norm = nn.LayerNorm(vit_hidden, eps=cfg.norm_eps)
        self.prefix_proj = nn.Linear(kh * kw * vit_hidden, cfg.hidden_size)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.transformer = Transformer(cfg, cfg.num_decoder_layers, causal=True, attn_backend=attn_backend)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.is_output_head = True

    def forward(
        self,
        image_features: torch.Tensor,
        grid_hws: torch.Tensor,
        caption_ids: torch.Tensor,
        caption_cu_seqlens: torch.Tensor,
    ) -> torch.Tensor:
        """Per-target cross-entropy, (Tc,) fp32: entry j is the loss of predicting caption token j."""
        kh, kw = self.merge
        dev = image_features.device
        prefix = pixel_shuffle(self.prefix_norm(image_features), grid_hws, self.merge).flatten(1)  # (Tp, 4d)
        prefix = self.prefix_proj(prefix)  # (Tp, hidden)
        n_prefix = (grid_hws[:, 0] // kh * (grid_hws[:, 1] // kw)).to(dev, torch.int64)  # (N,)
        n_cap = segment_lengths(caption_cu_seqlens)  # (N,)
        cu = F.pad((n_prefix + n_cap).cumsum(0), (1, 0))  # (N+1,) packed [prefix_i, caption_i]
        total = int(cu[-1])
        pre_cu = F.pad(n_prefix.cumsum(0), (1, 0))
        prefix_idx = torch.repeat_interleave(cu[:-1], n_prefix, output_size=prefix.shape[0])
        prefix_idx = prefix_idx + segment_positions(pre_cu)  # (Tp,)
        cap_idx = torch.repeat_interleave(cu[:-1] + n_prefix, n_cap, output_size=caption_ids.shape[0])
        cap_idx = cap_idx + segment_positions(caption_cu_seqlens)  # (Tc,)
        tokens = self.token_embedding(caption_ids).to(prefix.dtype)  # (Tc, hidden)
        x = prefix.new_zeros(total, prefix.shape[-1]).index_copy(
            0, torch.cat((prefix_idx, cap_idx)), torch.cat((prefix, tokens))
        )  # (T, hidden)
        h = self.transformer(x, cu)  # (T, hidden)
        logits = self.lm_head(h.index_select(0, cap_idx - 1))  # (Tc, vocab): token j from position j-1
        return F.cross_entropy(logits.float(), caption_ids, reduction="none")


# ------------------------------------------------------------------------------------------------ the head


class CoCaHead(nn.Module):
    """SigLIP (attention-pooled image vs mean-pooled text) + prefix-conditioned captioning on ViT features."""

    def __init__(self, cfg: CoCaConfig, vit_hidden: int, attn_backend: str = "auto") -> None:
        super().__init__()
        self.cfg = cfg
        pool_heads = math.gcd(vit_hidden, cfg.num_heads)  # cfg.num_heads whenever it divides vit_hidden
        self.image_pool = AttentionPool(vit_hidden, pool_heads, cfg.norm_eps, attn_backend)
        self.image_proj = nn.Linear(vit_hidden, cfg.embed_dim)
        self.text_encoder = TextEncoder(cfg, attn_backend)
        self.text_proj = nn.Linear(cfg.hidden_size, cfg.embed_dim)
        self.siglip = SigLIPLoss(cfg.siglip_temperature_init, cfg.siglip_bias_init)
        self.decoder = CaptionDecoder(cfg, vit_hidden, attn_backend)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def encode_image(self, image_features: torch.Tensor, grid_hws: torch.Tensor) -> torch.Tensor:
        cu = grid_cu_seqlens(grid_hws).to(image_features.device)
        return F.normalize(self.image_proj(self.image_pool(image_features, cu)), dim=-1)  # (N, E)

    def encode_text(self, caption_ids: torch.Tensor, caption_cu_seqlens: torch.Tensor) -> torch.Tensor:
        return F.normalize(
            self.text_proj(self.text_encoder(caption_ids, caption_cu_seqlens)), dim=-1
        )  # (N, E)

    def _check(
        self, feats: torch.Tensor, grid_hws: torch.Tensor, ids: torch.Tensor, cu: torch.Tensor
    ) -> None:
        check_grid_hws(grid_hws, feats.shape[0])
        n = grid_hws.shape[0]
        if n < 1:
            raise ValueError("grid_hws: need at least one image")
        kh, kw = self.cfg.image_prefix_merge
        if bool(((grid_hws[:, 0] % kh) | (grid_hws[:, 1] % kw)).any()):
            raise ValueError(
                f"grid_hws must be multiples of image_prefix_merge={(kh, kw)}, got {grid_hws.tolist()}"
            )
        if ids.dim() != 1 or ids.dtype != torch.long:
            raise ValueError(f"caption_ids must be 1-D int64 (packed), got {ids.dtype} {tuple(ids.shape)}")
        if cu.dim() != 1 or cu.numel() != n + 1 or int(cu[0]) != 0 or int(cu[-1]) != ids.numel():
            raise ValueError(
                f"caption_cu_seqlens must be (num_images+1={n + 1},) from 0 to len(caption_ids)={ids.numel()}, "
                f"got {cu.tolist()}"
            )
        lens = segment_lengths(cu)
        if int(lens.min()) < 1 or int(lens.max()) > self.cfg.max_text_len:
            raise ValueError(
                f"caption lengths must be in [1, max_text_len={self.cfg.max_text_len}], got {lens.tolist()}"
            )
        if int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size:
            raise ValueError(f"caption_ids must be in [0, vocab_size={self.cfg.vocab_size})")

    def forward(
        self,
        image_features: torch.Tensor,
        grid_hws: torch.Tensor,
        caption_ids: torch.Tensor,
        caption_cu_seqlens: torch.Tensor,
    ) -> CoCaOutput:
        # image_features (P, vit_hidden); grid_hws (N, 2); caption_ids (Tc,); caption_cu_seqlens (N+1,)
        self._check(image_features, grid_hws, caption_ids, caption_cu_seqlens)
        cap_cu = caption_cu_seqlens.to(image_features.device, torch.int64)
        ids = caption_ids.to(image_features.device)
        siglip = self.siglip(self.encode_image(image_features, grid_hws), self.encode_text(ids, cap_cu))
        per_token = self.decoder(image_features, grid_hws, ids, cap_cu)  # (Tc,)
        caption = per_token.mean()
        return CoCaOutput(
            loss=siglip + self.cfg.caption_loss_weight * caption,
            siglip_loss=siglip,
            caption_loss=caption,
            logit_scale=float(self.siglip.logit_scale_t.detach().exp()),
            logit_bias=float(self.siglip.logit_bias.detach()),
            num_caption_tokens=int(per_token.numel()),
        )
