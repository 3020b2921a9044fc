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
