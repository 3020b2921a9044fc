"""Sequence (context) parallelism for the language model: Ulysses all-to-all over attention heads.

A packed micro-batch (one flat token axis of T tokens, documents delimited by ``cu_seqlens``) is cut into N
contiguous slices, one per rank of a sequence-parallel (SP) group (``split_points``: lengths differ by at
most one; no padding). Outside attention every rank holds only its slice: embeddings, norms, MLA
projections, the MoE (routing is per token), the output head and the loss. Inside MLA (DeepSpeed-Ulysses,
Jacobs et al. 2023) one all-to-all trades the sequence split for a head split: rank j receives every token
of heads ``[j*H/N, (j+1)*H/N)`` (``heads_to_sequence``), runs the ordinary varlen attention on the WHOLE
packed sequence with the GLOBAL ``cu_seqlens`` (so document boundaries and causality are exactly those of
one rank), and a second all-to-all returns its slice with all heads (``sequence_to_heads``). MLA's decoupled
RoPE key ``k_pe`` is ONE vector per token shared by all heads, so it is all-gathered once
(``gather_sequence``, T x 64 values) instead of being sent once per head.

What is reduced over the SP group, exactly:
- the MoE sequence-wise aux loss (DeepSeek-V3 eq. 17-20, per packed document): its per-document sums
  (expert choice counts, affinity sums) are all-reduced before the loss is formed
  (``moe.sequence_aux_loss``), so every SP rank holds the same value as one rank would;
- the CE loss and its token count are NOT reduced here: each rank returns its slice's sum and count, and the
  training engine's token-weighted objective (sum over all ranks / global count) is exact;
- images: a rank embeds the images whose ``<|media_pad|>`` placeholders fall (partly) in its slice
  (``KimiVL.shard_batch``); an image split by a cut is encoded on both ranks and each uses its rows only.

Why not DeepSpeed's ``deepspeed.sequence.layer.DistributedAttention`` (0.19.8): its all-to-all
(``single_all_to_all`` / ``_generate_layout_params``) needs the sequence length divisible by the SP size, and
it exchanges q, k and v per head. Packed varlen sequences have any length; padding them would feed pad tokens
to the MoE router (changing the expert loads and the sequence aux loss), and a per-head k would send MLA's
shared RoPE key H times. The exchange here is ``dist.all_to_all_single`` with uneven split sizes in a small
autograd function (its backward is the reverse exchange), one all-to-all for q|k_nope|v and one back.

Collectives are autograd-aware; activation checkpointing recomputes them in the backward (every rank runs the
same layers in the same order, so the collectives match).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def split_points(total: int, size: int) -> tuple[int, ...]:
    """Cut points (size + 1,) of ``total`` tokens into ``size`` contiguous slices; the first
    ``total % size`` slices are one token longer."""
    if size < 1:
        raise ValueError(f"sequence parallel size must be >= 1, got {size}")
    q, r = divmod(int(total), size)
    cuts = [0]
    for j in range(size):
        cuts.append(cuts[-1] + q + (1 if j < r else 0))
    return tuple(cuts)


@dataclass(frozen=True)
class SequenceShard:
    """This rank's slice of one packed micro-batch: the cut points of the whole sequence, the rank's index in
    the SP group, the group (None: the default group), and how many image features of the images given to
    this rank precede its first ``<|media_pad|>`` token (``image_row_offset``)."""

    cuts: tuple[int, ...]
    rank: int
    group: Any = None
    image_row_offset: int = 0

    def __post_init__(self) -> None:
        if len(self.cuts) < 2 or not 0 <= self.rank < len(self.cuts) - 1:
            raise ValueError(f"SequenceShard: rank {self.rank} outside the {len(self.cuts) - 1} slices")
        if any(b < a for a, b in zip(self.cuts, self.cuts[1:], strict=False)) or self.cuts[0] != 0:
            raise ValueError(f"SequenceShard: cut points must start at 0 and not decrease, got {self.cuts}")

    @property
    def size(self) -> int:
        return len(self.cuts) - 1

    @property
    def total(self) -> int:
        return self.cuts[-1]

    @property
    def start(self) -> int:
        return self.cuts[self.rank]

    @property
    def end(self) -> int:
        return self.cuts[self.rank + 1]

    @property
    def lens(self) -> list[int]:
        return [b - a for a, b in zip(self.cuts, self.cuts[1:], strict=False)]

    @property
    def local_len(self) -> int:
        return self.end - self.start

    @classmethod
    def from_batch(cls, batch: dict[str, Any], group: Any) -> SequenceShard | None:
        """The shard a ``KimiVL.shard_batch`` micro-batch describes (None for an unsharded batch)."""
        if "sp_cuts" not in batch:
            return None
        return cls(
            cuts=tuple(int(c) for c in batch["sp_cuts"].tolist()),
            rank=int(batch["sp_rank"]),
            group=group,
            image_row_offset=int(batch["sp_image_rows"]),
        )


def check_group(shard: SequenceShard) -> None:
    """The process group must be the SP group the cut points were made for."""
    if dist.get_world_size(shard.group) != shard.size or dist.get_rank(shard.group) != shard.rank:
        raise ValueError(
            f"SequenceShard: cut for rank {shard.rank} of {shard.size}, but this process is rank "
            f"{dist.get_rank(shard.group)} of a group of {dist.get_world_size(shard.group)}"
        )


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` along dim 0 with uneven splits; the backward is the reverse exchange."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any
    ) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def _exchange(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], shard: SequenceShard
) -> torch.Tensor:
    return _AllToAll.apply(x, list(out_splits), list(in_splits), shard.group)


def heads_to_sequence(x: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """(T_local, H, D) with all heads of this rank's tokens -> (T, H/N, D): every token of this rank's
    head block, in sequence order."""
    n, (t_loc, h, d) = shard.size, x.shape
    if h % n:
        raise ValueError(f"sequence parallel: {h} heads cannot be split over {n} ranks")
    send = x.reshape(t_loc, n, h // n, d).transpose(0, 1).reshape(n * t_loc, h // n, d)
    return _exchange(send, shard.lens, [t_loc] * n, shard)


def sequence_to_heads(y: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """Inverse of ``heads_to_sequence``: (T, H/N, D) -> (T_local, H, D)."""
    n, (_, h_loc, d), t_loc = shard.size, y.shape, shard.local_len
    out = _exchange(y, [t_loc] * n, shard.lens, shard)
    return out.reshape(n, t_loc, h_loc, d).transpose(0, 1).reshape(t_loc, n * h_loc, d)


def gather_sequence(x: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """(T_local, D) -> (T, D): every rank's rows in sequence order (gradients return to their owners)."""
    n, t_loc = shard.size, x.shape[0]
    send = x.unsqueeze(0).expand(n, *x.shape).reshape(n * t_loc, *x.shape[1:])
    return _exchange(send, shard.lens, [t_loc] * n, shard)


class _AllReduceSum(torch.autograd.Function):
    """y = sum over the group of x; dL/dx = sum over the group of dL/dy (every rank's y is the same value,
    so each rank's loss term reaches every rank's x)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        g = grad.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def reduce_sum(x: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """Sum over the SP group; differentiable (the backward sums the gradients over the group)."""
    return _AllReduceSum.apply(x, shard.group)


TOKEN_FIELDS = ("input_ids", "labels", "position_ids")


def shard_tokens(batch: dict[str, Any], rank: int, size: int) -> dict[str, Any]:
    """Rank ``rank``'s slice of a packed text micro-batch: the per-token fields (``TOKEN_FIELDS``) cut at
    ``split_points``; ``cu_seqlens`` and every other field stay the whole micro-batch's, except
    ``pixel_values``, which is left out (not read: a loader may decode images lazily; ``KimiVL.shard_batch``
    adds the slice's); ``sp_cuts``, ``sp_rank`` and ``sp_image_rows`` (0) describe the slice
    (``SequenceShard.from_batch``)."""
    cuts = split_points(batch["input_ids"].shape[0], size)
    a, b = cuts[rank], cuts[rank + 1]
    out = {k: batch[k] for k in batch if k != "pixel_values"}
    for k in TOKEN_FIELDS:
        if k in batch:
            out[k] = batch[k][a:b]
    out["sp_cuts"] = torch.tensor(cuts, dtype=torch.int64)
    out["sp_rank"] = torch.tensor(rank, dtype=torch.int64)
    out["sp_image_rows"] = torch.tensor(0, dtype=torch.int64)
    return out


def sequence_parallel_groups(size: int) -> tuple[Any, int, int]:
    """SP groups of ``size`` consecutive ranks (one node's NVLink domain when size <= GPUs per node); every
    rank must call this (``new_group`` is collective). Returns (this rank's group, its rank there, its
    data-parallel index = rank // size)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if size < 1 or world % size:
        raise ValueError(f"sequence_parallel: {size} must divide the world size {world}")
    mine = None
    for k in range(world // size):
        ranks = list(range(k * size, (k + 1) * size))
        g = dist.new_group(ranks)
        if rank in ranks:
            mine = g
    return mine, rank % size, rank // size
