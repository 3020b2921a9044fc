"""KimiVL wiring: placeholders replaced in order, count errors, packing invariance, freezing."""

import pytest
import torch

from kimivl_model.config import preset
from kimivl_model.image_processing import pack_images
from kimivl_model.vlm import KimiVL

CFG = preset("tiny")
PAD = CFG.media_pad_token_id


def _img(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, h * 14, w * 14, generator=g)


def _doc(n_pad, text):
    return torch.tensor([2, 6, 3, *[PAD] * n_pad, 4, *text])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return KimiVL(CFG, attn_backend="sdpa").eval()


def test_forward_shapes_and_placeholder_replacement(model):
    imgs = [_img(4, 6, 0), _img(2, 2, 1)]
    pv, grid = pack_images(imgs)
    n_tok = [h * w // 4 for h, w in grid.tolist()]
    ids = torch.cat([_doc(n_tok[0], [10, 11, 12]), _doc(n_tok[1], [13, 14])])
    cu = torch.tensor([0, 3 + n_tok[0] + 4, ids.numel()])
    out = model(ids, cu_seqlens=cu, pixel_values=pv, grid_hws=grid)
    assert out.logits.shape == (ids.numel(), CFG.lm.vocab_size)
    emb = model.embed(ids, pv, grid)
    feats = model.encode_images(pv, grid)
    torch.testing.assert_close(emb[ids == PAD], feats)  # in order
    plain = model.language_model.model.embed_tokens(ids)
    torch.testing.assert_close(emb[ids != PAD], plain[ids != PAD])


def test_placeholder_count_mismatch_is_a_clear_error(model):
    pv, grid = pack_images([_img(2, 2, 0)])
    ids = _doc(2, [10])  # the image gives 1 token, the text holds 2 placeholders
    with pytest.raises(ValueError, match="2 <\\|media_pad\\|> tokens.*give 1 features"):
        model(ids, pixel_values=pv, grid_hws=grid)
    with pytest.raises(ValueError, match="no images"):
        model(ids)


def test_multimodal_packing_invariance(model):
    """Two image documents packed together == each alone (images and documents never interact)."""
    a_img, b_img = _img(4, 2, 3), _img(2, 4, 4)
    a_ids, b_ids = _doc(2, [20, 21, 22]), _doc(2, [23, 24])
    pv, grid = pack_images([a_img, b_img])
    ids = torch.cat([a_ids, b_ids])
    cu = torch.tensor([0, a_ids.numel(), ids.numel()])
    packed = model(ids, cu_seqlens=cu, pixel_values=pv, grid_hws=grid).logits
    for img, d, sl in ((a_img, a_ids, slice(0, a_ids.numel())), (b_img, b_ids, slice(a_ids.numel(), None))):
        pv1, g1 = pack_images([img])
        alone = model(d, pixel_values=pv1, grid_hws=g1).logits
        torch.testing.assert_close(packed[sl], alone, atol=1e-5, rtol=1e-5)


def test_video_is_frames_through_moonvit(model):
    frames = [_img(2, 2, s) for s in range(3)]  # 3 frames, 1 token each
    pv, grid = pack_images(frames)
    ids = torch.tensor([2, 6, 3, PAD, 4, 2, 6, 3, PAD, 4, 2, 6, 3, PAD, 4, 30])
    out = model(ids, pixel_values=pv, grid_hws=grid)
    assert torch.isfinite(out.logits).all()


def test_set_trainable_freezes_everything_else():
    m = KimiVL(CFG, attn_backend="sdpa")
    m.set_trainable(["vit", "projector"])
    assert all(p.requires_grad for p in m.vision_tower.parameters())
    assert all(p.requires_grad for p in m.multi_modal_projector.parameters())
    assert not any(p.requires_grad for p in m.language_model.parameters())
    with pytest.raises(ValueError, match="unknown components \\['llm'\\]"):
        m.set_trainable(["llm"])


def test_rope_theta_switch_reaches_the_lm():
    m = KimiVL(CFG, attn_backend="sdpa").eval()
    ids = torch.arange(10, 40)
    before = m(ids).logits
    m.set_rope_theta(800_000.0)
    after = m(ids).logits
    assert m.language_model.rope_theta == 800_000.0
    torch.testing.assert_close(before[0], after[0])  # position 0 is not rotated
    assert not torch.allclose(before[5:], after[5:])


def test_tiny_fwd_bwd_packed_512_tokens_with_two_images_runs():
    """The tiny preset's size target: a packed 512-token batch with two images (timing lives in bench/)."""
    m = KimiVL(CFG, attn_backend="auto")
    pv, grid = pack_images([_img(8, 8, 0), _img(6, 4, 1)])
    n = [h * w // 4 for h, w in grid.tolist()]
    docs = [_doc(n[0], range(100, 140)), _doc(n[1], range(100, 140))]
    used = sum(d.numel() for d in docs)
    docs.append(torch.arange(100, 100 + 512 - used))
    ids = torch.cat(docs)
    cu = torch.tensor([0, *torch.tensor([d.numel() for d in docs]).cumsum(0).tolist()])
    labels = torch.cat([torch.cat((d[1:], torch.tensor([-100]))) for d in docs])
    labels[labels == PAD] = -100
    out = m(ids, cu_seqlens=cu, labels=labels, pixel_values=pv, grid_hws=grid, return_logits=False)
    (out.loss + out.aux_loss).backward()
    assert ids.numel() == 512
    assert m.vision_tower.patch_embed.proj.weight.grad is not None


@pytest.mark.parametrize("tie", [False, True])
def test_from_state_dict_adopts_the_checkpoint_and_matches_build_then_load(tie):
    """Built on the meta device, the checkpoint's tensors become the weights (no copy, no random init);
    the model is the one building + load_state_dict gives: same state, same buffers, same outputs."""
    import dataclasses

    cfg = dataclasses.replace(CFG, lm=dataclasses.replace(CFG.lm, tie_word_embeddings=tie))
    torch.manual_seed(0)
    ref = KimiVL(cfg, attn_backend="sdpa").eval()
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    m = KimiVL.from_state_dict(cfg, sd, attn_backend="sdpa").eval()
    lm = m.language_model
    assert (
        lm.model.embed_tokens.weight.data_ptr() == sd["language_model.model.embed_tokens.weight"].data_ptr()
    )
    assert (lm.lm_head.weight is lm.model.embed_tokens.weight) == tie  # the tie survives the adoption
    for (n, a), (rn, b) in zip(
        [*m.named_parameters(), *m.named_buffers()],
        [*ref.named_parameters(), *ref.named_buffers()],
        strict=True,
    ):
        assert n == rn and torch.equal(a, b) and a.requires_grad == b.requires_grad, n
    assert sorted(n for n, _ in m.named_buffers()) == sorted(n for n, _ in ref.named_buffers())  # RoPE too
    pv, grid = pack_images([_img(4, 6, 0)])
    ids = torch.cat([_doc(6, [10, 11, 12]), torch.tensor([20, 21, 22, 23])])
    cu = torch.tensor([0, 3 + 6 + 4, ids.numel()])
    with torch.no_grad():
        torch.testing.assert_close(
            m(ids, cu_seqlens=cu, pixel_values=pv, grid_hws=grid).logits,
            ref(ids, cu_seqlens=cu, pixel_values=pv, grid_hws=grid).logits,
            rtol=0,
            atol=0,
        )


def test_from_state_dict_falls_back_refuses_and_casts():
    torch.manual_seed(0)
    sd = KimiVL(CFG).state_dict()
    assert KimiVL.from_state_dict(CFG, sd, with_coca=True) is None  # the ViT stage's fresh CoCa head: build
    with pytest.raises(ValueError, match="unexpected keys.*'bogus.weight'"):
        KimiVL.from_state_dict(CFG, {**sd, "bogus.weight": torch.zeros(1)})
    coca = KimiVL(CFG, with_coca=True).state_dict()
    assert KimiVL.from_state_dict(CFG, coca) is not None  # a ViT-stage checkpoint without its CoCa head
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}
    m = KimiVL.from_state_dict(CFG, half)
    assert {p.dtype for p in m.parameters()} == {torch.float32}  # the model's dtype, as load_state_dict does
