"""CoCa head: SigLIP loss against a naive reference, caption-loss targets and causality, learning."""

from __future__ import annotations

import math

import pytest
import torch

from kimivl_model.coca import CoCaHead, CoCaOutput, SigLIPLoss, siglip_loss_from_logits
from kimivl_model.config import preset

VIT_HIDDEN = preset("tiny").vit.hidden_size


@pytest.fixture(scope="module")
def cfg():
    return preset("tiny").coca


def _head(cfg, seed=0):
    torch.manual_seed(seed)
    return CoCaHead(cfg, VIT_HIDDEN, attn_backend="sdpa")


def _batch(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    grids = torch.tensor([[2, 4], [4, 4], [2, 2]])
    feats = torch.randn(8 + 16 + 4, VIT_HIDDEN, generator=g)
    lens = [5, 3, 7]
    ids = torch.randint(0, cfg.vocab_size, (sum(lens),), generator=g)
    cu = torch.tensor([0, 5, 8, 15])
    return feats, grids, ids, cu


def test_forward_outputs_and_init(cfg):
    head = _head(cfg)
    out = head(*_batch(cfg))
    assert isinstance(out, CoCaOutput)
    for t in (out.loss, out.siglip_loss, out.caption_loss):
        assert t.dim() == 0 and torch.isfinite(t)
    torch.testing.assert_close(out.loss, out.siglip_loss + cfg.caption_loss_weight * out.caption_loss)
    assert cfg.caption_loss_weight == 2.0
    assert out.num_caption_tokens == 15
    assert out.logit_scale == pytest.approx(10.0) and out.logit_bias == pytest.approx(-10.0)
    # caption loss near log(vocab) at init (untrained decoder)
    assert abs(float(out.caption_loss.detach()) - math.log(cfg.vocab_size)) < 1.0


def test_temperature_and_bias_are_learnable_adamw_params(cfg):
    head = _head(cfg)
    params = dict(head.named_parameters())
    t, b = params["siglip.logit_scale_t"], params["siglip.logit_bias"]
    assert t.requires_grad and b.requires_grad
    assert float(t.detach()) == pytest.approx(math.log(10.0)) and float(b.detach()) == pytest.approx(-10.0)
    assert SigLIPLoss._adamw_params == ("logit_scale_t", "logit_bias")
    head(*_batch(cfg)).loss.backward()
    assert t.grad is not None and float(t.grad.abs()) > 0 and float(b.grad.abs()) > 0
    assert head.decoder.lm_head.is_output_head is True and head.decoder.lm_head.bias is None


def _naive_siglip(logits: list[list[float]]) -> float:
    n = len(logits)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = (1.0 if i == j else -1.0) * logits[i][j]
            total += math.log1p(math.exp(-z))  # -log sigmoid(z)
    return total / (n * n)


def test_siglip_loss_matches_naive_double_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 5, generator=g, dtype=torch.float64) * 4
    assert float(siglip_loss_from_logits(logits)) == pytest.approx(_naive_siglip(logits.tolist()), rel=1e-10)
    # the module: logits = exp(t) x.y^T + b, x = image rows
    mod = SigLIPLoss(0.3, -1.5)
    x = torch.nn.functional.normalize(torch.randn(4, 6, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(4, 6, generator=g), dim=-1)
    ref = [[math.exp(0.3) * float(x[i] @ y[j]) - 1.5 for j in range(4)] for i in range(4)]
    torch.testing.assert_close(mod.logits(x, y), torch.tensor(ref), atol=1e-5, rtol=1e-5)
    assert float(mod(x, y).detach()) == pytest.approx(_naive_siglip(ref), rel=1e-5)


def test_caption_loss_targets_only_caption_tokens(cfg):
    head = _head(cfg).eval()
    feats, grids, ids, cu = _batch(cfg)
    with torch.no_grad():
        per_tok = head.decoder(feats, grids, ids, cu)
        out = head(feats, grids, ids, cu)
    assert per_tok.shape == (ids.numel(),)  # exactly Tc targets, no prefix targets
    torch.testing.assert_close(out.caption_loss, per_tok.mean())
    # causality: changing caption token j of sample 0 leaves the losses of targets < j unchanged
    j = 3
    ids2 = ids.clone()
    ids2[j] = (ids[j] + 1) % cfg.vocab_size
    with torch.no_grad():
        per_tok2 = head.decoder(feats, grids, ids2, cu)
    torch.testing.assert_close(per_tok2[:j], per_tok[:j], atol=0, rtol=0)
    assert not torch.allclose(per_tok2[j:5], per_tok[j:5])
    torch.testing.assert_close(per_tok2[5:], per_tok[5:], atol=0, rtol=0)  # other samples untouched
    # the first caption token is predicted from the image prefix: it depends on image 0 only
    feats2 = feats.clone()
    feats2[:8] += torch.randn(8, VIT_HIDDEN)  # a shift would vanish under the LayerNorm
    with torch.no_grad():
        per_tok3 = head.decoder(feats2, grids, ids, cu)
    assert abs(float(per_tok3[0] - per_tok[0])) > 1e-6
    torch.testing.assert_close(per_tok3[5:], per_tok[5:], atol=0, rtol=0)


def test_packed_equals_each_sample_alone(cfg):
    head = _head(cfg, seed=1).eval()
    feats, grids, ids, cu = _batch(cfg)
    with torch.no_grad():
        packed_tok = head.decoder(feats, grids, ids, cu)
        packed_img = head.encode_image(feats, grids)
        packed_txt = head.encode_text(ids, cu)
        fs, ts = [0, 8, 24, 28], cu.tolist()
        for i in range(3):
            f, g = feats[fs[i] : fs[i + 1]], grids[i : i + 1]
            c, lc = ids[ts[i] : ts[i + 1]], torch.tensor([0, ts[i + 1] - ts[i]])
            torch.testing.assert_close(
                head.decoder(f, g, c, lc), packed_tok[ts[i] : ts[i + 1]], atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(head.encode_image(f, g)[0], packed_img[i], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(head.encode_text(c, lc)[0], packed_txt[i], atol=1e-5, rtol=1e-5)
    assert torch.allclose(packed_img.norm(dim=-1), torch.ones(3)) and torch.allclose(
        packed_txt.norm(dim=-1), torch.ones(3)
    )


def test_bad_inputs_raise(cfg):
    head = _head(cfg)
    feats, grids, ids, cu = _batch(cfg)
    with pytest.raises(ValueError, match="caption_cu_seqlens"):
        head(feats, grids, ids, torch.tensor([0, 5, 15]))
    with pytest.raises(ValueError, match="caption lengths"):
        head(feats, grids, ids, torch.tensor([0, 5, 5, 15]))
    with pytest.raises(ValueError, match="grid_hws"):
        head(feats[:-1], grids, ids, cu)


def test_a_few_steps_reduce_the_loss(cfg):
    head = _head(cfg, seed=2).train()
    feats, grids, ids, cu = _batch(cfg, seed=5)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        out = head(feats, grids, ids, cu)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0], losses
