"""The activation plan (``tasks/train/activations.py``) against what autograd really saves and what a real
forward + backward really peaks at on CPU (MemTracker), for the tiny and small presets."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from kimivl_model.config import preset
from kimivl_model.lm import KimiLM
from kimivl_model.moonvit import MoonViT
from kimivl_model.projector import Projector
from tasks.train.activations import FP32, lm_layer_bytes, micro_batch_activations, vit_block_bytes


def _batch(vocab: int, lens: list[int]):
    t = sum(lens)
    ids = torch.randint(14, vocab, (t,))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    labels = torch.cat([torch.cat((d[1:], torch.tensor([-100]))) for d in ids.split(lens)])
    return ids, cu, labels


class _Saved:
    """Bytes of every distinct non-parameter storage autograd saves, by the module that was running."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.by_module: dict[str, int] = {}
        self._seen: set[int] = set()
        self._current = ""
        for name, mod in model.named_modules():
            mod.register_forward_pre_hook(lambda m, a, name=name: setattr(self, "_current", name))

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in self.skip and st.data_ptr() not in self._seen:
            self._seen.add(st.data_ptr())
            self.by_module[self._current] = self.by_module.get(self._current, 0) + st.nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def under(self, prefix: str) -> int:
        return sum(b for m, b in self.by_module.items() if m.startswith(prefix))


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_lm_layers_and_head_save_what_the_plan_counts(name):
    cfg = preset(name).lm
    model = KimiLM(cfg, expert_impl="loop").train()
    lens = [256, 128, 128]
    ids, cu, labels = _batch(cfg.vocab_size, lens)
    saved = _Saved(model)
    with saved.hooks():
        model(ids, cu_seqlens=cu, labels=labels, return_logits=False)
    t = sum(lens)
    for i in range(cfg.first_k_dense, cfg.num_layers):  # MoE layers: byte for byte up to the (docs, E) terms
        got = saved.under(f"model.layers.{i}.")
        want = lm_layer_bytes(cfg, True, FP32, "cpu") * t
        assert want <= got <= want + 4 * (len(lens) * (cfg.num_routed_experts + 2) + 1), (i, got, want)
    plan = micro_batch_activations(
        cfg, None, None, tokens=t, patches=0, lm_trains=True, head_trains=True, vit_trains=False,
        projector_trains=False, checkpointing=False, act=FP32, device="cpu",
    )  # fmt: skip
    total = sum(saved.by_module.values())
    assert plan.lm + plan.head == pytest.approx(total, rel=2e-3), (plan.as_dict(), total)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_vit_blocks_and_projector_save_what_the_plan_counts(name):
    vcfg = preset(name).vit
    vit = MoonViT(dataclasses.replace(vcfg, num_layers=2)).train()
    grids = torch.tensor([[16, 16], [8, 16], [8, 8]])
    p = int(grids.prod(1).sum())
    pixels = torch.randn(p, 3, vcfg.patch_size, vcfg.patch_size)
    saved = _Saved(vit)
    with saved.hooks():
        feats = vit(pixels, grids)
    assert saved.under("encoder.blocks.1.") == vit_block_bytes(vcfg, FP32) * p
    plan = micro_batch_activations(
        None, dataclasses.replace(vcfg, num_layers=2), None, tokens=0, patches=p, lm_trains=False,
        head_trains=False, vit_trains=True, projector_trains=False, checkpointing=False, act=FP32,
        device="cpu",
    )  # fmt: skip
    assert plan.vit == sum(saved.by_module.values())

    proj = Projector(preset(name).projector).train()
    saved = _Saved(proj)
    with saved.hooks():
        proj(feats.detach().requires_grad_(), grids)
    with_proj = micro_batch_activations(
        None, None, preset(name).projector, tokens=0, patches=p, lm_trains=False, head_trains=False,
        vit_trains=False, projector_trains=True, checkpointing=False, act=FP32, device="cpu",
    )  # fmt: skip
    assert with_proj.vit == sum(saved.by_module.values())


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("name", "checkpointing"), [("tiny", False), ("tiny", True), ("small", True)])
def test_plan_bounds_the_measured_peak_of_an_accumulating_micro_batch(name, checkpointing):
    """A second micro-batch on top of the first one's gradients (gradient accumulation, as in training):
    MemTracker's peak over its forward + backward <= weights + gradients + the activation plan <= 1.15x it."""
    cfg = preset(name).lm
    model = KimiLM(cfg, expert_impl="loop").train()
    model.model.gradient_checkpointing = checkpointing
    lens = [1024, 512, 512]
    ids, cu, labels = _batch(cfg.vocab_size, lens)
    out = model(ids, cu_seqlens=cu, labels=labels, return_logits=False)
    (out.loss + out.aux_loss).backward()
    del out
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        out = model(ids, cu_seqlens=cu, labels=labels, return_logits=False)
        (out.loss + out.aux_loss).backward()
    peak = max(dev["Total"] for dev in tracker.get_tracker_snapshot("peak").values())
    states = 2 * FP32 * sum(p.numel() for p in model.parameters())  # fp32 weights + gradients
    plan = micro_batch_activations(
        cfg, None, None, tokens=sum(lens), patches=0, lm_trains=True, head_trains=True, vit_trains=False,
        projector_trains=False, checkpointing=checkpointing, act=FP32, device="cpu",
    )  # fmt: skip
    assert peak <= states + plan.total <= 1.15 * peak, (peak, states, plan.as_dict())


def test_checkpointing_keeps_only_layer_inputs_and_frozen_paths_keep_nothing():
    cfg = preset("tiny").lm
    kw = dict(tokens=512, patches=0, head_trains=True, vit_trains=False, projector_trains=False, act=FP32)
    full = micro_batch_activations(cfg, None, None, lm_trains=True, checkpointing=False, device="cpu", **kw)
    ckpt = micro_batch_activations(cfg, None, None, lm_trains=True, checkpointing=True, device="cpu", **kw)
    assert ckpt.lm == FP32 * cfg.hidden_size * 512 * cfg.num_layers < full.lm
    assert ckpt.workspace == full.workspace and ckpt.head == full.head
    frozen = micro_batch_activations(
        cfg, None, None, lm_trains=False, checkpointing=False, device="cpu", **{**kw, "head_trains": False}
    )
    assert frozen.lm == 0 and frozen.workspace == 0
