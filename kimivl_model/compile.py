"""Opt-in ``torch.compile`` of the repeated blocks (LM decoder layers, MoonViT blocks), in place.

``compile_blocks(model)`` calls ``nn.Module.compile`` on every ``DecoderLayer`` and ``MoonViTBlock`` it finds
(parameter names and checkpoints are unchanged: in-place compile wraps ``__call__`` only). The compiled
graphs cover the norms, projections, RoPE, router, expert dispatch/grouped GEMMs, SwiGLU and residuals;
these functions stay eager because their work is decided on the host from data:

- ``varlen_attention``: segment lengths (``cu_seqlens``) pick kernels and batch shapes; the fused varlen
  kernels (flash-attn, ``torch.nn.attention.varlen``) gain nothing from compilation;
- ``sequence_aux_loss``: its shapes follow the number of documents in the batch;
- the sequence-parallel exchanges (``heads_to_sequence``, ``sequence_to_heads``, ``gather_sequence``): their
  split sizes come from the host and they call ``torch.distributed`` inside an autograd function;
- ``swiglu_loop`` (the per-expert fallback where ``torch._grouped_mm`` is not used, e.g. CPU): its
  Python loop follows the per-expert token counts.

Without this, every new document mix would recompile. With it, the first batch with a different number of
documents recompiles once with ``cu_seqlens``' length dynamic (torch's automatic dynamic shapes); later
mixes reuse those graphs. Semantics are unchanged (the same ops, fused):
``tests/unit/test_compile.py`` checks loss and gradients against the eager model. Measured gains are on
the CUDA path (docs/PERFORMANCE.md, ``bench.gpu``); on CPU the first call costs tens of seconds.
"""

from __future__ import annotations

import torch
from torch import nn

_EAGER_PATCHED = False


def _keep_host_driven_functions_eager() -> None:
    """Mark the data-driven functions as not traceable (idempotent; no effect outside torch.compile)."""
    global _EAGER_PATCHED
    if _EAGER_PATCHED:
        return
    import kimivl_model.attention as attention
    import kimivl_model.mla as mla
    import kimivl_model.moe as moe
    import kimivl_model.moonvit as moonvit

    eager_attn = torch.compiler.disable(attention.varlen_attention)
    mla.varlen_attention = eager_attn
    moonvit.varlen_attention = eager_attn
    moe.sequence_aux_loss = torch.compiler.disable(moe.sequence_aux_loss)
    moe.swiglu_loop = torch.compiler.disable(moe.swiglu_loop)
    for name in ("heads_to_sequence", "sequence_to_heads", "gather_sequence"):
        setattr(mla, name, torch.compiler.disable(getattr(mla, name)))
    _EAGER_PATCHED = True


def compile_blocks(model: nn.Module, *, dynamic: bool | None = None, mode: str | None = None) -> int:
    """Compile every decoder layer and ViT block of ``model`` in place; returns how many were compiled."""
    from kimivl_model.lm import DecoderLayer
    from kimivl_model.moonvit import MoonViTBlock

    _keep_host_driven_functions_eager()
    n = 0
    for m in model.modules():
        if isinstance(m, DecoderLayer | MoonViTBlock):
            m.compile(dynamic=dynamic, mode=mode)
            n += 1
    if n == 0:
        raise ValueError(f"compile_blocks: {type(model).__name__} has no DecoderLayer or MoonViTBlock")
    return n
