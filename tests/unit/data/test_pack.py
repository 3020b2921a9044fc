"""Packing, mixtures and the resumable loader: boundaries, labels, efficiency, ratios, schedule, exact resume."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
import torch

from kimivl_model.config import preset
from kimivl_model.vlm import KimiVL
from tasks.data.loader import (
    MixtureConfig,
    PackedLoader,
    SourceSpec,
    tokens_by_modality,
    tokens_by_source,
)
from tasks.data.mixture import ShareSchedule
from tasks.data.pack import Document, MediaIds, Packer, pack_documents, packing_efficiency, split_document
from tasks.data.special_tokens import OWN_BPE_IDS, OWN_BPE_SPECIAL_IDS
from tasks.data.tokenize import TokenizeConfig, run_tokenize
from tasks.data.tokenizer import TokenizerConfig, run_train_tokenizer

from .records import make_record, picture, write_dataset

BOS, EOS, MS, MC, PAD, ME = (
    OWN_BPE_SPECIAL_IDS[t]
    for t in ("<|bos|>", "<|eos|>", "<|media_start|>", "<|media_content|>", "<|media_pad|>", "<|media_end|>")
)


# ------------------------------------------------------------------------------------ synthetic docs
def synth_doc(i: int, n_text: int, grids=(), video=False, seed=0, prefix=0) -> Document:
    """BOS, prefix text tokens, per grid a media block, n_text random text tokens (some not targets), EOS."""
    rng = np.random.default_rng([seed, i])
    ids, mask = [BOS, *range(20, 20 + prefix)], [False] + [True] * prefix
    for h, w in grids:
        n = (h // 2) * (w // 2)
        ids += [MS, 100, MC, *[PAD] * n, ME]
        mask += [False] * (n + 3) + [True]
    ids += [*rng.integers(14, 4096, n_text).tolist(), EOS]
    mask += [*(rng.random(n_text) < 0.8).tolist(), True]
    images = tuple({"data": b"", "width": w * 14, "height": h * 14, "format": "png"} for h, w in grids)
    return Document(
        id=f"d{i}",
        input_ids=np.array(ids, dtype=np.int64),
        loss_mask=np.array(mask, dtype=bool),
        images=images,
        grid_hws=tuple(grids),
        media_kind="video" if video else ("image" if grids else "none"),
        media_ids=MediaIds.of(OWN_BPE_IDS),
    )


def check_packing(seqs, docs, seq_len):
    """Naive reference: every segment is a contiguous slice of one document; labels/positions recomputed."""
    by_id = {d.id: d for d in docs}
    covered = defaultdict(list)
    for s in seqs:
        assert s.num_tokens <= seq_len and s.num_padding_tokens == 0
        cu = s.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == s.num_tokens and len(cu) == len(s.doc_ids) + 1
        n_img = 0
        for k, name in enumerate(s.doc_ids):
            doc_id, _, off = name.partition("@")
            d, off = by_id[doc_id], int(off or 0)
            a, b = cu[k], cu[k + 1]
            x = s.input_ids[a:b].tolist()
            assert x == d.input_ids[off : off + b - a].tolist()
            assert s.position_ids[a:b].tolist() == list(range(b - a))
            for t in range(b - a):
                last = t == b - a - 1
                want = -100 if last or not d.loss_mask[off + t + 1] else d.input_ids[off + t + 1]
                assert s.labels[a + t] == want
            # media blocks are whole inside the segment
            assert x.count(MS) == x.count(ME)
            n_img += x.count(MS)
            covered[doc_id].append((off, off + b - a))
        assert len(s.grid_hws) == len(s.images) == n_img
        pads = int((s.input_ids == PAD).sum())
        assert (
            pads == sum((h // 2) * (w // 2) for h, w in s.grid_hws) == s.num_image_tokens + s.num_video_tokens
        )
    for d in docs:  # every token of every document packed exactly once
        spans = sorted(covered[d.id])
        assert spans[0][0] == 0 and spans[-1][1] == len(d)
        assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))


def test_pack_never_crosses_documents():
    rng = np.random.default_rng(1)
    docs = [
        synth_doc(i, int(rng.integers(1, 150)), grids=[(2, 4)] * int(rng.integers(0, 3)), video=i % 7 == 0)
        for i in range(120)
    ]
    docs.append(synth_doc(999, 700, grids=[(4, 4), (6, 6), (2, 2)]))  # longer than seq_len: split
    seqs = pack_documents(docs, seq_len=256, buffer_docs=16)
    check_packing(seqs, docs, 256)
    assert any("@" in n for s in seqs for n in s.doc_ids)
    assert pack_documents(docs, 256, 16)[3].input_ids.tolist() == seqs[3].input_ids.tolist()  # deterministic


def test_no_piece_waits_longer_than_the_pieces_ahead_of_it():
    """Oldest-first packing: a piece with k pieces ahead of it in the buffer is emitted within k + 1
    sequences. Many short documents among long ones: plain first-fit-decreasing leaves some of the short
    ones buffered for hundreds of sequences."""
    rng = np.random.default_rng(3)
    packer = Packer(seq_len=256, buffer_docs=16)
    # piece -> (sequences emitted, pieces ahead of it) when it arrived
    ahead: dict[tuple[str, int], tuple[int, int]] = {}
    waits, emitted = [], 0
    for i in range(3000):
        n = int(rng.integers(150, 250)) if rng.random() < 0.7 else int(rng.integers(1, 12))
        for p in split_document(synth_doc(i, n), 256):
            ahead[(p.doc.id, p.start)] = (emitted, len(packer.buffer))
            packer.add_pieces([p])
        while packer.ready():
            for p in packer.pop():
                at, k = ahead.pop((p.doc.id, p.start))
                assert emitted - at <= k, (p.doc.id, emitted - at, k)
                waits.append(emitted - at)
            emitted += 1
    assert len(waits) > 2500 and max(waits) <= 16 + 2


def test_split_moves_cut_before_media_block_and_rejects_huge_blocks():
    d = synth_doc(0, 5, grids=[(8, 8)], prefix=10)  # 11 tokens, a 20-token block at [11, 30], 6 tokens
    assert len(d) == 37 and d.media_blocks == [(11, 30)]
    assert [(p.start, p.end) for p in split_document(d, 20)] == [(0, 11), (11, 31), (31, 37)]
    assert [p.image_range() for p in split_document(d, 20)] == [(0, 0), (0, 1), (1, 1)]
    with pytest.raises(ValueError, match="'d0'.*longer than seq_len=12"):
        split_document(d, 12)


def test_split_chunks_respect_blocks():
    d = synth_doc(5, 30, grids=[(4, 4), (4, 4), (4, 4)])  # blocks of 8 tokens
    pieces = split_document(d, 12)
    assert all(len(p) <= 12 for p in pieces)
    for p in pieces:
        x = d.input_ids[p.start : p.end].tolist()
        assert x.count(MS) == x.count(ME)
    assert sum(len(p) for p in pieces) == len(d)


def test_packing_efficiency_realistic_lengths():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(500), 1.1, 1200), 8, 20000).astype(
        int
    )  # heavy-tailed, some > seq_len
    docs = [synth_doc(i, int(n)) for i, n in enumerate(lengths)]
    seqs = pack_documents(docs, seq_len=2048)
    eff = packing_efficiency(seqs, 2048)
    naive = sum(len(d) for d in docs) / (2048 * len(seqs))
    assert eff == pytest.approx(naive)
    assert eff >= 0.95, eff


# ------------------------------------------------------------------------------------ real pipeline
@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    rng = np.random.default_rng(0)
    words = ["red", "ball", "table", "cube", "window", "light", "small", "wooden", "the", "a", "on", "near"]

    def sent(lo, hi):
        return " ".join(rng.choice(words, int(rng.integers(lo, hi))))

    sizes = [(28, 28), (56, 42), (84, 56), (42, 70)]
    mm = []
    for i in range(10):
        if i % 3 == 0:
            mm.append(make_record(f"cap{i}", text=f"<image>{sent(3, 12)}", images=[picture(i, sizes[i % 4])]))
        elif i % 3 == 1:
            msgs = [
                {"role": "user", "content": f"<image>{sent(2, 6)}?"},
                {"role": "assistant", "content": sent(3, 10)},
            ]
            mm.append(
                make_record(f"sft{i}", kind="sft", messages=msgs, images=[picture(i, sizes[(i + 1) % 4])])
            )
        else:
            frames = [picture(100 + i + k, (28, 28)) for k in range(3)]
            mm.append(
                make_record(
                    f"vid{i}", kind="video_qa", text=f"<video>{sent(2, 8)}", images=frames, media_kind="video"
                )
            )
    text = [make_record(f"txt{i}", kind="text", text=sent(4, 60)) for i in range(150)]
    write_dataset(root / "rec_mm", mm, rows_per_shard=4)
    write_dataset(root / "rec_text", text, rows_per_shard=64)
    run_train_tokenizer([root / "rec_mm", root / "rec_text"], root / "tok", TokenizerConfig(vocab_size=300))
    for name in ("mm", "text"):
        run_tokenize(root / f"rec_{name}", root / "tok", root / name, TokenizeConfig())
    return root


def mixture(root, **kw) -> MixtureConfig:
    base = {
        "sources": [
            SourceSpec(name="mm", path=root / "mm", weight=0.6),
            SourceSpec(name="text", path=root / "text", weight=0.4),
        ],
        "seq_len": 128,
        "micro_batch_tokens": 256,
        "seed": 7,
        "pack_buffer_docs": 6,
    }
    base.update(kw)
    return MixtureConfig(**base)


def test_loader_batch_runs_through_tiny_kimivl(datasets):
    loader = PackedLoader(mixture(datasets))
    batch = next(b for b in loader if b["grid_hws"].numel())
    ids, cu, labels = batch["input_ids"], batch["cu_seqlens"], batch["labels"]
    assert (labels[cu[1:] - 1] == -100).all()  # no prediction across a document boundary
    assert (batch["position_ids"][cu[:-1]] == 0).all()
    g = batch["grid_hws"]
    assert batch["pixel_values"].shape == (int((g[:, 0] * g[:, 1]).sum()), 3, 14, 14)
    counts = tokens_by_modality(batch, OWN_BPE_IDS.media_pad)
    n_pad = int((ids == PAD).sum())
    assert counts["text"] == ids.numel() - n_pad and counts["image"] + counts["video"] == n_pad > 0
    assert counts["total"] == ids.numel() and counts["padding"] == 0
    model = KimiVL(preset("tiny"), attn_backend="sdpa").eval()
    with torch.no_grad():
        out = model(
            ids,
            cu_seqlens=cu,
            position_ids=batch["position_ids"],
            labels=labels,
            pixel_values=batch["pixel_values"],
            grid_hws=g,
        )
    assert torch.isfinite(out.loss)


def test_batch_token_counts_are_the_packers_and_agree_with_a_recount(datasets):
    """The trainer counts a batch's tokens from ``token_counts`` (the packer's per-sequence counts); an
    independent recount from the ids and grids gives the same numbers."""
    loader = PackedLoader(mixture(datasets))
    for _ in range(6):
        b = next(loader)
        recount = tokens_by_modality(b, OWN_BPE_IDS.media_pad)
        assert b["token_counts"].tolist() == [recount["text"], recount["image"], recount["video"]]
        assert int(b["token_counts"].sum()) == b["input_ids"].numel()


def test_state_restore_is_exact_mid_epoch(datasets):
    cfg = mixture(datasets)
    loader = PackedLoader(cfg)
    batches, state = [], None
    for i in range(10):
        if i == 4:
            state = json.loads(json.dumps(loader.state_dict()))  # must be plain JSON
        batches.append(next(loader))
    assert state["buffer"], "expected documents buffered but not yet emitted at the save point"
    assert 0 < state["sources"][1]["position"] < 150  # mid-epoch
    assert loader.sources[0].epoch >= 1  # epochs wrapped (reshuffled) during the run
    resumed = PackedLoader(cfg)
    resumed.load_state_dict(state)
    for want in batches[4:]:
        got = next(resumed)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert resumed.state_dict() == json.loads(json.dumps(loader.state_dict()))
    with pytest.raises(ValueError, match="different mixture"):
        PackedLoader(mixture(datasets, seed=8)).load_state_dict(state)


def test_mixture_ratios_converge(datasets):
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    cfg = MixtureConfig(
        sources=[SourceSpec(name=n, path=datasets / "text", weight=w) for n, w in weights.items()],
        seq_len=512,
        micro_batch_tokens=1024,
        seed=1,
    )
    loader = PackedLoader(cfg)
    counts = np.zeros(3)
    while counts.sum() < 3000:
        counts += np.bincount(next(loader)["source_ids"].numpy(), minlength=3)
    share = counts / counts.sum()
    assert np.allclose(share, list(weights.values()), atol=0.03), share


def test_tokens_by_source_counts_every_token_of_each_segment_once(datasets):
    cfg = MixtureConfig(
        sources=[SourceSpec(name=n, path=datasets / "text", weight=w) for n, w in (("a", 2.0), ("b", 1.0))],
        seq_len=512,
        micro_batch_tokens=1024,
        seed=3,
    )
    loader = PackedLoader(cfg)
    assert loader.source_names == ["a", "b"]
    total = dict.fromkeys("ab", 0)
    for _ in range(6):
        b = next(loader)
        got = tokens_by_source(b, loader.source_names)
        want = dict.fromkeys("ab", 0)  # naive: walk the segments
        cu = b["cu_seqlens"].tolist()
        for k, sid in enumerate(b["source_ids"].tolist()):
            want["ab"[sid]] += cu[k + 1] - cu[k]
        assert got == want and sum(got.values()) == b["input_ids"].numel()
        for k in total:
            total[k] += got[k]
    assert total["a"] > total["b"] > 0  # a is drawn twice as often (same documents)
    bad = dict(b, source_ids=b["source_ids"][:-1])
    with pytest.raises(ValueError, match="segments but"):
        tokens_by_source(bad, loader.source_names)
    with pytest.raises(ValueError, match="outside the 1 sources"):
        tokens_by_source(dict(b, source_ids=torch.ones_like(b["source_ids"])), ["a"])


def _token_shares(cfg: MixtureConfig, tokens: int) -> tuple[np.ndarray, PackedLoader]:
    loader = PackedLoader(cfg)
    got = np.zeros(len(cfg.sources))
    while got.sum() < tokens:
        got += list(tokens_by_source(next(loader), loader.source_names).values())
    return got / got.sum(), loader


@pytest.mark.parametrize("unit", ["documents", "tokens"])
def test_weight_unit_tokens_makes_the_weights_token_shares(datasets, unit):
    cfg = MixtureConfig(
        sources=[
            SourceSpec(name="mm", path=datasets / "mm", weight=0.5),
            SourceSpec(name="text", path=datasets / "text", weight=0.5),
        ],
        seq_len=256,
        micro_batch_tokens=512,
        seed=4,
        weight_unit=unit,
    )
    share, loader = _token_shares(cfg, 60_000)
    means = np.array([s.mean_tokens for s in loader.sources])
    assert means[1] > 1.5 * means[0]  # the text documents are much longer than the (small) image ones
    if unit == "tokens":  # equal token shares although the documents' lengths differ
        assert np.allclose(share, [0.5, 0.5], atol=0.04), share
        assert np.allclose(loader.draw_probabilities(), (0.5 / means) / (0.5 / means).sum())
    else:  # equal DOCUMENT shares: tokens follow the mean lengths
        assert np.allclose(share, means / means.sum(), atol=0.04), (share, means)
    # the default unit keeps the hash of states saved before weight_unit existed
    assert (cfg.state_hash() == cfg.model_copy(update={"weight_unit": "documents"}).state_hash()) == (
        unit == "documents"
    )


def test_linear_schedule_raises_share(datasets):
    cfg = MixtureConfig(
        sources=[
            SourceSpec(name="txt", path=datasets / "text", weight=1.0),
            SourceSpec(name="mmx", path=datasets / "text", weight=1.0, group="multimodal"),
        ],
        schedule=ShareSchedule(group="multimodal", start=0.0, end=0.5),
        token_budget=30_000,
        seq_len=512,
        micro_batch_tokens=512,
        seed=2,
    )
    assert np.allclose(cfg.probabilities(0), [1.0, 0.0])
    assert np.allclose(cfg.probabilities(15_000), [0.75, 0.25])
    assert np.allclose(cfg.probabilities(10**9), [0.5, 0.5])
    loader = PackedLoader(cfg)
    seg_sources = []
    while loader.tokens_drawn < 30_000:
        seg_sources += next(loader)["source_ids"].tolist()
    q = len(seg_sources) // 4
    early, late = np.mean(seg_sources[:q]), np.mean(seg_sources[-q:])
    assert early < 0.12 and late > 0.33, (early, late)
    with pytest.raises(ValueError, match="token_budget"):
        MixtureConfig(sources=cfg.sources, schedule=cfg.schedule, seq_len=512, micro_batch_tokens=512)


def test_share_schedule_in_tokens_follows_the_schedule_per_quarter(datasets):
    """With weight_unit tokens the share schedule is a TOKEN share (joint pretraining: multimodal 0 -> 50% of
    tokens) although multimodal and text documents differ in length; per document it would not be."""
    budget = 80_000
    shares = {}
    for unit in ("tokens", "documents"):
        cfg = MixtureConfig(
            sources=[
                SourceSpec(name="text", path=datasets / "text", weight=1.0),
                SourceSpec(name="mm", path=datasets / "mm", weight=1.0, group="multimodal"),
            ],
            schedule=ShareSchedule(group="multimodal", start=0.0, end=0.5),
            token_budget=budget,
            seq_len=256,
            micro_batch_tokens=512,
            seed=3,
            weight_unit=unit,
        )
        loader = PackedLoader(cfg)
        per_quarter = np.zeros((4, 2))
        done = 0
        while done < budget:
            got = np.array(list(tokens_by_source(next(loader), loader.source_names).values()), dtype=float)
            per_quarter[min(3, done * 4 // budget)] += got
            done += int(got.sum())
        shares[unit] = per_quarter[:, 1] / per_quarter.sum(1)
    want = np.array([0.0625, 0.1875, 0.3125, 0.4375])  # the linear 0 -> 0.5 schedule's mean per quarter
    assert np.allclose(shares["tokens"], want, atol=0.05), shares
    # per document the short multimodal documents get far fewer tokens than the schedule says
    assert shares["documents"].mean() < want.mean() - 0.05 < shares["tokens"].mean(), shares
