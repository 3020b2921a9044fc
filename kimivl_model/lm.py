"""The Moonlight / DeepSeek-V3-style MoE language model of Kimi-VL (Kimi-VL Sec. 2.1), on packed sequences.

Pre-norm decoder (DeepSeek-V3 Sec. 2.1): h = h + MLA(RMSNorm(h)); h = h + FFN(RMSNorm(h)), where FFN is a
dense SwiGLU for the first ``first_k_dense`` layers and an MoE (``moe.MoE``) after; final RMSNorm and an
untied output head. Attention is MLA (DeepSeek-V2 Sec. 2.1, ``mla.MLA``) with 1D RoPE on per-document
positions (reset at each ``cu_seqlens`` boundary), theta 50,000, raised to 800,000 for long context
(Kimi-VL Sec. 2.3, ``KimiLM.set_rope_theta``).

Input is ONE flat token axis (T,) plus ``cu_seqlens`` (S+1,) = cumsum([0, len_1, ...]); no padding.
Labels are ALREADY SHIFTED by the caller: ``labels[t]`` is the target predicted at position t (normally
input_ids[t+1] of the same document); the last token of each document and every non-trained token carry
-100. The data pipeline does the shift so a document never predicts the next document's first token.

The training objective is ``out.loss + out.aux_loss``; after the optimizer step the caller applies
``update_router_bias(out.expert_load)`` (aux-loss-free balancing; all-reduce the load first when data
parallel). Cross-entropy is computed in fp32; with ``return_logits=False`` (training) only labelled rows
are projected, by the fused head + CE of ``linear_ce.linear_cross_entropy_sum``: ``loss_chunk_size`` rows at
a time, each chunk's gradient computed right away, so (T, V) logits never exist. That path reads
``lm_head.weight`` directly: fine for DDP and ZeRO 0-2, not for ZeRO-3 (which gathers parameters in module
hooks; it is not supported here).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kimivl_model.config import LMConfig
from kimivl_model.linear_ce import linear_cross_entropy_sum
from kimivl_model.mla import MLA
from kimivl_model.moe import MoE, RoutedExperts, Router, SwiGLU, aux_free_bias_update
from kimivl_model.norm import RMSNorm
from kimivl_model.rope import RotaryEmbedding1D
from kimivl_model.sequence_parallel import SequenceShard, check_group, shard_tokens

IGNORE_INDEX = -100


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-document position ids (T,) long: 0, 1, ... restarting at each cu_seqlens boundary."""
    cu = cu_seqlens.to(torch.long)
    total = int(cu[-1])
    lens = cu[1:] - cu[:-1]  # (S,)
    doc = torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), lens, output_size=total)
    return torch.arange(total, device=cu.device) - cu[doc]  # (T,)


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32/int64, got {cu_seqlens.dtype}")
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at the token count {total}, got "
            f"{int(cu_seqlens[0])}..{int(cu_seqlens[-1])}"
        )
    if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # (T, V) or None (return_logits=False)
    loss: torch.Tensor | None  # () fp32 mean CE over labels != -100 (0 if none); None without labels
    loss_sum: torch.Tensor | None  # () fp32 summed CE
    num_loss_tokens: torch.Tensor | None  # () int64
    aux_loss: torch.Tensor  # () fp32, sum over MoE layers (already times aux_loss_alpha)
    expert_load: torch.Tensor  # (num_moe_layers, E) fp32 detached tokens routed per expert
    hidden_states: torch.Tensor  # (T, hidden) after the final norm


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig, layer_idx: int, attn_backend: str = "auto", expert_impl: str = "auto"):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, attn_backend=attn_backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp: nn.Module = (
            MoE(cfg, expert_impl=expert_impl)
            if self.is_moe
            else SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        )

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor,
        shard: SequenceShard | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """h (T, hidden) -> (h, aux_loss or None, load (E,) or None)."""
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cu_seqlens, shard)
        x = self.post_attention_layernorm(h)
        if self.is_moe:
            y, aux, load = self.mlp(x, cu_seqlens, shard)
            return h + y, aux, load
        return h + self.mlp(x), None, None


class LMBackbone(nn.Module):
    def __init__(self, cfg: LMConfig, attn_backend: str = "auto", expert_impl: str = "auto") -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, attn_backend=attn_backend, expert_impl=expert_impl)
            for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding1D(cfg.qk_rope_head_dim, cfg.rope_theta)
        self.gradient_checkpointing: bool = False

    def forward(
        self,
        h: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        shard: SequenceShard | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """h (T, hidden) input embeddings -> final-normed (T, hidden), summed aux loss (), per-MoE-layer loads.
        Sequence parallel (``shard``): h and position_ids are this rank's slice, cu_seqlens the whole
        sequence's."""
        cos, sin = self.rotary(position_ids)  # (T, rope/2) fp32 each
        aux_total = torch.zeros((), device=h.device, dtype=torch.float32)
        loads: list[torch.Tensor] = []
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if use_ckpt:
                h, aux, load = checkpoint(layer, h, cos, sin, cu_seqlens, shard, use_reentrant=False)
            else:
                h, aux, load = layer(h, cos, sin, cu_seqlens, shard)
            if aux is not None:
                aux_total = aux_total + aux
            if load is not None:
                loads.append(load)
        return self.norm(h), aux_total, loads


class KimiLM(nn.Module):
    """Causal MoE LM with an output head; see the module docstring for the packed input contract."""

    loss_chunk_size: int = 1024  # tokens per logits/CE chunk when return_logits=False

    def __init__(self, cfg: LMConfig, attn_backend: str = "auto", *, expert_impl: str = "auto") -> None:
        super().__init__()
        self.cfg = cfg
        self.rope_theta = float(cfg.rope_theta)  # the config is frozen: the live theta is recorded here
        self.model = LMBackbone(cfg, attn_backend=attn_backend, expert_impl=expert_impl)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.is_output_head = True
        self.tie_weights()
        self.init_weights()
        self.sequence_parallel_group: Any = None  # set by the training engine under sequence_parallel > 1

    def shard_batch(self, batch: dict[str, Any], rank: int, size: int) -> dict[str, Any]:
        """Sequence parallelism: rank ``rank``'s slice of a packed text micro-batch (``shard_tokens``)."""
        return shard_tokens(batch, rank, size)

    def tie_weights(self) -> None:
        """With ``tie_word_embeddings`` the output head is the input embedding (one tensor)."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------------------------------ setup
    def init_weights(self) -> None:
        """normal(0, initializer_range) for matrices, ones for norms, zero router bias; no-op on meta."""
        if any(p.is_meta for p in self.parameters()):
            return
        std = self.cfg.initializer_range
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear | nn.Embedding):
                    nn.init.normal_(m.weight, mean=0.0, std=std)
                elif isinstance(m, RMSNorm):
                    nn.init.ones_(m.weight)
                elif isinstance(m, RoutedExperts):
                    for p in (m.gate_proj, m.up_proj, m.down_proj):
                        nn.init.normal_(p, mean=0.0, std=std)
                elif isinstance(m, Router):
                    nn.init.normal_(m.weight, mean=0.0, std=std)
                    m.e_score_correction_bias.zero_()
        self.model.rotary.set_theta(self.rope_theta)  # rebuild the non-persistent table (e.g. after to_empty)

    def set_rope_theta(self, theta: float) -> None:
        """Change the RoPE base of a trained model (50,000 -> 800,000 for the long-context stage)."""
        if not theta > 0:
            raise ValueError(f"set_rope_theta: theta must be > 0, got {theta}")
        self.model.rotary.set_theta(theta)
        self.rope_theta = float(theta)

    def moe_layers(self) -> Iterator[MoE]:
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoE):
                yield layer.mlp

    @torch.no_grad()
    def update_router_bias(self, expert_load: torch.Tensor, rate: float | None = None) -> None:
        """Aux-loss-free step on every MoE layer; expert_load (num_moe_layers, E) as in LMOutput."""
        moes = list(self.moe_layers())
        expected = (len(moes), self.cfg.num_routed_experts)
        if tuple(expert_load.shape) != expected:
            raise ValueError(
                f"update_router_bias: expert_load must be {expected}, got {tuple(expert_load.shape)}"
            )
        u = self.cfg.bias_update_rate if rate is None else rate
        for moe, load in zip(moes, expert_load, strict=True):
            bias = moe.gate.e_score_correction_bias
            bias.copy_(aux_free_bias_update(bias, load.to(bias.device), u))

    # ---------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool = True,
        shard: SequenceShard | None = None,
    ) -> LMOutput:
        """input_ids (T,) long XOR inputs_embeds (T, hidden); cu_seqlens (S+1,) (default: one document);
        position_ids (T,) (default: per-document positions); labels (T,) already shifted, -100 ignored.

        Sequence parallel (``shard``, ``kimivl_model/sequence_parallel.py``): every per-token input is this
        rank's slice (``shard.local_len`` rows), ``cu_seqlens`` is the WHOLE packed sequence's; the outputs
        are the slice's (logits, hidden states, loss sum and count, expert load) except ``aux_loss``, which is
        the whole sequence's (reduced over the SP group)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(
                "KimiLM.forward: pass exactly one of input_ids (T,) or inputs_embeds (T, hidden)"
            )
        if input_ids is not None:
            if input_ids.dim() != 1:
                raise ValueError(
                    f"input_ids must be (T,) (packed, no batch axis), got {tuple(input_ids.shape)}"
                )
            h = self.model.embed_tokens(input_ids)  # (T, hidden)
        else:
            if inputs_embeds.dim() != 2 or inputs_embeds.shape[1] != self.cfg.hidden_size:
                raise ValueError(
                    f"inputs_embeds must be (T, {self.cfg.hidden_size}), got {tuple(inputs_embeds.shape)}"
                )
            h = inputs_embeds
        t = h.shape[0]
        total = t
        if shard is not None:
            check_group(shard)
            if t != shard.local_len or cu_seqlens is None:
                raise ValueError(
                    f"sequence parallel: rank {shard.rank} holds tokens [{shard.start}, {shard.end}) of "
                    f"{shard.total} and needs the whole sequence's cu_seqlens; got {t} tokens"
                )
            total = shard.total
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, t], dtype=torch.long, device=h.device)
        _check_cu_seqlens(cu_seqlens, total)
        if position_ids is None:
            position_ids = positions_from_cu_seqlens(cu_seqlens)
            if shard is not None:
                position_ids = position_ids[shard.start : shard.end]
        elif position_ids.shape != (t,):
            raise ValueError(f"position_ids must be (T={t},), got {tuple(position_ids.shape)}")

        hidden, aux_loss, loads = self.model(h, position_ids.to(h.device), cu_seqlens, shard)
        e = self.cfg.num_routed_experts
        expert_load = torch.stack(loads) if loads else torch.zeros(0, e, device=h.device)  # (L_moe, E)

        logits = self.lm_head(hidden) if return_logits else None  # (T, V)
        loss = loss_sum = n_tok = None
        if labels is not None:
            if labels.shape != (t,):
                raise ValueError(f"labels must be (T={t},) already shifted, got {tuple(labels.shape)}")
            labels = labels.to(hidden.device)
            valid = labels != IGNORE_INDEX  # (T,)
            n_tok = valid.sum()
            if logits is not None:
                loss_sum = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
            else:
                loss_sum = self._chunked_ce_sum(hidden, labels, valid)
            loss = loss_sum / n_tok.clamp(min=1).to(loss_sum.dtype)
        return LMOutput(
            logits=logits,
            loss=loss,
            loss_sum=loss_sum,
            num_loss_tokens=n_tok,
            aux_loss=aux_loss,
            expert_load=expert_load,
            hidden_states=hidden,
        )

    def _chunked_ce_sum(
        self, hidden: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Summed fp32 CE over labelled rows only, by the fused head + CE (``loss_chunk_size`` rows at a
        time; see the module docstring)."""
        rows = valid.nonzero().squeeze(1)  # (N,)
        if rows.numel() == 0:
            return (hidden.sum() * 0.0).float()  # keeps the graph connected when nothing is labelled
        hs, ls = hidden.index_select(0, rows), labels.index_select(0, rows)  # (N, hidden), (N,)
        return linear_cross_entropy_sum(hs, self.lm_head.weight, ls, self.loss_chunk_size)


def lm_param_counts(cfg: LMConfig) -> dict[str, int]:
    """Analytic parameter counts: total, embedding (embed + head), no_embed, activated_no_embed.

    activated_no_embed = per token: all attention + norms + dense FFNs + per MoE layer (top-k routed
    experts + shared experts + router). The router bias is a buffer, not a parameter.
    """
    hd, nh = cfg.hidden_size, cfg.num_heads
    if cfg.q_lora_rank is None:
        q = hd * nh * cfg.qk_head_dim
    else:
        q = hd * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * nh * cfg.qk_head_dim
    attn = (
        q
        + hd * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        + cfg.kv_lora_rank
        + cfg.kv_lora_rank * nh * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        + nh * cfg.v_head_dim * hd
    )
    per_layer_common = attn + 2 * hd  # attention + two norms
    dense = 3 * hd * cfg.intermediate_size
    expert = 3 * hd * cfg.moe_intermediate_size
    shared = 3 * hd * cfg.moe_intermediate_size * cfg.num_shared_experts
    router = cfg.num_routed_experts * hd
    n_moe, n_dense = cfg.num_moe_layers, cfg.first_k_dense
    common = cfg.num_layers * per_layer_common + n_dense * dense + hd  # + final norm
    no_embed = common + n_moe * (cfg.num_routed_experts * expert + shared + router)
    activated = common + n_moe * (cfg.num_experts_per_tok * expert + shared + router)
    embedding = cfg.vocab_size * hd * (1 if cfg.tie_word_embeddings else 2)
    return {
        "total": no_embed + embedding,
        "embedding": embedding,
        "no_embed": no_embed,
        "activated_no_embed": activated,
    }
