"""The fused head + cross-entropy against the unfused reference: loss and both gradients, every chunking,
scaled upstream gradients, partial requires_grad, no-grad evaluation, autocast, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimivl_model.linear_ce import linear_cross_entropy_sum


def _data(n=37, h=16, v=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.3
    labels = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, labels


def _reference(hidden, weight, labels, scale=1.0):
    h = hidden.double().requires_grad_(True)
    w = weight.double().requires_grad_(True)
    loss = F.cross_entropy(h @ w.t(), labels, reduction="sum")
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 7, 36, 37, 1000])
def test_loss_and_gradients_match_the_unfused_head(chunk):
    hidden, weight, labels = _data()
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, labels, scale=2.5)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = linear_cross_entropy_sum(h, w, labels, chunk)
    assert loss.dtype == torch.float32 and loss.requires_grad
    (loss * 2.5).backward()  # the upstream gradient scales the stored ones
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), ref_gw, rtol=1e-5, atol=1e-6)


def test_only_the_inputs_that_need_a_gradient_get_one():
    hidden, weight, labels = _data(seed=1)
    _, ref_gh, ref_gw = _reference(hidden, weight, labels)
    h = hidden.clone().requires_grad_(True)
    linear_cross_entropy_sum(h, weight, labels, 8).backward()
    torch.testing.assert_close(h.grad.double(), ref_gh, rtol=1e-5, atol=1e-6)
    w = weight.clone().requires_grad_(True)
    linear_cross_entropy_sum(hidden, w, labels, 8).backward()
    torch.testing.assert_close(w.grad.double(), ref_gw, rtol=1e-5, atol=1e-6)


def test_no_grad_evaluation_gives_the_same_loss():
    hidden, weight, labels = _data(seed=2)
    w = weight.clone().requires_grad_(True)
    with torch.no_grad():
        a = linear_cross_entropy_sum(hidden, w, labels, 5)
    assert not a.requires_grad
    b = linear_cross_entropy_sum(hidden, w, labels, 5)
    assert torch.equal(a, b.detach())


def test_under_autocast_it_matches_nn_linear_plus_fp32_ce():
    """The branch CUDA takes (autocast bf16 GEMMs, fp32 CE), exercised on CPU autocast: same loss and
    gradients as the unfused head run under the same autocast, to bf16 precision."""
    hidden, weight, labels = _data(n=64, h=32, v=97, seed=3)
    outs = []
    for fused in (False, True):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                loss = linear_cross_entropy_sum(h, w, labels, 16)
            else:
                loss = F.cross_entropy(F.linear(h, w).float(), labels, reduction="sum")
        loss.backward()
        assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
        outs.append((loss.detach(), h.grad, w.grad))
    (la, gha, gwa), (lb, ghb, gwb) = outs
    torch.testing.assert_close(lb, la, rtol=1e-3, atol=1e-2)
    for a, b in ((gha, ghb), (gwa, gwb)):
        assert (a - b).abs().max() <= 0.02 * a.abs().max()


def test_bad_input_is_a_clear_error():
    hidden, weight, labels = _data()
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy_sum(hidden, weight, labels, 0)
    with pytest.raises(ValueError, match=r"weight \(V, H\)"):
        linear_cross_entropy_sum(hidden, weight[:, :5], labels)
    with pytest.raises(ValueError, match="labels must be"):
        linear_cross_entropy_sum(hidden, weight, labels[:-1])
