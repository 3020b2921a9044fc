"""Variable-length (packed) attention with interchangeable backends and one semantics.

Packed sequences (NaViT images, packed LM documents) are a flat token axis plus ``cu_seqlens``
(``cumsum([0, len_1, len_2, ...])``, int32/int64). Attention never crosses a segment boundary; with
``causal=True`` a token sees only earlier tokens of its own segment.

Backends (``backend=``):
- ``"flash"``: ``flash_attn.flash_attn_varlen_func`` (CUDA, fp16/bf16, optional ``gpu`` extra).
- ``"sdpa"``: the fallback for any device: segments grouped by length, one
  ``scaled_dot_product_attention`` call per distinct length (no cross-segment work at all; measured
  fastest on CPU, ../shared/STACK.md).
- ``"sdpa_masked"``: one SDPA call with a dense block-diagonal boolean mask (O(T^2) memory; reference and
  benchmark baseline).
- ``"auto"``: flash when installed, on CUDA and in half precision; sdpa otherwise.

Head dims: MLA has q/k head dim (192) != v head dim (128). Every backend zero-pads v to the q/k head dim
and slices the output (exact: the padded channels of the output are zero-weighted sums of zeros). This
lets flash-attn (which needs equal dims) and CPU's fused SDPA kernel (which falls back to the slow math
path on unequal dims) run, and keeps the backends numerically interchangeable.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "sdpa", "sdpa_masked")


@functools.lru_cache(maxsize=1)
def flash_attn_available() -> bool:
    """True when the optional flash-attn package imports (it needs CUDA)."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        import flash_attn  # noqa: F401
    except Exception:  # broken build or no CUDA runtime
        return False
    return True


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend: unknown {backend!r} (expected one of {BACKENDS})")
    if backend == "auto":
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_available():
            return "flash"
        return "sdpa"
    if backend == "flash" and not (q.is_cuda and flash_attn_available()):
        raise RuntimeError("attention backend 'flash' needs CUDA and the flash-attn package (extra 'gpu')")
    return backend


def _check_inputs(q, k, v, cu_q, cu_k) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be (tokens, heads, dim); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[1] != k.shape[1] or k.shape[1] != v.shape[1]:
        raise ValueError(
            f"q, k, v must have the same number of heads; got {q.shape[1]}, {k.shape[1]}, {v.shape[1]}"
        )
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k head dims differ: {q.shape[2]} vs {k.shape[2]}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k and v token counts differ: {k.shape[0]} vs {v.shape[0]}")
    if cu_q.dim() != 1 or cu_q.numel() < 2 or cu_k.numel() != cu_q.numel():
        raise ValueError("cu_seqlens must be 1-D with >= 2 entries, the same count for q and k")


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None = None,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention over packed segments.

    q: (Tq, H, Dqk), k: (Tk, H, Dqk), v: (Tk, H, Dv); cu_seqlens_q/k: (S+1,) -> out: (Tq, H, Dv).
    ``cu_seqlens_k`` defaults to ``cu_seqlens_q`` (self-attention). Causal attention is only defined for
    self-attention here (equal q/k segment lengths), so all backends agree on the mask alignment.
    """
    cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    _check_inputs(q, k, v, cu_seqlens_q, cu_k)
    if int(cu_seqlens_q[-1]) != q.shape[0] or int(cu_k[-1]) != k.shape[0]:
        raise ValueError(
            f"cu_seqlens end ({int(cu_seqlens_q[-1])}, {int(cu_k[-1])}) must equal token counts "
            f"({q.shape[0]}, {k.shape[0]})"
        )
    self_attn = cu_seqlens_k is None or torch.equal(cu_seqlens_q.cpu(), cu_k.cpu())
    if causal and not self_attn:
        raise ValueError("causal varlen attention requires identical q/k segments (self-attention)")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    dv = v.shape[-1]
    if dv < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))  # exact; see module docstring
    elif dv > q.shape[-1]:
        pad = dv - q.shape[-1]
        q, k = F.pad(q, (0, pad)), F.pad(k, (0, pad))  # zero channels add nothing to q.k
    name = resolve_backend(backend, q)
    if name == "flash":
        out = _flash(q, k, v, cu_seqlens_q, cu_k, causal, scale, max_seqlen_q, max_seqlen_k)
    elif name == "sdpa":
        out = _sdpa_grouped(q, k, v, cu_seqlens_q, cu_k, causal, scale)
    else:
        out = _sdpa_masked(q, k, v, cu_seqlens_q, cu_k, causal, scale)
    return out[..., :dv]


def _flash(q, k, v, cu_q, cu_k, causal, scale, max_q, max_k) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    d = q.shape[-1]
    pad = (-d) % 8  # flash-attn needs head dims that are multiples of 8
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    lens_q = (cu_q[1:] - cu_q[:-1]).tolist()
    lens_k = (cu_k[1:] - cu_k[:-1]).tolist()
    out = flash_attn_varlen_func(
        q,
        k,
        v,
        cu_q.to(torch.int32),
        cu_k.to(torch.int32),
        max_q or max(lens_q),
        max_k or max(lens_k),
        softmax_scale=scale,
        causal=causal,
    )
    return out[..., :d]


def _sdpa_grouped(q, k, v, cu_q, cu_k, causal, scale) -> torch.Tensor:
    """One SDPA call per distinct (len_q, len_k) pair; segments of equal length are batched."""
    lens_q = (cu_q[1:] - cu_q[:-1]).tolist()
    lens_k = (cu_k[1:] - cu_k[:-1]).tolist()
    starts_q, starts_k = cu_q[:-1].tolist(), cu_k[:-1].tolist()
    tq, h, _ = q.shape
    out = q.new_zeros(tq, h, v.shape[-1])
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k, strict=True)):
        if lq > 0:
            groups.setdefault((lq, lk), []).append(i)
    if len(groups) == 1 and len(lens_q) == 1:  # one segment: no gather
        return _sdpa_batch(q[None], k[None], v[None], causal, scale)[0]
    pieces, index = [], []
    for (lq, lk), segs in groups.items():
        iq = torch.cat([torch.arange(starts_q[s], starts_q[s] + lq) for s in segs]).to(q.device)
        if lk == 0:  # a query segment with no keys attends to nothing: output zero (flash-attn does too)
            pieces.append(q.new_zeros(len(segs) * lq, h, v.shape[-1]))
            index.append(iq)
            continue
        ik = torch.cat([torch.arange(starts_k[s], starts_k[s] + lk) for s in segs]).to(q.device)
        qb = q.index_select(0, iq).view(len(segs), lq, h, -1)
        kb = k.index_select(0, ik).view(len(segs), lk, h, -1)
        vb = v.index_select(0, ik).view(len(segs), lk, h, -1)
        pieces.append(_sdpa_batch(qb, kb, vb, causal, scale).reshape(len(segs) * lq, h, -1))
        index.append(iq)
    return out.index_copy(0, torch.cat(index), torch.cat(pieces))


def _sdpa_batch(q, k, v, causal, scale) -> torch.Tensor:
    # q: (B, Lq, H, D) -> SDPA on (B, H, L, D) -> (B, Lq, H, Dv)
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=scale
    )
    return o.transpose(1, 2)


def block_diagonal_mask(
    cu_q: torch.Tensor, cu_k: torch.Tensor, causal: bool, device: torch.device | None = None
) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where attention is allowed."""
    lens_q = cu_q[1:] - cu_q[:-1]
    lens_k = cu_k[1:] - cu_k[:-1]
    seg_q = torch.repeat_interleave(torch.arange(len(lens_q), device=device), lens_q.to(device))
    seg_k = torch.repeat_interleave(torch.arange(len(lens_k), device=device), lens_k.to(device))
    mask = seg_q[:, None] == seg_k[None, :]
    if causal:
        pos_q = torch.arange(int(cu_q[-1]), device=device) - cu_q.to(device)[seg_q]
        pos_k = torch.arange(int(cu_k[-1]), device=device) - cu_k.to(device)[seg_k]
        mask &= pos_k[None, :] <= pos_q[:, None]
    return mask


def _sdpa_masked(q, k, v, cu_q, cu_k, causal, scale) -> torch.Tensor:
    mask = block_diagonal_mask(cu_q, cu_k, causal, device=q.device)
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=mask[None, None],
        scale=scale,
    )[0]
    o = o.transpose(0, 1)  # (Tq, H, Dv)
    # rows with no allowed key (empty key segment) produce NaN under SDPA: define them as zero
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        o = o.masked_fill(empty[:, None, None], 0.0)
    return o
