"""KimiLM: names, packing invariance, causality, RoPE theta switch, loss paths, checkpointing, counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from kimivl_model.config import preset
from kimivl_model.lm import KimiLM, lm_param_counts, positions_from_cu_seqlens


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _cfg(**kw):
    base = dict(num_layers=3, vocab_size=512)  # layer 0 dense, layers 1-2 MoE
    base.update(kw)
    return dataclasses.replace(preset("tiny").lm, **base)


def _model(seed: int = 0, **kw) -> KimiLM:
    torch.manual_seed(seed)
    m = KimiLM(_cfg(**kw))
    with torch.no_grad():  # larger init than 0.02 so that attention and routing are far from uniform
        for name, p in m.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0.0, 0.08)
    return m


def test_positions_from_cu_seqlens():
    assert positions_from_cu_seqlens(torch.tensor([0, 3, 3, 5])).tolist() == [0, 1, 2, 0, 1]


def test_state_dict_names():
    m = KimiLM(_cfg())
    sd = m.state_dict()
    for key in [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.0.self_attn.kv_a_layernorm.weight",
        "model.layers.0.self_attn.kv_b_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.1.mlp.experts.gate_proj",
        "model.layers.1.mlp.experts.up_proj",
        "model.layers.1.mlp.experts.down_proj",
        "model.layers.1.mlp.shared_experts.gate_proj.weight",
    ]:
        assert key in sd, key
    params = dict(m.named_parameters())
    assert "model.layers.1.mlp.gate.e_score_correction_bias" not in params
    assert not any("rotary" in k for k in sd)  # the RoPE table is not checkpointed
    assert m.lm_head.is_output_head
    cfg = m.cfg
    assert sd["model.layers.1.mlp.experts.down_proj"].shape == (
        cfg.num_routed_experts,
        cfg.hidden_size,
        cfg.moe_intermediate_size,
    )
    tied = KimiLM(_cfg(tie_word_embeddings=True))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_input_validation_and_embeds_path():
    m = _model().eval()
    ids = torch.randint(0, 512, (6,))
    with pytest.raises(ValueError, match="exactly one"):
        m()
    with pytest.raises(ValueError, match="exactly one"):
        m(ids, inputs_embeds=torch.zeros(6, m.cfg.hidden_size))
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(ids, cu_seqlens=torch.tensor([0, 5]))
    with torch.no_grad():
        a = m(ids).logits
        b = m(inputs_embeds=m.model.embed_tokens(ids)).logits
    assert torch.equal(a, b)


def test_packing_invariance():
    m = _model().eval()
    lens = [7, 13, 4]
    ids = torch.randint(0, 512, (sum(lens),))
    cu = torch.tensor([0, 7, 20, 24])
    with torch.no_grad():
        out = m(ids, cu_seqlens=cu)
        assert out.expert_load.shape == (2, m.cfg.num_routed_experts)
        for i, n in enumerate(lens):
            s = int(cu[i])
            alone = m(ids[s : s + n]).logits
            assert torch.allclose(out.logits[s : s + n], alone, atol=1e-5), i


def test_causality_within_and_across_documents():
    m = _model().eval()
    ids = torch.randint(0, 512, (20,))
    cu = torch.tensor([0, 8, 20])
    t = 12  # inside document 2 (positions 8..19)
    ids2 = ids.clone()
    ids2[t] = (ids[t] + 1) % 512
    with torch.no_grad():
        a, b = m(ids, cu_seqlens=cu).logits, m(ids2, cu_seqlens=cu).logits
    assert torch.allclose(a[:t], b[:t], atol=1e-6)  # earlier tokens and all of document 1
    assert not torch.allclose(a[t:], b[t:], atol=1e-4)
    assert (a[t + 1 :] - b[t + 1 :]).abs().amax(dim=-1).min() > 0  # every later token of doc 2 sees it


def test_rope_theta_switch():
    m = _model().eval()
    ids = torch.randint(0, 512, (10,))
    cu = torch.tensor([0, 1, 10])  # a single-token document, then a 9-token one
    with torch.no_grad():
        before = m(ids, cu_seqlens=cu).logits
        m.set_rope_theta(800000.0)
        after = m(ids, cu_seqlens=cu).logits
    assert m.rope_theta == 800000.0 and m.model.rotary.theta == 800000.0
    assert m.cfg.rope_theta == 50000.0  # the frozen config is untouched
    assert torch.allclose(before[0], after[0], atol=1e-6)  # position 0: rotation by 0
    assert not torch.allclose(before[2:], after[2:], atol=1e-4)
    with pytest.raises(ValueError, match="theta"):
        m.set_rope_theta(0.0)


@pytest.mark.parametrize("tied", [False, True])
def test_loss_paths_agree_and_ignore_index(tied):
    """The training path (fused head + CE, chunked) == full logits + F.cross_entropy: loss and gradients,
    also when the head shares the embedding matrix."""
    m = _model(tie_word_embeddings=tied)
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == tied
    m.train()
    ids = torch.randint(0, 512, (23,))
    labels = torch.randint(0, 512, (23,))
    labels[[0, 5, 6, 22]] = -100
    cu = torch.tensor([0, 9, 23])
    full = m(ids, cu_seqlens=cu, labels=labels)
    valid = labels != -100
    ref = F.cross_entropy(full.logits[valid].double(), labels[valid])
    assert full.num_loss_tokens.item() == 19
    assert torch.allclose(full.loss.double(), ref, rtol=1e-6)
    assert torch.allclose(full.loss_sum / full.num_loss_tokens, full.loss)
    g_full = torch.autograd.grad(full.loss, [m.lm_head.weight, m.model.embed_tokens.weight])

    m.loss_chunk_size = 5  # force several chunks
    chunked = m(ids, cu_seqlens=cu, labels=labels, return_logits=False)
    assert chunked.logits is None
    assert torch.allclose(chunked.loss, full.loss, rtol=1e-6, atol=0)
    assert torch.allclose(chunked.loss_sum, full.loss_sum, rtol=1e-6, atol=0)
    g_chunk = torch.autograd.grad(chunked.loss, [m.lm_head.weight, m.model.embed_tokens.weight])
    for a, b in zip(g_full, g_chunk, strict=True):
        assert torch.allclose(a, b, atol=1e-5 * a.abs().max().item(), rtol=1e-5)

    none = torch.full((23,), -100)
    for rl in (True, False):
        o = m(ids, cu_seqlens=cu, labels=none, return_logits=rl)
        assert o.loss.item() == 0.0 and o.num_loss_tokens.item() == 0


def test_expert_load_and_aux_loss():
    m = _model()
    m.train()
    ids = torch.randint(0, 512, (17,))
    out = m(ids, cu_seqlens=torch.tensor([0, 6, 17]))
    k = m.cfg.num_experts_per_tok
    assert torch.equal(out.expert_load.sum(dim=1), torch.full((2,), 17.0 * k))
    assert not out.expert_load.requires_grad
    assert out.aux_loss.item() > 0 and out.aux_loss.requires_grad
    m.eval()
    assert m(ids).aux_loss.item() == 0.0
    dense = KimiLM(_cfg(first_k_dense=3))
    assert dense(ids).expert_load.shape == (0, m.cfg.num_routed_experts)
    assert list(dense.moe_layers()) == []


def test_update_router_bias():
    m = _model()
    load = torch.tensor([[10.0, 0, 0, 0, 0, 0, 0, 6], [4.0] * 8])
    m.update_router_bias(load, rate=0.1)
    b1, b2 = (moe.gate.e_score_correction_bias for moe in m.moe_layers())
    assert b1[0] < 0 and b1[1] > 0 and torch.equal(b2, torch.zeros(8))
    with pytest.raises(ValueError, match="expert_load"):
        m.update_router_bias(torch.zeros(3, 8))


def test_gradient_checkpointing_identical():
    ids = torch.randint(0, 512, (15,))
    labels = torch.randint(0, 512, (15,))
    cu = torch.tensor([0, 6, 15])
    results = []
    for ckpt in (False, True):
        m = _model(seed=3)
        m.train()
        m.model.gradient_checkpointing = ckpt
        out = m(ids, cu_seqlens=cu, labels=labels)
        (out.loss + out.aux_loss).backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-7), n


def test_init_weights_and_meta():
    m = KimiLM(_cfg())
    assert torch.equal(m.model.norm.weight, torch.ones(m.cfg.hidden_size))
    std = m.model.layers[1].mlp.experts.gate_proj.std().item()
    assert abs(std - m.cfg.initializer_range) < 0.002
    with torch.device("meta"):
        mm = KimiLM(_cfg())
    mm.to_empty(device="cpu")
    mm.init_weights()
    assert torch.isfinite(mm.model.rotary.inv_freq).all()
    assert mm(torch.tensor([1, 2, 3])).logits.isfinite().all()


def _meta_counts(cfg):
    with torch.device("meta"):
        m = KimiLM(cfg)
    total = sum(p.numel() for p in m.parameters())
    emb = m.model.embed_tokens.weight.numel() + (0 if cfg.tie_word_embeddings else m.lm_head.weight.numel())
    return total, total - emb


def test_a3b_param_counts_on_meta():
    cfg = preset("a3b").lm
    total, no_embed = _meta_counts(cfg)
    assert abs(total / 15.960e9 - 1) < 0.005, total
    assert abs(no_embed / 15.289e9 - 1) < 0.005, no_embed
    c = lm_param_counts(cfg)
    assert c["total"] == total and c["no_embed"] == no_embed
    assert c["embedding"] == 2 * cfg.vocab_size * cfg.hidden_size
    assert abs(c["activated_no_embed"] / 2.244e9 - 1) < 0.005, c["activated_no_embed"]


@pytest.mark.parametrize(
    "kw", [{}, {"q_lora_rank": 32, "tie_word_embeddings": True}, {"num_shared_experts": 0}]
)
def test_param_counts_match_model(kw):
    cfg = _cfg(**kw)
    total, no_embed = _meta_counts(cfg)
    c = lm_param_counts(cfg)
    assert (c["total"], c["no_embed"]) == (total, no_embed)
    # activated: one MoE layer's routed experts count k / E of their parameters
    m = KimiLM(cfg)
    routed = sum(p.numel() for moe in m.moe_layers() for p in moe.experts.parameters())
    k, e = cfg.num_experts_per_tok, cfg.num_routed_experts
    assert c["activated_no_embed"] == no_embed - routed + routed * k // e
