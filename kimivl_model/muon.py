"""Muon optimizer, Moonlight variant: pure update math plus a thin ``torch.optim.Optimizer``.

Sources
- Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks" (blog post): SGD momentum
  with Nesterov, whose update direction is replaced by its nearest semi-orthogonal matrix, computed with a
  quintic Newton-Schulz iteration X <- aX + (bA + cA^2)X, A = X X^T, (a, b, c) = (3.4445, -4.7750, 2.0315),
  started from G / ||G||_F and run 5 times on the wide orientation (transposed when rows > cols).
- Liu et al. 2025, "Muon is Scalable for LLM Training" (Moonlight), Sec. 2.2: two changes that make Muon
  usable at scale without retuning AdamW hyper-parameters:
    (1) decoupled weight decay, W <- W (1 - lr wd);
    (2) per-matrix scale 0.2 * sqrt(max(rows, cols)), so the update RMS matches AdamW's typical 0.2-0.4
        (an exactly orthogonal (A, B) matrix O has RMS 1/sqrt(max(A, B))).
  Update: W <- W (1 - lr wd) - lr * 0.2 * sqrt(max(rows, cols)) * NS(momentum direction).
  Embeddings, the LM head and vectors (norms, biases) use AdamW with the same lr and wd (Sec. 2.2/3.1).
  Note: 5 quintic steps leave singular values in about (0.68, 1.13) for rectangular Gaussian inputs, so the
  measured update RMS is ~0.85-0.9 x (lr * 0.2), not exactly lr * 0.2.

Shape rules for the matrix view of a parameter with ndim >= 2:
- ndim == 2: the matrix itself (out, in);
- ndim == 3: a stack of independent matrices (E, out, in), e.g. MoE experts; each slice is orthogonalised
  and scaled on its own;
- ndim >= 4: a convolution weight (out, in, kh, kw) viewed as (out, in * kh * kw).

No ``torch.distributed`` here: the ZeRO-1 version (tasks/train/distributed_muon.py) calls the same
``apply_param_update_``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

NS_COEFFS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)  # Jordan et al. 2024
NS_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}

DEFAULTS: dict[str, Any] = {
    "weight_decay": 0.1,
    "momentum": 0.95,
    "nesterov": True,
    "ns_steps": 5,
    "ns_dtype": "fp32",  # Newton-Schulz arithmetic: "fp32" (TF32 on CUDA) or "bf16" (the reference codes' choice)
    "adamw_betas": (0.9, 0.95),
    "adamw_eps": 1e-8,
}


# ----------------------------------------------------------------------------------------- pure math
def zeropower_via_newtonschulz5(
    G: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Approximate the orthogonal polar factor U V^T of ``G`` (..., m, n), batched over leading dims.

    Each matrix is normalised by its own Frobenius norm (+ eps); the iteration runs on the (m <= n)
    orientation in ``dtype`` (fp32 by default, bf16 allowed on GPU); the result has G's shape and dtype.
    """
    if G.ndim < 2:
        raise ValueError(f"G: expected a tensor with ndim >= 2 (..., m, n), got shape {tuple(G.shape)}")
    if steps < 0:
        raise ValueError(f"steps: expected >= 0, got {steps}")
    a, b, c = NS_COEFFS
    X = G.to(dtype)  # (..., m, n)
    X = X / (torch.linalg.matrix_norm(X, ord="fro", keepdim=True) + eps)
    transposed = X.shape[-2] > X.shape[-1]
    if transposed:
        X = X.mT  # (..., n, m) with n < m: A below is the smaller Gram matrix
    for _ in range(steps):
        A = X @ X.mT  # (..., k, k), k = min(m, n)
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, cols) of the matrix (or of each stacked matrix) that Muon orthogonalises for ``shape``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"shape: Muon needs ndim >= 2, got {shape}")
    if len(shape) <= 3:
        return shape[-2], shape[-1]
    return shape[0], math.prod(shape[1:])


def as_matrices(t: Tensor) -> Tensor:
    """View ``t`` as (rows, cols) for ndim 2 or >= 4 (conv, flattened), or (E, rows, cols) for ndim 3."""
    if t.ndim in (2, 3):
        return t
    if t.ndim >= 4:
        return t.reshape(t.shape[0], -1)  # (out, in * kh * kw)
    raise ValueError(f"t: Muon needs ndim >= 2, got shape {tuple(t.shape)}")


def moonlight_scale(shape: Sequence[int]) -> float:
    """Moonlight's RMS-matching factor 0.2 * sqrt(max(rows, cols)) of the matrix view (Sec. 2.2)."""
    rows, cols = matrix_shape(shape)
    return 0.2 * math.sqrt(max(rows, cols))


def muon_direction(
    grad: Tensor,
    momentum_buffer: Tensor,
    beta: float = DEFAULTS["momentum"],
    nesterov: bool = DEFAULTS["nesterov"],
    ns_steps: int = DEFAULTS["ns_steps"],
    ns_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Momentum (buffer updated in place: buf = beta*buf + grad), Nesterov look-ahead, orthogonalisation.

    Returns the orthogonalised direction O with ``grad``'s shape (per-matrix for the shape rules above).
    """
    if grad.shape != momentum_buffer.shape:
        raise ValueError(
            f"momentum_buffer: expected shape {tuple(grad.shape)} (grad's), got {tuple(momentum_buffer.shape)}"
        )
    momentum_buffer.mul_(beta).add_(grad)
    direction = grad.add(momentum_buffer, alpha=beta) if nesterov else momentum_buffer
    ortho = zeropower_via_newtonschulz5(as_matrices(direction), steps=ns_steps, dtype=ns_dtype)
    return ortho.reshape(grad.shape)


def muon_step_(
    p: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor,
    lr: float,
    weight_decay: float,
    momentum: float = DEFAULTS["momentum"],
    nesterov: bool = DEFAULTS["nesterov"],
    ns_steps: int = DEFAULTS["ns_steps"],
    ns_dtype: torch.dtype = torch.float32,
) -> None:
    """In-place Moonlight Muon step: p <- p (1 - lr wd) - lr * 0.2 sqrt(max(rows, cols)) * O."""
    ortho = muon_direction(grad, momentum_buffer, momentum, nesterov, ns_steps, ns_dtype)  # like p
    p.mul_(1.0 - lr * weight_decay)
    p.add_(ortho.to(p.dtype), alpha=-lr * moonlight_scale(p.shape))


def adamw_step_(
    p: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """In-place AdamW step (Loshchilov & Hutter 2019), same math as ``torch.optim.AdamW``.

    ``step`` is the 1-based count including this step (for bias correction).
    """
    if step < 1:
        raise ValueError(f"step: expected >= 1 (1-based, this step included), got {step}")
    beta1, beta2 = betas
    p.mul_(1.0 - lr * weight_decay)  # decoupled weight decay
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias1 = 1.0 - beta1**step
    bias2_sqrt = math.sqrt(1.0 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-lr / bias1)


def apply_param_update_(p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
    """One optimizer update of ``p`` from ``grad`` by its group's rule; state created lazily in ``state``.

    Shared by ``Muon`` and the distributed version so both apply exactly the same math.
    """
    if group["use_muon"]:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        muon_step_(
            p,
            grad,
            state["momentum_buffer"],
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            ns_steps=group["ns_steps"],
            ns_dtype=NS_DTYPES[group.get("ns_dtype", "fp32")],
        )
    else:
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        adamw_step_(
            p,
            grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            step=state["step"],
            lr=group["lr"],
            betas=tuple(group["adamw_betas"]),
            eps=group["adamw_eps"],
            weight_decay=group["weight_decay"],
        )


def validate_param_group(group: dict[str, Any]) -> None:
    """Check a param group: needs ``use_muon`` (bool) and ``lr``; Muon params need ndim >= 2."""
    if "use_muon" not in group or not isinstance(group["use_muon"], bool):
        raise ValueError(f"param group: expected key 'use_muon' (bool), got keys {sorted(group)}")
    if not isinstance(group.get("lr"), (int, float)) or group["lr"] < 0:
        raise ValueError(f"param group: expected 'lr' >= 0, got {group.get('lr')!r}")
    if group.get("ns_dtype", "fp32") not in NS_DTYPES:
        raise ValueError(
            f"param group: 'ns_dtype' must be one of {sorted(NS_DTYPES)}, got {group['ns_dtype']!r}"
        )
    if group["use_muon"]:
        for i, p in enumerate(group["params"]):
            if p.ndim < 2:
                raise ValueError(
                    f"param group: Muon param {i} must have ndim >= 2, got shape {tuple(p.shape)}; "
                    "put it in a use_muon=False (AdamW) group"
                )


# ----------------------------------------------------------------------------------------- optimizer
class Muon(torch.optim.Optimizer):
    """Muon (Moonlight) for ``use_muon=True`` groups, AdamW for ``use_muon=False`` groups.

    Each param group carries ``use_muon``, ``lr``, ``weight_decay`` (0.1), ``momentum`` (0.95),
    ``nesterov`` (True), ``ns_steps`` (5), ``ns_dtype`` ("fp32"; "bf16" runs Newton-Schulz in bf16 as
    Jordan et al.'s and Moonlight's reference code do: ~2x the GEMM rate on GPUs, the direction within
    bf16 rounding of the fp32 one; momentum and the update itself stay fp32), ``adamw_betas``
    ((0.9, 0.95)), ``adamw_eps`` (1e-8).
    Build groups with ``build_param_groups``. Params whose ``grad`` is None are skipped.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, **defaults: Any) -> None:
        unknown = set(defaults) - set(DEFAULTS) - {"use_muon"}
        if unknown:
            raise ValueError(f"Muon: unknown hyper-parameters {sorted(unknown)}; expected {sorted(DEFAULTS)}")
        super().__init__(params, {**DEFAULTS, **defaults, "lr": lr})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        validate_param_group(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                apply_param_update_(p, p.grad, self.state[p], group)
        return loss


# ----------------------------------------------------------------------------------------- groups
def _adamw_by_structure(model: nn.Module) -> set[int]:
    """ids of params that must use AdamW given the modules that own them (any owner decides AdamW)."""
    adamw: set[int] = set()
    for mod_name, module in model.named_modules(remove_duplicate=False):
        listed = tuple(getattr(type(module), "_adamw_params", ()))
        for name in listed:
            if name not in module._parameters:
                raise ValueError(
                    f"{type(module).__name__}._adamw_params (module '{mod_name}'): '{name}' is not a "
                    f"parameter of that module; expected one of {sorted(module._parameters)}"
                )
        whole_module = isinstance(module, nn.Embedding) or getattr(module, "is_output_head", False) is True
        for name, p in module.named_parameters(recurse=False):
            if whole_module or name in listed or p.ndim < 2:
                adamw.add(id(p))
    return adamw


def build_param_groups(
    model: nn.Module, lr: float, weight_decay: float = DEFAULTS["weight_decay"], **group_kwargs: Any
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable params into a Muon group and an AdamW group by module structure.

    AdamW: params of ``nn.Embedding`` modules, of modules with ``is_output_head = True``, params with
    ndim < 2, and params named in their owning module's class attribute ``_adamw_params``. Muon: every
    other param with ndim >= 2. Shared params appear once (first name). Empty groups are left out; each
    group has ``names``. ``group_kwargs`` (e.g. momentum, adamw_betas) go into both groups.
    """
    adamw_ids = _adamw_by_structure(model)
    muon: dict[str, list[Any]] = {"params": [], "names": []}
    adam: dict[str, list[Any]] = {"params": [], "names": []}
    for name, p in model.named_parameters():  # deduplicates shared params
        if not p.requires_grad:
            continue
        target = adam if id(p) in adamw_ids else muon
        target["params"].append(p)
        target["names"].append(name)
    common = {"lr": lr, "weight_decay": weight_decay, **group_kwargs}
    groups = []
    if muon["params"]:
        groups.append({**muon, **common, "use_muon": True})
    if adam["params"]:
        groups.append({**adam, **common, "use_muon": False})
    return groups


def param_group_summary(groups: Iterable[dict[str, Any]]) -> dict[str, float | int]:
    """Counts of Muon- and AdamW-managed elements and tensors (log this: REFERENCE.md asks to check it)."""
    out: dict[str, float | int] = {"muon_params": 0, "muon_tensors": 0, "adamw_params": 0, "adamw_tensors": 0}
    for g in groups:
        kind = "muon" if g["use_muon"] else "adamw"
        out[f"{kind}_params"] += sum(p.numel() for p in g["params"])
        out[f"{kind}_tensors"] += len(g["params"])
    total = out["muon_params"] + out["adamw_params"]
    out["muon_fraction"] = out["muon_params"] / total if total else 0.0
    return out
