"""Sequence parallelism (``kimivl_model/sequence_parallel.py``): slicing a packed multimodal micro-batch, and
2 gloo ranks against one process on packed multi-document sequences with images cut by the split: the loss,
the aux loss, the expert load, every hidden state and every parameter gradient within 1e-5 relative."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kimivl_model.config import preset
from kimivl_model.image_processing import pack_images
from kimivl_model.sequence_parallel import SequenceShard, split_points
from kimivl_model.vlm import KimiVL
from tests.gloo_ranks import run_ranks

CFG = preset("tiny")
PAD = CFG.media_pad_token_id
FIELDS = ("input_ids", "labels", "position_ids", "cu_seqlens", "pixel_values", "grid_hws")


def _img(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, h * 14, w * 14, generator=g)


def _batch(case: int) -> dict[str, torch.Tensor]:
    """Packed documents: text, image + text (the image long enough to be cut by the split), two images in
    one document, and a text tail; labels shifted per document with some prompt tokens unlabelled."""
    from kimivl_model.lm import positions_from_cu_seqlens

    g = torch.Generator().manual_seed(case)
    grids = [(4, 6), (2, 4), (2, 2)] if case == 0 else [(8, 6), (2, 2)]
    imgs = [_img(h, w, 10 * case + i) for i, (h, w) in enumerate(grids)]
    n_tok = [h * w // 4 for h, w in grids]

    def text(n):
        return torch.randint(10, CFG.lm.vocab_size, (n,), generator=g).tolist()

    docs = [text(7 if case == 0 else 24)]  # case 1: 2 ranks cut the first image
    docs.append([2, 6, 3, *[PAD] * n_tok[0], 4, *text(9)])
    if case == 0:
        docs.append(
            [*text(3), 2, 6, 3, *[PAD] * n_tok[1], 4, *text(2), 2, 6, 3, *[PAD] * n_tok[2], 4, *text(4)]
        )
    else:
        docs.append([2, 6, 3, *[PAD] * n_tok[1], 4, *text(5)])
    docs.append(text(12 + case))
    ids, labels, cu = [], [], [0]
    for d in docs:
        lab = [*d[1:], -100]
        lab = [-100 if (tok == PAD or i < 2) else lab[i] for i, tok in enumerate(d)]
        ids += d
        labels += lab
        cu.append(cu[-1] + len(d))
    pv, grid = pack_images(imgs)
    cu_t = torch.tensor(cu, dtype=torch.int64)
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "position_ids": positions_from_cu_seqlens(cu_t),
        "cu_seqlens": cu_t,
        "pixel_values": pv,
        "grid_hws": grid,
    }


def test_split_points():
    assert split_points(10, 2) == (0, 5, 10)
    assert split_points(11, 3) == (0, 4, 8, 11)
    assert split_points(2, 4) == (0, 1, 2, 2, 2)
    with pytest.raises(ValueError):
        split_points(5, 0)


@pytest.mark.parametrize(("case", "size"), [(0, 2), (0, 3), (0, 4), (1, 2), (1, 3)])
def test_shard_batch_gives_each_rank_its_tokens_and_image_rows(case, size):
    torch.manual_seed(0)
    model = KimiVL(CFG, attn_backend="sdpa").eval()
    b = _batch(case)
    full = model.embed(b["input_ids"], b["pixel_values"], b["grid_hws"])
    parts, cut_images = [], 0
    for r in range(size):
        sb = model.shard_batch(b, r, size)
        shard = SequenceShard.from_batch(sb, None)
        assert shard.rank == r and shard.total == b["input_ids"].numel()
        torch.testing.assert_close(sb["cu_seqlens"], b["cu_seqlens"])  # the whole sequence's boundaries
        for k in ("input_ids", "labels", "position_ids"):
            assert torch.equal(sb[k], b[k][shard.start : shard.end])
        emb = model.embed(sb["input_ids"], sb["pixel_values"], sb["grid_hws"], shard.image_row_offset)
        torch.testing.assert_close(emb, full[shard.start : shard.end])  # exactly its placeholders' features
        parts.append(sb)
        cut_images += int(sb["sp_image_rows"]) > 0
    assert sum(p["grid_hws"].shape[0] for p in parts) >= b["grid_hws"].shape[0]
    assert cut_images == (1 if (case, size) in ((0, 4), (1, 2)) else 0)  # the cases that cut an image
    text_only = {k: v for k, v in b.items() if k not in ("pixel_values", "grid_hws")}
    text_only["input_ids"] = torch.where(b["input_ids"] == PAD, 100, b["input_ids"])
    sb = model.shard_batch(text_only, 1, size)
    assert int(sb["sp_image_rows"]) == 0


def _sp_body(rank: int, out: Path) -> None:
    import torch.distributed as dist

    report = {}
    for case in (0, 1):
        for ckpt in (False, True):
            torch.manual_seed(0)
            model = KimiVL(CFG, attn_backend="sdpa").train()
            model.set_gradient_checkpointing(ckpt)
            b = _batch(case)
            ref = model(**{k: b[k] for k in FIELDS}, return_logits=False)
            n = ref.num_loss_tokens
            (ref.loss_sum / n + ref.aux_loss).backward()
            ref_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
            model.zero_grad(set_to_none=True)

            sb = model.shard_batch(b, rank, 2)
            shard = SequenceShard.from_batch(sb, None)
            o = model(**{k: sb[k] for k in FIELDS}, return_logits=False, shard=shard)
            # the engine's objective: CE sum / global count + aux (every rank holds the whole aux loss; the
            # all-reduce's backward sums the 2 ranks' aux gradients, hence / 2 here)
            (o.loss_sum / n + o.aux_loss / 2).backward()
            sums = torch.stack([o.loss_sum.detach(), o.num_loss_tokens.float()])
            dist.all_reduce(sums)
            load = o.expert_load.clone()
            dist.all_reduce(load)
            worst = 0.0
            for k, p in model.named_parameters():
                g = torch.zeros_like(p) if p.grad is None else p.grad.clone()
                dist.all_reduce(g)
                r = ref_grads.get(k, torch.zeros_like(p))
                worst = max(worst, float((g - r).abs().max() / r.abs().max().clamp(min=1e-12)))
            report[f"{case}-{ckpt}"] = {
                "loss": float(abs(sums[0] - ref.loss_sum) / ref.loss_sum),
                "tokens": [float(sums[1]), float(n)],
                "aux": float(abs(o.aux_loss - ref.aux_loss) / ref.aux_loss),
                "load": float((load - ref.expert_load).abs().max()),
                "hidden": float((o.hidden_states - ref.hidden_states[shard.start : shard.end]).abs().max()),
                "grad": worst,
                "grads": len(ref_grads),
            }
    (out / f"report{rank}.json").write_text(json.dumps(report))


def test_two_sp_ranks_equal_one_rank(tmp_path: Path):
    run_ranks(_sp_body, tmp_path, world=2, timeout=600)
    for rank in (0, 1):
        report = json.loads((tmp_path / f"report{rank}.json").read_text())
        assert len(report) == 4
        for case, r in report.items():
            assert r["tokens"][0] == r["tokens"][1], case
            assert r["grads"] > 20, case
            for key in ("loss", "aux", "grad"):
                assert r[key] < 1e-5, (case, key, r)
            assert r["load"] == 0.0, (case, r)
            assert r["hidden"] < 1e-5, (case, r)


def _saved_body(rank: int, out: Path) -> None:
    """What one MoE layer saves per rank under SP 2: the plan's per-token bytes times the slice's tokens."""
    from kimivl_model.lm import KimiLM
    from kimivl_model.sequence_parallel import shard_tokens
    from tasks.train.activations import FP32, lm_layer_bytes
    from tests.unit.test_activations import _batch, _Saved

    cfg = preset("tiny").lm
    torch.manual_seed(0)
    model = KimiLM(cfg, expert_impl="loop").train()
    lens = [256, 128, 129]
    ids, cu, labels = _batch(cfg.vocab_size, lens)
    sb = shard_tokens({"input_ids": ids, "labels": labels, "cu_seqlens": cu}, rank, 2)
    shard = SequenceShard.from_batch(sb, None)
    saved = _Saved(model)
    with saved.hooks():
        model(sb["input_ids"], cu_seqlens=cu, labels=sb["labels"], return_logits=False, shard=shard)
    rows = []
    for i in range(cfg.first_k_dense, cfg.num_layers):
        want = lm_layer_bytes(cfg, True, FP32, "cpu") * shard.local_len
        rows.append(
            [saved.under(f"model.layers.{i}."), want, 4 * (len(lens) * (cfg.num_routed_experts + 2) + 1)]
        )
    (out / f"saved{rank}.json").write_text(json.dumps(rows))


def test_sp_layers_save_what_the_activation_plan_counts_for_a_slice(tmp_path: Path):
    run_ranks(_saved_body, tmp_path, world=2, timeout=300)
    for rank in (0, 1):
        rows = json.loads((tmp_path / f"saved{rank}.json").read_text())
        assert rows
        for got, want, _ in rows:  # to 0.2%: what a layer saves is told apart by the module running then
            assert abs(got - want) <= 0.002 * want, (rank, got, want)


def _compiled_body(rank: int, out: Path) -> None:
    """``model.compile``'s path (``compile_blocks``: the SP exchanges stay eager) under SP 2 == eager, 1 rank."""
    import torch.distributed as dist

    from kimivl_model.compile import compile_blocks
    from kimivl_model.lm import KimiLM
    from kimivl_model.sequence_parallel import shard_tokens
    from tests.unit.test_activations import _batch

    cfg = preset("tiny").lm
    torch.manual_seed(0)
    model = KimiLM(cfg, attn_backend="sdpa").train()
    ids, cu, labels = _batch(cfg.vocab_size, [40, 31, 25])
    ref = model(ids, cu_seqlens=cu, labels=labels, return_logits=False)
    (ref.loss_sum / ref.num_loss_tokens + ref.aux_loss).backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compile_blocks(model)
    sb = shard_tokens({"input_ids": ids, "labels": labels, "cu_seqlens": cu}, rank, 2)
    o = model(
        sb["input_ids"],
        cu_seqlens=cu,
        labels=sb["labels"],
        return_logits=False,
        shard=SequenceShard.from_batch(sb, None),
    )
    (o.loss_sum / ref.num_loss_tokens + o.aux_loss / 2).backward()
    worst = 0.0
    for k, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        r = ref_grads[k]
        worst = max(worst, float((g - r).abs().max() / r.abs().max().clamp(min=1e-12)))
    (out / f"compiled{rank}.json").write_text(json.dumps({"grad": worst}))


@pytest.mark.timeout(900)
def test_compiled_blocks_under_sequence_parallel(tmp_path: Path):
    run_ranks(_compiled_body, tmp_path, world=2, timeout=800)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"compiled{rank}.json").read_text())["grad"] < 1e-4
