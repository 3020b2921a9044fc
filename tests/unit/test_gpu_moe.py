"""The CUDA path of the MoE layer and of ``model.compile``: grouped dispatch (``torch._grouped_mm``) vs
per-token references, fp32 CUDA == CPU, bf16 autocast (fp32 router, grouped experts), deterministic
gather-only dispatch, the compiled LM vs eager, and the per-tensor host copy of ``cu_seqlens``.

Every test except the router one needs CUDA and is skipped without it (CPU CI skips them). On a GPU machine:

    python -m pytest tests/unit/test_gpu_moe.py tests/unit/test_gpu_path.py
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from kimivl_model.config import preset
from kimivl_model.moe import MoE, RoutedExperts
from tests.unit.test_gpu_path import CUDA, DEV, _cu, needs_cuda, rel_err
from tests.unit.test_moe import _randomize


# ----------------------------------------------------------------------------------------- MoE
def _moe_cfg(**kw):
    base = dict(
        hidden_size=64,
        moe_intermediate_size=32,
        num_routed_experts=8,
        num_experts_per_tok=2,
        num_shared_experts=1,
    )
    base.update(kw)
    return dataclasses.replace(preset("tiny").lm, **base)


def naive_routed(x, idx, w, gate, up, down):
    """y_t = sum_j w_tj down_e(silu(gate_e x_t) * up_e x_t), e = idx_tj, one (token, expert) at a time."""
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            acc = acc + w[t, j] * ((F.silu(gate[e] @ x[t]) * (up[e] @ x[t])) @ down[e].T)
        rows.append(acc)
    return torch.stack(rows)


@needs_cuda
@pytest.mark.parametrize(
    ("dtype", "impl"), [(torch.float32, "auto"), (torch.bfloat16, "auto"), (torch.bfloat16, "loop")]
)
def test_routed_experts_cuda_match_per_token_reference(dtype, impl):
    """Grouped dispatch (``torch._grouped_mm`` for bf16 'auto' on CUDA) == per-(token, expert) reference,
    forward and backward, with two experts that receive no token at all and uneven group sizes."""
    cfg = _moe_cfg()
    experts = RoutedExperts(cfg, impl=impl)
    _randomize(experts)
    g = torch.Generator().manual_seed(1)
    t, k = 96, 2
    idx = torch.stack([torch.randperm(6, generator=g)[:k] for _ in range(t)])  # experts 6, 7 stay empty
    w = torch.rand(t, k, generator=g)
    x = torch.randn(t, cfg.hidden_size, generator=g)
    gout = torch.randn(t, cfg.hidden_size, generator=g)

    ex = copy.deepcopy(experts).to(DEV, dtype)
    xg = x.to(DEV, dtype).requires_grad_()
    wg = w.to(DEV).requires_grad_()
    if dtype == torch.bfloat16 and impl == "auto":
        assert ex._use_grouped(xg, dtype) == hasattr(torch, "_grouped_mm")
    else:
        assert not ex._use_grouped(xg, dtype)
    y = ex(xg, idx.to(DEV), wg)
    y.backward(gout.to(DEV, dtype))
    assert y.dtype == dtype and y.is_cuda

    # the reference sees the same (rounded) weights and inputs, in fp64 on the CPU
    wts = [p.detach().double().cpu().requires_grad_() for p in (ex.gate_proj, ex.up_proj, ex.down_proj)]
    xr = xg.detach().double().cpu().requires_grad_()
    wr = w.double().requires_grad_()
    yr = naive_routed(xr, idx, wr, *wts)
    yr.backward(gout.to(dtype).double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    pairs = [
        ("y", y, yr),
        ("dx", xg.grad, xr.grad),
        ("dw", wg.grad, wr.grad),
        ("dgate", ex.gate_proj.grad, wts[0].grad),
        ("dup", ex.up_proj.grad, wts[1].grad),
        ("ddown", ex.down_proj.grad, wts[2].grad),
    ]
    for name, a, b in pairs:
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < tol, (name, rel_err(a, b))
    for p in (ex.gate_proj, ex.up_proj, ex.down_proj):  # experts without tokens get exactly zero gradient
        assert not p.grad[6:].any()


@needs_cuda
def test_grouped_mm_dispatch_at_a3b_expert_shapes():
    """torch._grouped_mm on the real expert shapes (hidden 2048, expert width 1408), bf16, 64 experts with
    uneven (incl. zero) group sizes: equals the per-expert loop."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    cfg = dataclasses.replace(preset("a3b").lm, num_layers=1)
    torch.manual_seed(0)
    with torch.device(DEV):
        grouped = RoutedExperts(cfg, impl="grouped").to(torch.bfloat16)
    loop = copy.deepcopy(grouped)
    loop.impl = "loop"
    t, k = 1000, cfg.num_experts_per_tok
    logits = torch.randn(t, cfg.num_routed_experts, device=DEV)
    logits[:, :3] -= 100.0  # experts 0-2 get nothing
    idx = logits.topk(k, dim=-1).indices
    w = torch.rand(t, k, device=DEV)
    x = torch.randn(t, cfg.hidden_size, device=DEV, dtype=torch.bfloat16)
    outs = []
    for m in (grouped, loop):
        xi = x.clone().requires_grad_()
        y = m(xi, idx, w)
        y.float().square().sum().backward()
        outs.append((y, xi.grad, m.gate_proj.grad, m.down_proj.grad))
    for name, a, b in zip(("y", "dx", "dgate", "ddown"), *outs, strict=True):
        assert rel_err(a, b) < 1e-2, (name, rel_err(a, b))


@needs_cuda
def test_moe_layer_cuda_fp32_matches_cpu():
    cfg = _moe_cfg()
    torch.manual_seed(0)
    cpu = MoE(cfg).train()
    _randomize(cpu)
    gpu = copy.deepcopy(cpu).to(DEV)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(128, cfg.hidden_size, generator=g)
    gout = torch.randn(128, cfg.hidden_size, generator=g)
    cu = torch.tensor([0, 50, 128])
    res = []
    for m, dev in ((cpu, "cpu"), (gpu, DEV)):
        xi = x.detach().clone().to(dev).requires_grad_()
        out, aux, load = m(xi, cu.to(dev))
        (out * gout.to(dev)).sum().add(aux).backward()
        res.append((out, aux, load, xi.grad, {n: p.grad for n, p in m.named_parameters()}))
    (o1, a1, l1, g1, p1), (o2, a2, l2, g2, p2) = res
    assert torch.equal(l1, l2.cpu())  # same routing
    torch.testing.assert_close(o2.cpu(), o1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a2.cpu(), a1, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g2.cpu(), g1, rtol=1e-5, atol=1e-5)
    for n in p1:
        torch.testing.assert_close(p2[n].cpu(), p1[n], rtol=1e-4, atol=1e-5, msg=n)


def test_router_scores_stay_fp32_under_autocast():
    """The router's sigmoid scores (and so the top-k choice) are fp32 even inside bf16 autocast, the way
    TrainEngine trains on GPU: autocast would otherwise run ``x.float() @ W.float().T`` in bf16 and flip
    routing decisions. Runs on CPU too (CPU autocast has the same matmul rule)."""
    from kimivl_model.moe import Router

    torch.manual_seed(0)
    router = Router(_moe_cfg())
    with torch.no_grad():
        router.weight.normal_(0.0, 0.125)
    x = torch.randn(256, router.weight.shape[1])
    for dev in ["cpu"] + (["cuda"] if CUDA else []):
        r, xd = router.to(dev), x.to(dev)
        idx0, w0, s0 = r(xd)
        with torch.autocast(dev, dtype=torch.bfloat16):
            idx1, w1, s1 = r(xd)
        assert s1.dtype == torch.float32 and w1.dtype == torch.float32, dev
        assert torch.equal(s1, s0) and torch.equal(idx1, idx0) and torch.equal(w1, w0), dev


@needs_cuda
def test_moe_layer_under_bf16_autocast_is_close_to_fp32():
    cfg = _moe_cfg()
    torch.manual_seed(0)
    m = MoE(cfg).train().to(DEV)
    _randomize(m)
    x = torch.randn(128, cfg.hidden_size, device=DEV)
    cu = torch.tensor([0, 50, 128], device=DEV)
    ref, _, ref_load = m(x, cu)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, aux, load = m(x, cu)
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and torch.isfinite(aux)
    assert torch.equal(load, ref_load)  # same routing (fp32 router)
    assert rel_err(out, ref) < 3e-2
    # fp32 weights under bf16 autocast take the grouped GEMM path (one bf16 cast of the expert weights)
    assert m.experts._use_grouped(x, torch.bfloat16) == hasattr(torch, "_grouped_mm")


@needs_cuda
def test_moe_dispatch_is_deterministic_on_cuda():
    """Gather-only dispatch/combine (no index_add atomics): two fwd+bwd passes give identical bits."""
    cfg = dataclasses.replace(preset("a3b").lm, num_layers=1)
    torch.manual_seed(0)
    with torch.device(DEV):
        m = MoE(cfg).train()
    x = torch.randn(2048, cfg.hidden_size, device=DEV)
    cu = torch.tensor([0, 700, 2048], device=DEV)
    runs = []
    for _ in range(2):
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, aux, _ = m(xi, cu)
        (out.float().square().mean() + aux).backward()
        runs.append([out.detach(), xi.grad, m.experts.gate_proj.grad, m.experts.down_proj.grad])
    for name, a, b in zip(("out", "dx", "dgate", "ddown"), *runs, strict=True):
        assert torch.equal(a, b), name


@needs_cuda
def test_compiled_lm_on_cuda_matches_eager_under_autocast():
    """``model.compile: true`` on the CUDA path (grouped experts, fused varlen attention): same loss and
    gradients as eager within bf16 noise; after one recompile (cu_seqlens' length becomes dynamic) a new
    document mix does not recompile."""
    from torch._dynamo.utils import counters

    from kimivl_model.compile import compile_blocks
    from kimivl_model.lm import KimiLM

    torch._dynamo.reset()
    cfg = dataclasses.replace(preset("small").lm, num_layers=2, first_k_dense=1)
    torch.manual_seed(0)
    with torch.device(DEV):
        eager = KimiLM(cfg).train()
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)

    def step(model, lens, seed):
        g = torch.Generator().manual_seed(seed)
        docs = [torch.randint(4, cfg.vocab_size, (n,), generator=g) for n in lens]
        labels = torch.cat([torch.cat([d[1:], d.new_full((1,), -100)]) for d in docs]).to(DEV)
        cu = torch.cumsum(torch.tensor([0, *lens]), 0).to(DEV)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(torch.cat(docs).to(DEV), cu_seqlens=cu, labels=labels, return_logits=False)
        (out.loss + out.aux_loss).backward()
        return out.loss.detach(), torch.cat(
            [p.grad.flatten() for p in model.parameters() if p.grad is not None]
        )

    counters.clear()
    # the first new document count recompiles once with cu_seqlens' length dynamic (automatic dynamic)
    for seed, lens in enumerate(([700, 324], [100, 400, 300, 224], [24, 500, 500])):
        le, ge = step(eager, lens, seed)
        lc, gc = step(compiled, lens, seed)
        assert abs(float(lc - le)) < 1e-2 * abs(float(le)), (float(lc), float(le))
        assert rel_err(gc, ge) < 5e-2
    graphs = counters["stats"]["unique_graphs"]
    step(compiled, [200, 200, 200, 200, 224], 9)
    assert counters["stats"]["unique_graphs"] == graphs, "a new document mix recompiled the layers"


@needs_cuda
def test_host_cu_seqlens_is_cached_per_tensor_and_version():
    """Every layer gets the same cu_seqlens: one device->host copy per tensor; an in-place edit is seen."""
    from kimivl_model.attention import host_cu_seqlens

    cu = _cu([3, 5], DEV)
    first = host_cu_seqlens(cu)
    assert first == [0, 3, 8] and host_cu_seqlens(cu) is first  # cached
    cu[1] = 4  # in-place edit bumps the version
    assert host_cu_seqlens(cu) == [0, 4, 8]
    assert host_cu_seqlens(_cu([3, 5], DEV)) == [0, 3, 8]  # another tensor with other values
