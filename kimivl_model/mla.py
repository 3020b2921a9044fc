"""Multi-head Latent Attention (MLA), DeepSeek-V2 Sec. 2.1, on packed sequences.

Per token x (hidden):
- queries (Sec. 2.1.2 / eq. 12-13): q = W_q x (full rank, Moonlight) or q = W_UQ RMSNorm(W_DQ x) when
  ``q_lora_rank`` is set; viewed (heads, qk_nope + qk_rope) and split into q_nope | q_pe.
- keys/values (Sec. 2.1.2, eq. 9-11): [c_kv | k_pe] = W_DKV x with c_kv the kv_lora_rank latent;
  [k_nope | v] = W_UKV RMSNorm(c_kv) per head.
- decoupled RoPE (Sec. 2.1.3, eq. 14-17): q_pe is rotated per head; k_pe is ONE rotated key of size
  qk_rope shared (broadcast) by all heads. q = [q_nope, RoPE(q_pe)], k = [k_nope, RoPE(k_pe)].
- causal softmax attention with scale 1/sqrt(qk_nope + qk_rope) inside each packed document
  (``varlen_attention``; v's head dim may differ from q/k's), then o = W_O [o_1 .. o_H].

Sequence parallelism (``shard``, ``kimivl_model/sequence_parallel.py``): x holds this rank's slice of the
packed sequence; q | k_nope | v go through one all-to-all (slice x all heads -> whole sequence x H/N heads),
the shared k_pe is all-gathered once, attention runs on the whole sequence with the global ``cu_seqlens``,
and a second all-to-all brings the output back to the slice before ``o_proj``.

RoPE uses the adjacent-pair layout (``rope.apply_rotary``), the layout of the public weights.
Parameter names follow the public Moonlight/DeepSeek-V3 checkpoint (q_proj, kv_a_proj_with_mqa, ...).
"""

from __future__ import annotations

import torch
from torch import nn

from kimivl_model.attention import varlen_attention
from kimivl_model.config import LMConfig
from kimivl_model.norm import RMSNorm
from kimivl_model.rope import apply_rotary
from kimivl_model.sequence_parallel import (
    SequenceShard,
    gather_sequence,
    heads_to_sequence,
    sequence_to_heads,
)


class MLA(nn.Module):
    """Packed MLA self-attention: forward(x (T, hidden), cos, sin, cu_seqlens) -> (T, hidden)."""

    def __init__(self, cfg: LMConfig, attn_backend: str = "auto") -> None:
        super().__init__()
        self.cfg = cfg
        self.attn_backend = attn_backend
        self.num_heads = cfg.num_heads
        self.qk_nope = cfg.qk_nope_head_dim
        self.qk_rope = cfg.qk_rope_head_dim
        self.v_head = cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        q_out = cfg.num_heads * cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False
        )
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(
            cfg.kv_lora_rank, cfg.num_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(cfg.num_heads * cfg.v_head_dim, cfg.hidden_size, bias=False)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        # x: (T, hidden) -> (T, H, qk_nope + qk_rope)
        if self.cfg.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(x.shape[0], self.num_heads, self.qk_nope + self.qk_rope)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor,
        shard: SequenceShard | None = None,
    ) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.cfg.hidden_size:
            raise ValueError(f"MLA: x must be (T, {self.cfg.hidden_size}), got {tuple(x.shape)}")
        if cos.shape != (x.shape[0], self.qk_rope // 2) or sin.shape != cos.shape:
            raise ValueError(
                f"MLA: cos/sin must be (T={x.shape[0]}, {self.qk_rope // 2}), got {tuple(cos.shape)}, {tuple(sin.shape)}"
            )
        t_local, t, h = x.shape[0], x.shape[0], self.num_heads
        q_nope, q_pe = self._queries(x).split(
            [self.qk_nope, self.qk_rope], dim=-1
        )  # (T, H, nope), (T, H, rope)
        q_pe = apply_rotary(q_pe, cos, sin)

        compressed_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope], dim=-1)
        k_pe = apply_rotary(k_pe, cos, sin)  # (T, rope): one key shared by all heads
        kv = self.kv_b_proj(self.kv_a_layernorm(compressed_kv)).view(t, h, self.qk_nope + self.v_head)
        k_nope, v = kv.split([self.qk_nope, self.v_head], dim=-1)  # (T, H, nope), (T, H, v)

        q = torch.cat([q_nope, q_pe], dim=-1)  # (T, H, nope + rope)
        if shard is not None and shard.size > 1:  # slice x H heads -> whole sequence x H/N heads
            dims = [self.qk_nope + self.qk_rope, self.qk_nope, self.v_head]
            q, k_nope, v = heads_to_sequence(torch.cat([q, k_nope, v], dim=-1), shard).split(dims, dim=-1)
            q = q.contiguous()  # attention saves q: a view would keep the whole exchanged buffer alive
            k_pe = gather_sequence(k_pe, shard)  # (T, rope): the shared key, once per token
            t, h = shard.total, h // shard.size
        k = torch.cat([k_nope, k_pe[:, None, :].expand(t, h, self.qk_rope)], dim=-1)  # (T, H, nope + rope)
        o = varlen_attention(
            q,
            k,
            v.contiguous(),
            cu_seqlens,
            causal=True,
            softmax_scale=self.cfg.softmax_scale,
            backend=self.attn_backend,
        )  # (T, H, v)
        if shard is not None and shard.size > 1:
            o = sequence_to_heads(o, shard)  # (T_local, H, v)
        return self.o_proj(o.reshape(t_local, self.num_heads * self.v_head))
