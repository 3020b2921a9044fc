"""Which weights may be held in bf16 while fp32 masters live in the optimizer (``train.working_weights: bf16``).

Under bf16 autocast over fp32 weights every micro-batch casts each matmul weight to bf16 again (on the H100
A3B-layer benchmark that was ~15 ms of copies in a 126 ms compiled step; ``docs/PERFORMANCE.md``). Holding
those weights in bf16 removes the casts and halves their memory; the optimizer keeps the fp32 master copy
of each (``tasks/train/distributed_muon.py``, on the rank that owns the matrix), updates it in fp32 and
writes the rounded result back.

Only weights that autocast would cast for a GEMM anyway are chosen, so the forward's arithmetic is the same
as under autocast over fp32 weights (the GEMM inputs are the same bf16 values, up to the rounding of the
master itself): ``nn.Linear`` weights and the routed experts' 3-D weights (whole or an expert-parallel shard). Everything else stays fp32:
embedding tables (their lookups feed the fp32 residual stream; a head tied to an embedding stays fp32 too),
norm weights, biases, the router (scores are computed in fp32), the ViT's patch convolution and position
table, CoCa's logit scale/bias. Frozen weights are never chosen (they would be rounded for good).

``frozen_matmul_weights`` picks the same kind of weights among the FROZEN ones (``train.frozen_weights:
bf16``): a frozen matmul weight is cast to bf16 by autocast at every use, so holding it in bf16 computes the
same GEMMs with half the memory; the training engine saves such weights from the phase's starting
checkpoint file, so no rounded value ever reaches a checkpoint.
"""

from __future__ import annotations

from torch import nn

from kimivl_model.moe import RoutedExperts
from kimivl_model.moe_ep import ExpertParallelExperts


def low_precision_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, param) of the trainable matmul weights that may be held in bf16, each tensor once."""
    return _matmul_weights(model, trainable=True)


def frozen_matmul_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, param) of the frozen matmul weights (same kinds as ``low_precision_weights``), each once."""
    return _matmul_weights(model, trainable=False)


def _matmul_weights(model: nn.Module, trainable: bool) -> list[tuple[str, nn.Parameter]]:
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    chosen: dict[int, tuple[str, nn.Parameter]] = {}
    for mod_name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            candidates = [("weight", m.weight)]
        elif isinstance(m, RoutedExperts | ExpertParallelExperts):
            candidates = [(n, getattr(m, n)) for n in ("gate_proj", "up_proj", "down_proj")]
        else:
            continue
        for attr, p in candidates:
            if (
                p.requires_grad == trainable
                and p.is_floating_point()
                and id(p) not in embedding
                and id(p) not in chosen
            ):
                chosen[id(p)] = (f"{mod_name}.{attr}" if mod_name else attr, p)
    return list(chosen.values())
