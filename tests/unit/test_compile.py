"""``kimivl_model.compile.compile_blocks``: same loss and gradients as the eager model, unchanged parameter
names, and new document mixes run without recompiling the layers (attention/aux loss stay eager)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from kimivl_model.compile import compile_blocks
from kimivl_model.config import preset
from kimivl_model.lm import KimiLM


def _batch(lens: list[int], vocab: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(4, vocab, (n,), generator=g) for n in lens]
    labels = torch.cat([torch.cat([d[1:], d.new_full((1,), -100)]) for d in docs])
    cu = torch.cumsum(torch.tensor([0, *lens]), 0)
    return {"input_ids": torch.cat(docs), "labels": labels, "cu_seqlens": cu}


def _loss_and_grads(model: KimiLM, b: dict[str, torch.Tensor]):
    model.zero_grad(set_to_none=True)
    out = model(b["input_ids"], cu_seqlens=b["cu_seqlens"], labels=b["labels"], return_logits=False)
    (out.loss + out.aux_loss).backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.timeout(600)
def test_compiled_lm_matches_eager_and_handles_new_document_mixes():
    torch._dynamo.reset()
    cfg = dataclasses.replace(preset("tiny").lm, num_layers=2, first_k_dense=1)  # one dense, one MoE layer
    torch.manual_seed(0)
    eager = KimiLM(cfg).train()
    compiled = copy.deepcopy(eager)
    names = list(compiled.state_dict())
    assert compile_blocks(compiled) == cfg.num_layers
    assert list(compiled.state_dict()) == names  # checkpoints stay interchangeable

    from torch._dynamo.utils import counters

    counters.clear()
    # three different document mixes at the same packed length (the trainer's micro-batches)
    for seed, lens in enumerate(([100, 28], [40, 40, 30, 18], [7, 64, 57])):
        b = _batch(lens, cfg.vocab_size, seed)
        le, ge = _loss_and_grads(eager, b)
        lc, gc = _loss_and_grads(compiled, b)
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
        assert gc.keys() == ge.keys()
        for n in ge:
            torch.testing.assert_close(gc[n], ge[n], rtol=1e-4, atol=1e-6, msg=n)
    # the second mix's new document count recompiled once with cu_seqlens' length dynamic; after that a
    # new mix compiles nothing
    first = counters["stats"]["unique_graphs"]
    assert first > 0
    b = _batch([31, 33, 64], cfg.vocab_size, 9)
    _loss_and_grads(compiled, b)
    assert counters["stats"]["unique_graphs"] == first, "a new document mix recompiled the layers"


def test_compile_blocks_rejects_a_model_without_blocks():
    with pytest.raises(ValueError, match="no DecoderLayer"):
        compile_blocks(torch.nn.Linear(2, 2))


def test_recipe_compile_flag_compiles_the_phase_model(tmp_path):
    """``model.compile: true`` in a recipe -> build_model returns a model whose blocks are compiled."""
    from kimivl_model.lm import DecoderLayer
    from kimivl_model.moonvit import MoonViTBlock
    from tasks.recipe import load_recipe
    from tasks.train.runner import build_model

    recipe = load_recipe("configs/tiny.yaml")
    recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"compile": True})})
    model, _, _ = build_model(recipe, recipe.phases[0], tmp_path)
    blocks = [m for m in model.modules() if isinstance(m, DecoderLayer | MoonViTBlock)]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)
    plain, _, _ = build_model(load_recipe("configs/tiny.yaml"), recipe.phases[0], tmp_path)
    assert all(m._compiled_call_impl is None for m in plain.modules() if isinstance(m, DecoderLayer))
