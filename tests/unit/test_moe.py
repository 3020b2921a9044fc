"""MoE: router rule, grouped dispatch vs a naive per-token loop, aux loss, aux-loss-free bias update."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from kimivl_model.config import preset
from kimivl_model.moe import (
    MoE,
    RoutedExperts,
    Router,
    SwiGLU,
    aux_free_bias_update,
    sequence_aux_loss,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _cfg(**kw):
    base = dict(hidden_size=16, moe_intermediate_size=12, num_routed_experts=8, num_experts_per_tok=2)
    base.update(kw)
    return dataclasses.replace(preset("tiny").lm, **base)


def _randomize(m: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def _naive_swiglu(x, wg, wu, wd):
    return (F.silu(x @ wg.T) * (x @ wu.T)) @ wd.T


def naive_routed(x, idx, w, experts: RoutedExperts):
    """Per token, per chosen expert: y_t = sum_j w_tj FFN_{idx_tj}(x_t)."""
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            acc = (
                acc
                + w[t, j]
                * _naive_swiglu(x[t : t + 1], experts.gate_proj[e], experts.up_proj[e], experts.down_proj[e])[
                    0
                ]
            )
        rows.append(acc)
    return torch.stack(rows)


def test_swiglu_matches_formula():
    torch.manual_seed(0)
    m = SwiGLU(16, 24)
    x = torch.randn(5, 16)
    ref = _naive_swiglu(x, m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)
    assert torch.allclose(m(x), ref, atol=1e-6)
    assert set(m.state_dict()) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}


def test_router_bias_selects_raw_scores_weight():
    cfg = _cfg(hidden_size=4, num_routed_experts=4, num_experts_per_tok=2, routed_scaling_factor=2.5)
    r = Router(cfg)
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    with torch.no_grad():
        r.weight.copy_(torch.diag(logits))  # x = ones -> logits as given
    x = torch.ones(1, 4)
    s = torch.sigmoid(logits)
    idx, w, scores = r(x)
    assert sorted(idx[0].tolist()) == [0, 1]
    assert torch.allclose(scores[0], s)
    # the bias makes expert 2 win over expert 1, but the weight uses expert 2's RAW score
    with torch.no_grad():
        r.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    idx, w, _ = r(x)
    chosen = idx[0].tolist()
    assert sorted(chosen) == [0, 2]
    expected = {0: 2.5 * s[0] / (s[0] + s[2]), 2: 2.5 * s[2] / (s[0] + s[2])}
    for j, e in enumerate(chosen):
        assert math.isclose(w[0, j].item(), expected[e].item(), rel_tol=1e-6)
    assert math.isclose(w.sum().item(), 2.5, rel_tol=1e-6)
    # without renormalisation: raw score times the scaling factor
    r2 = Router(dataclasses.replace(cfg, norm_topk_prob=False))
    r2.load_state_dict(r.state_dict())
    idx2, w2, _ = r2(x)
    for j, e in enumerate(idx2[0].tolist()):
        assert math.isclose(w2[0, j].item(), 2.5 * s[e].item(), rel_tol=1e-6)
    # the bias is a persistent buffer, not a parameter
    assert "e_score_correction_bias" in r.state_dict()
    assert all(p is not r.e_score_correction_bias for p in r.parameters())
    assert r.e_score_correction_bias.dtype == torch.float32


@pytest.mark.parametrize("combine", ["gather", "bag"])
@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_grouped_dispatch_matches_naive(impl, combine):
    if impl == "grouped" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    torch.manual_seed(0)
    cfg = _cfg()
    ex = RoutedExperts(cfg, impl=impl, combine=combine)
    _randomize(ex)
    t, k = 11, cfg.num_experts_per_tok
    x = torch.randn(t, cfg.hidden_size, requires_grad=True)
    idx = torch.stack([torch.randperm(5)[:k] for _ in range(t)])  # experts 5..7 stay empty
    idx[3] = torch.tensor([4, 1])
    w = torch.rand(t, k, requires_grad=True)
    out = ex(x, idx, w)
    go = torch.randn_like(out)
    out.backward(go)
    grads = [x.grad, w.grad, ex.gate_proj.grad, ex.up_proj.grad, ex.down_proj.grad]

    ref_ex = RoutedExperts(cfg, impl="loop")
    ref_ex.load_state_dict(ex.state_dict())
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = naive_routed(x2, idx, w2, ref_ex)
    ref.backward(go)
    ref_grads = [x2.grad, w2.grad, ref_ex.gate_proj.grad, ref_ex.up_proj.grad, ref_ex.down_proj.grad]
    assert torch.allclose(out, ref, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert ex.gate_proj.grad[5:].abs().max() == 0  # unused experts get zero gradient


def test_moe_forward_matches_naive_and_load():
    torch.manual_seed(0)
    cfg = _cfg(num_shared_experts=2, routed_scaling_factor=1.7)
    moe = MoE(cfg)
    _randomize(moe, seed=2)
    assert set(moe.state_dict()) == {
        "gate.weight",
        "gate.e_score_correction_bias",
        "experts.gate_proj",
        "experts.up_proj",
        "experts.down_proj",
        "shared_experts.gate_proj.weight",
        "shared_experts.up_proj.weight",
        "shared_experts.down_proj.weight",
    }
    assert moe.shared_experts.gate_proj.weight.shape == (2 * cfg.moe_intermediate_size, cfg.hidden_size)
    x = torch.randn(9, cfg.hidden_size)
    moe.eval()
    out, aux, load = moe(x, torch.tensor([0, 9]))
    idx, w, _ = moe.gate(x)
    se = moe.shared_experts
    ref = naive_routed(x, idx, w, moe.experts) + _naive_swiglu(
        x, se.gate_proj.weight, se.up_proj.weight, se.down_proj.weight
    )
    assert torch.allclose(out, ref, atol=1e-5)
    assert aux.item() == 0.0  # eval mode
    assert load.shape == (8,) and load.sum().item() == 9 * cfg.num_experts_per_tok
    assert torch.equal(load, torch.bincount(idx.reshape(-1), minlength=8).float())
    assert MoE(_cfg(num_shared_experts=0)).shared_experts is None


def test_aux_loss_hand_example():
    # E=2, k=1; doc A = 2 tokens, doc B = 1 token
    scores = torch.tensor([[0.8, 0.2], [0.6, 0.6], [0.9, 0.1]])
    idx = torch.tensor([[0], [1], [0]])
    cu = torch.tensor([0, 2, 3])
    # doc A: f = 2/(1*2) * [1, 1] = [1, 1]; P = [(0.8 + 0.5)/2, (0.2 + 0.5)/2] -> L_A = 1.0
    # doc B: f = 2/(1*1) * [1, 0] = [2, 0]; P = [0.9, 0.1] -> L_B = 1.8 ; mean = 1.4
    assert math.isclose(sequence_aux_loss(scores, idx, cu).item(), 1.4, rel_tol=1e-6)


def _loop_aux(scores, idx, lens, e, k):
    total, start = 0.0, 0
    for n in lens:
        s = scores[start : start + n]
        f = [e / (k * n) * sum(int(i in idx[start + t].tolist()) for t in range(n)) for i in range(e)]
        p = [sum((s[t, i] / s[t].sum()).item() for t in range(n)) / n for i in range(e)]
        total += sum(fi * pi for fi, pi in zip(f, p, strict=True))
        start += n
    return total / len(lens)


def test_aux_loss_in_moe_matches_loop_and_alpha_zero():
    torch.manual_seed(0)
    cfg = _cfg(aux_loss_alpha=0.01)
    moe = MoE(cfg)
    _randomize(moe)
    moe.train()
    x = torch.randn(10, cfg.hidden_size, requires_grad=True)
    cu = torch.tensor([0, 3, 10])
    _, aux, _ = moe(x, cu)
    idx, _, scores = moe.gate(x)
    ref = 0.01 * _loop_aux(scores.detach(), idx, [3, 7], 8, 2)
    assert math.isclose(aux.item(), ref, rel_tol=1e-5)
    aux.backward()  # differentiable through the scores (P_i)
    assert moe.gate.weight.grad.abs().sum() > 0
    moe0 = MoE(dataclasses.replace(cfg, aux_loss_alpha=0.0))
    moe0.train()
    assert moe0(x, cu)[1].item() == 0.0


def test_bias_update_sign_rule():
    b = torch.zeros(4)
    # mean 5: errors [-5, 5, 0, 0] -> signs [-1, 1, 0, 0], mean 0
    new = aux_free_bias_update(b, torch.tensor([10.0, 0.0, 5.0, 5.0]), 0.1)
    assert torch.allclose(new, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    # mean 4: errors [3, 2, 1, -6] -> signs [1, 1, 1, -1], mean 0.5 -> [0.5, 0.5, 0.5, -1.5]
    new = aux_free_bias_update(torch.ones(4), torch.tensor([1.0, 2.0, 3.0, 10.0]), 0.01)
    assert torch.allclose(new, 1.0 + 0.01 * torch.tensor([0.5, 0.5, 0.5, -1.5]))
    with pytest.raises(ValueError, match="bias and load"):
        aux_free_bias_update(torch.zeros(4), torch.zeros(3), 0.1)


def test_bias_update_balances_skewed_load():
    cfg = _cfg()
    torch.manual_seed(0)
    r = Router(cfg)
    with torch.no_grad():
        r.weight.normal_(0.0, 1.0)
        w0, w1 = r.weight[0] / r.weight[0].norm(), r.weight[1] / r.weight[1].norm()
        x = torch.randn(512, cfg.hidden_size) + 1.5 * w0 + 1.0 * w1  # skewed toward experts 0 and 1

    def load_of():
        idx, _, _ = r(x)
        return torch.bincount(idx.reshape(-1), minlength=8).float()

    def cv(load):
        return (load.std(unbiased=False) / load.mean()).item()

    first = load_of()
    cvs = []
    with torch.no_grad():
        for _ in range(200):
            load = load_of()
            cvs.append(cv(load))
            r.e_score_correction_bias.copy_(aux_free_bias_update(r.e_score_correction_bias, load, 3e-3))
    last = load_of()
    assert cv(first) > 0.5
    assert sum(cvs[-20:]) / 20 < cv(first) / 2
    assert (last.max() / last.min()) < (first.max() / first.min().clamp(min=1)) / 2
    assert r.e_score_correction_bias[0] < 0 and abs(r.e_score_correction_bias.sum().item()) < 1e-4


def test_combine_kernels_agree_and_cpu_default_is_bag():
    """``bag`` (CPU default) and ``gather`` (CUDA default) compute the same output and gradients, up to
    float summation order, on the small preset's shapes; a wrong name is refused."""
    cfg = _cfg(hidden_size=64, moe_intermediate_size=48, num_routed_experts=16, num_experts_per_tok=4)
    assert RoutedExperts(cfg).combine == "auto"
    from kimivl_model.moe import _combine_impl

    assert _combine_impl("auto", torch.zeros(1)) == "bag"
    with pytest.raises(ValueError, match="RoutedExperts.combine: unknown 'scatter'"):
        RoutedExperts(cfg, combine="scatter")
    outs = []
    for combine in ("gather", "bag"):
        torch.manual_seed(3)
        ex = RoutedExperts(cfg, combine=combine)
        x = torch.randn(300, 64, requires_grad=True)
        idx = torch.stack([torch.randperm(16)[:4] for _ in range(300)])
        w = torch.rand(300, 4, requires_grad=True)
        out = ex(x, idx, w)
        out.backward(torch.randn_like(out))
        outs.append([out.detach(), x.grad, w.grad, ex.gate_proj.grad, ex.up_proj.grad, ex.down_proj.grad])
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_swiglu_loop_node_is_bit_identical_to_per_expert_autograd():
    """``_SwiGLULoop`` (one autograd node, in-place outputs and weight gradients) against the per-expert
    ``F.linear``/``F.silu`` graph it replaces: same bits forward and backward, empty experts get zero
    weight gradients, frozen weights get none."""
    from kimivl_model.moe import swiglu_loop

    def per_expert(xs, counts, gate, up, down):
        outs = []
        for e, xe in enumerate(torch.split(xs, counts)):
            if xe.shape[0]:
                outs.append(F.linear(F.silu(F.linear(xe, gate[e])) * F.linear(xe, up[e]), down[e]))
        return torch.cat(outs)

    counts = [5, 0, 9, 1, 0, 7]
    e, h, i = len(counts), 24, 20
    base = [torch.randn(e, i, h) / 5, torch.randn(e, i, h) / 5, torch.randn(e, h, i) / 5]
    xs0, dy = torch.randn(sum(counts), h), torch.randn(sum(counts), h)
    for frozen in (False, True):
        results = []
        for fn in (per_expert, swiglu_loop):
            ws = [b.clone().requires_grad_(not frozen) for b in base]
            xs = xs0.clone().requires_grad_()
            y = fn(xs, counts, *ws)
            y.backward(dy)
            results.append([y.detach(), xs.grad] + [w.grad for w in ws])
        (y_a, dx_a, *dw_a), (y_b, dx_b, *dw_b) = results
        assert torch.equal(y_a, y_b) and torch.equal(dx_a, dx_b)
        if frozen:
            assert all(g is None for g in dw_a + dw_b)
            continue
        for ga, gb in zip(dw_a, dw_b, strict=True):
            assert torch.equal(ga, gb)
            assert gb[1].abs().max() == 0 and gb[4].abs().max() == 0


def test_dispatch_and_combine_gathers_gradcheck():
    """The custom permutation gathers (no index_add in backward) have exact gradients (fp64 gradcheck)."""
    from kimivl_model.moe import DispatchRows, PermuteRows

    torch.manual_seed(0)
    t, k, h = 5, 3, 4
    flat = torch.randint(0, 4, (t * k,))
    order = torch.argsort(flat, stable=True)
    inv = torch.argsort(order)
    x = torch.randn(t, h, dtype=torch.float64, requires_grad=True)
    ys = torch.randn(t * k, h, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: DispatchRows.apply(a, order, inv, k), (x,))
    assert torch.autograd.gradcheck(lambda a: DispatchRows.apply(a, order, inv, k, "bag"), (x,))
    w = torch.rand(t, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(  # the CPU combine: gather + weights + sum over the k slots in one op
        lambda a, b: F.embedding_bag(inv.view(t, k), a, mode="sum", per_sample_weights=b), (ys, w)
    )
    assert torch.autograd.gradcheck(lambda a: PermuteRows.apply(a, inv, order), (ys,))
    # the dispatch puts token order // k at sorted position p; the permutation undoes the sort
    torch.testing.assert_close(DispatchRows.apply(x, order, inv, k), x[order // k])
    torch.testing.assert_close(PermuteRows.apply(ys[order], inv, order), ys)
