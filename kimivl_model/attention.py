"""Variable-length (packed) attention with interchangeable backends and one semantics.

Packed sequences (NaViT images, packed LM documents) are a flat token axis plus ``cu_seqlens``
(``cumsum([0, len_1, len_2, ...])``, int32/int64). Attention never crosses a segment boundary; with
``causal=True`` a token sees only earlier tokens of its own segment.

Backends (``backend=``):
- ``"flash"``: ``flash_attn.flash_attn_varlen_func`` (CUDA, fp16/bf16, optional ``gpu`` extra).
- ``"torch_varlen"``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16; torch's own
  FlashAttention-2 varlen kernel, no extra package). Measured on an H100 (``bench.gpu``): 2.7-9x faster
  than per-segment SDPA on mixed document lengths (docs/PERFORMANCE.md).
- ``"sdpa"``: the fallback for any device: segments grouped by length, one
  ``scaled_dot_product_attention`` call per distinct length (no cross-segment work at all; measured
  fastest on CPU, ../shared/STACK.md and ``bench.attention``), on views of the packed tensors.
- ``"sdpa_masked"``: one SDPA call with a dense block-diagonal boolean mask (O(T^2) memory; reference and
  benchmark baseline).
- ``"auto"``: on CUDA in half precision (or under CUDA autocast): flash when installed, else torch_varlen
  when this torch has it; sdpa otherwise (CPU, fp32).

Under CUDA autocast, q/k/v are cast to the autocast dtype before any backend runs: exactly what SDPA does
under autocast anyway, so every backend computes in the same precision.

Head dims: MLA has q/k head dim (192) != v head dim (128). Every backend zero-pads v to the q/k head dim
and slices the output (exact: the padded channels of the output are zero-weighted sums of zeros). This
lets flash-attn (which needs equal dims) and CPU's fused SDPA kernel (which falls back to the slow math
path on unequal dims) run, and keeps the backends numerically interchangeable.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
import math
import weakref

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "torch_varlen", "sdpa", "sdpa_masked")
_HALF = (torch.float16, torch.bfloat16)


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


@functools.lru_cache(maxsize=1)
def _torch_varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def torch_varlen_available() -> bool:
    """True when this torch ships ``torch.nn.attention.varlen.varlen_attn`` (its kernels need CUDA)."""
    return _torch_varlen_fn() is not None


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend: unknown {backend!r} (expected one of {BACKENDS})")
    if backend == "auto":
        if q.is_cuda and q.dtype in _HALF:
            if flash_attn_available():
                return "flash"
            if torch_varlen_available():
                return "torch_varlen"
        return "sdpa"
    if backend == "flash" and not (q.is_cuda and flash_attn_available()):
        raise RuntimeError("attention backend 'flash' needs CUDA and the flash-attn package (extra 'gpu')")
    if backend == "torch_varlen" and not (q.is_cuda and torch_varlen_available()):
        raise RuntimeError(
            "attention backend 'torch_varlen' needs CUDA and torch.nn.attention.varlen (torch >= 2.10)"
        )
    return backend


_HOST_CU: dict[int, tuple[weakref.ref, int, list[int]]] = {}


def host_cu_seqlens(cu: torch.Tensor) -> list[int]:
    """``cu.tolist()``, cached per tensor object and version: every layer of a forward gets the same
    ``cu_seqlens``, so a CUDA tensor costs one device->host sync per forward instead of one per layer."""
    if not cu.is_cuda:
        return cu.tolist()
    hit = _HOST_CU.get(id(cu))
    if hit is not None and hit[0]() is cu and hit[1] == cu._version:
        return hit[2]
    values = cu.tolist()
    if len(_HOST_CU) >= 64:
        _HOST_CU.clear()
    _HOST_CU[id(cu)] = (weakref.ref(cu), cu._version, values)
    return values


def _max_len(host: list[int]) -> int:
    return max((b - a for a, b in itertools.pairwise(host)), default=0)


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
    host_q = host_cu_seqlens(cu_seqlens_q)  # one device->host copy per cu_seqlens tensor, not per layer
    host_k = host_q if cu_seqlens_k is None else host_cu_seqlens(cu_k)
    if host_q[-1] != q.shape[0] or host_k[-1] != k.shape[0]:
        raise ValueError(
            f"cu_seqlens end ({host_q[-1]}, {host_k[-1]}) must equal token counts ({q.shape[0]}, {k.shape[0]})"
        )
    self_attn = host_q == host_k
    if causal and not self_attn:
        raise ValueError("causal varlen attention requires identical q/k segments (self-attention)")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    dv = v.shape[-1]
    if dv < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))  # exact; see module docstring
    elif dv > q.shape[-1]:
        pad = dv - q.shape[-1]
        q, k = F.pad(q, (0, pad)), F.pad(k, (0, pad))  # zero channels add nothing to q.k
    if q.is_cuda and torch.is_autocast_enabled("cuda"):
        dt = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    name = resolve_backend(backend, q)
    if name == "flash":
        out = _flash(q, k, v, cu_seqlens_q, cu_k, host_q, host_k, causal, scale, max_seqlen_q, max_seqlen_k)
    elif name == "torch_varlen":
        out = _torch_varlen(
            q, k, v, cu_seqlens_q, cu_k, host_q, host_k, causal, scale, max_seqlen_q, max_seqlen_k
        )
    elif name == "sdpa":
        out = _sdpa_grouped(q, k, v, host_q, host_k, causal, scale)
    else:
        out = _sdpa_masked(q, k, v, cu_seqlens_q, cu_k, causal, scale)
    return out[..., :dv]


def _flash(q, k, v, cu_q, cu_k, host_q, host_k, causal, scale, max_q, max_k) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    d = q.shape[-1]
    pad = (-d) % 8  # flash-attn needs head dims that are multiples of 8
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    out = flash_attn_varlen_func(
        q,
        k,
        v,
        cu_q.to(device=q.device, dtype=torch.int32),
        cu_k.to(device=q.device, dtype=torch.int32),
        max_q or _max_len(host_q),
        max_k or _max_len(host_k),
        softmax_scale=scale,
        causal=causal,
    )
    return out[..., :d]


def _torch_varlen(q, k, v, cu_q, cu_k, host_q, host_k, causal, scale, max_q, max_k) -> torch.Tensor:
    """torch's varlen_attn; its keyword set changed across releases (is_causal vs window_size), so the
    causal mask and the scale are passed by whichever name this torch takes."""
    fn = _torch_varlen_fn()
    params = inspect.signature(fn).parameters
    d = q.shape[-1]
    pad = (-d) % 8  # FlashAttention kernels need head dims that are multiples of 8
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    kw = {}
    if "is_causal" in params:
        kw["is_causal"] = causal
    elif causal:
        kw["window_size"] = (-1, 0)
    if "scale" in params:
        kw["scale"] = scale
    elif not math.isclose(scale, q.shape[-1] ** -0.5):
        q = q * (scale / q.shape[-1] ** -0.5)
    cu_q, cu_k = cu_q.to(device=q.device, dtype=torch.int32), cu_k.to(device=q.device, dtype=torch.int32)
    max_q = max_q or _max_len(host_q)
    max_k = max_k or _max_len(host_k)
    return fn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)[..., :d]


def _sdpa_grouped(q, k, v, host_q, host_k, causal, scale) -> torch.Tensor:
    """One SDPA call per distinct (len_q, len_k) pair; segments of equal length are batched.

    No gather/scatter for the common case: q, k, v are split (views) into runs of consecutive segments of
    equal lengths, each run is viewed as (segments, len, H, D); only a length that occurs in several
    separated runs concatenates those runs. The output is one concatenation of the runs' outputs in
    order. (Autograd-wise: one split and one cat node, no full-size zero-filled gradients per segment.)
    """
    lens_q = [b - a for a, b in itertools.pairwise(host_q)]
    lens_k = [b - a for a, b in itertools.pairwise(host_k)]
    h, dv = q.shape[1], v.shape[-1]
    if len(lens_q) == 1 and lens_q[0] > 0 and lens_k[0] > 0:  # one segment: no split at all
        return _sdpa_batch(q[None], k[None], v[None], causal, scale)[0]
    runs: list[list[int]] = []  # [len_q, len_k, segments] of maximal runs of equal consecutive lengths
    for lq, lk in zip(lens_q, lens_k, strict=True):
        if runs and runs[-1][0] == lq and runs[-1][1] == lk:
            runs[-1][2] += 1
        else:
            runs.append([lq, lk, 1])
    if len(runs) == 1 and lens_q[0] > 0 and lens_k[0] > 0:  # equal lengths (a dense batch): plain views
        n, lq, lk = len(lens_q), lens_q[0], lens_k[0]
        qb, kb, vb = q.reshape(n, lq, h, -1), k.reshape(n, lk, h, -1), v.reshape(n, lk, h, -1)
        return _sdpa_batch(qb, kb, vb, causal, scale).reshape(n * lq, h, dv)
    qs = torch.split(q, [lq * n for lq, _, n in runs])
    ks = torch.split(k, [lk * n for _, lk, n in runs])
    vs = torch.split(v, [lk * n for _, lk, n in runs])
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (lq, lk, _) in enumerate(runs):
        groups.setdefault((lq, lk), []).append(i)
    outs: list[torch.Tensor | None] = [None] * len(runs)
    for (lq, lk), idx in groups.items():
        rows = [runs[i][2] * lq for i in idx]
        if lq == 0 or lk == 0:  # no queries, or queries without keys: output zero (as flash-attn)
            for i, r in zip(idx, rows, strict=True):
                outs[i] = q.new_zeros(r, h, dv)
            continue
        nseg = sum(runs[i][2] for i in idx)
        if len(idx) == 1:
            qb, kb, vb = qs[idx[0]], ks[idx[0]], vs[idx[0]]
        else:
            qb = torch.cat([qs[i] for i in idx])
            kb = torch.cat([ks[i] for i in idx])
            vb = torch.cat([vs[i] for i in idx])
        ob = _sdpa_batch(
            qb.reshape(nseg, lq, h, -1),
            kb.reshape(nseg, lk, h, -1),
            vb.reshape(nseg, lk, h, -1),
            causal,
            scale,
        ).reshape(nseg * lq, h, dv)
        for i, o in zip(idx, torch.split(ob, rows) if len(idx) > 1 else (ob,), strict=True):
            outs[i] = o
    return outs[0] if len(outs) == 1 else torch.cat(outs)


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
