"""Tokenize step: media expansion, ChatML template, loss-mask rules, quarantine, truncation, counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kimivl_model.image_processing import smart_resize_hw
from kimivl_model.projector import num_image_tokens
from tasks.data.io import read_table
from tasks.data.row_store import read_rows
from tasks.data.schema import QUARANTINE_SCHEMA, TOKENIZED_SCHEMA
from tasks.data.special_tokens import OWN_BPE_SPECIAL_IDS
from tasks.data.text_tokenizer import load_tokenizer
from tasks.data.tokenize import ChatRules, DocTokenizer, RecordError, TokenizeConfig, run_tokenize
from tasks.data.tokenizer import TokenizerConfig, run_train_tokenizer

from .records import make_record, picture, write_dataset

S = OWN_BPE_SPECIAL_IDS
BOS, EOS, MS, MC, PAD, ME = (
    S[t]
    for t in ("<|bos|>", "<|eos|>", "<|media_start|>", "<|media_content|>", "<|media_pad|>", "<|media_end|>")
)
SYS, USR, AST, MID, END = (
    S[t] for t in ("<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<|im_end|>")
)
TS, TE = S["◁think▷"], S["◁/think▷"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    rows = [
        make_record(f"r{i}", kind="text", text=f"the system user assistant said image video {i} ball table")
        for i in range(60)
    ]
    write_dataset(root / "corpus", rows, rows_per_shard=100)
    run_train_tokenizer([root / "corpus"], root / "tok", TokenizerConfig(vocab_size=320))
    return root / "tok"


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def enc(tok, s):
    return tok.encode(s)


def test_media_block_expansion_matches_smart_resize_and_projector(tok):
    imgs = [picture(0, (100, 60)), picture(1, (30, 200)), picture(2, (1000, 900))]
    row = make_record("m", text="<image>a<image>b <image> c", images=imgs)
    out = DocTokenizer(tok, TokenizeConfig()).tokenize(row)
    ids = out["input_ids"]
    # naive reference for the first image: 60x100 px -> padded to 84x112 -> 6x8 patches -> 3*4 tokens
    assert (out["grid_hws"][0]["h"], out["grid_hws"][0]["w"]) == (6, 8)
    grids = []
    for im, g in zip(imgs, out["grid_hws"], strict=True):
        ph, pw = smart_resize_hw(im.height, im.width)
        assert (g["h"], g["w"]) == (ph // 14, pw // 14)
        grids.append((g["h"], g["w"]))
    assert grids[2][0] * grids[2][1] <= 4096 < (900 / 14) * (1000 / 14)  # the big one was downscaled
    expected = num_image_tokens(torch.tensor(grids))
    assert expected == [(h // 2) * (w // 2) for h, w in grids]
    # walk the blocks: start, "image", content, N pads, end
    word = enc(tok, "image")
    blocks, i = [], 0
    while i < len(ids):
        if ids[i] == MS:
            assert ids[i + 1 : i + 1 + len(word)] == word and ids[i + 1 + len(word)] == MC
            j = i + 2 + len(word)
            n = 0
            while ids[j] == PAD:
                n, j = n + 1, j + 1
            assert ids[j] == ME
            blocks.append(n)
            i = j
        i += 1
    assert blocks == expected
    assert out["num_image_tokens"] == sum(expected) and out["num_video_tokens"] == 0
    assert out["num_text_tokens"] == len(ids) - sum(expected)
    assert ids[0] == BOS and ids[-1] == EOS


def test_pretraining_mask_rule(tok):
    row = make_record("p", text="<image>hello ball", images=[picture(0, (28, 56))])
    out = DocTokenizer(tok, TokenizeConfig()).tokenize(row)
    word = enc(tok, "image")
    text = enc(tok, "hello ball")
    assert out["input_ids"] == [BOS, MS, *word, MC, PAD, PAD, ME, *text, EOS]
    assert out["loss_mask"] == [
        False,
        False,
        *[False] * len(word),
        False,
        False,
        False,
        True,
        *[True] * len(text),
        True,
    ]


def test_video_frames_are_blocks_with_video_word(tok):
    frames = [picture(i, (56, 56)) for i in range(3)]
    row = make_record("v", kind="video_qa", text="clip <video> end", images=frames, media_kind="video")
    out = DocTokenizer(tok, TokenizeConfig()).tokenize(row)
    ids = out["input_ids"]
    word = enc(tok, "video")
    starts = [i for i, t in enumerate(ids) if t == MS]
    assert len(starts) == 3 and all(ids[s + 1 : s + 1 + len(word)] == word for s in starts)
    assert out["num_video_tokens"] == 3 * 4 and out["num_image_tokens"] == 0
    assert len(out["grid_hws"]) == 3 and len(out["images"]) == 3


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "<image>What is it?"},
    {"role": "assistant", "content": "◁think▷ round ◁/think▷A ball."},
    {"role": "user", "content": "Color?"},
    {"role": "assistant", "content": "Red."},
]


def test_chatml_template_exact(tok):
    row = make_record("c", kind="sft", messages=CHAT, images=[picture(0, (28, 28))])
    out = DocTokenizer(tok, TokenizeConfig()).tokenize(row)
    want = (
        "<|bos|><|im_system|>system<|im_middle|>Be brief.<|im_end|>"
        "<|im_user|>user<|im_middle|><|media_start|>image<|media_content|><|media_pad|><|media_end|>"
        "What is it?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>◁think▷ round ◁/think▷A ball.<|im_end|>"
        "<|im_user|>user<|im_middle|>Color?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>Red.<|im_end|><|eos|>"
    )
    assert tok.decode(out["input_ids"]) == want
    assert out["input_ids"].count(TS) == 1 and out["input_ids"].count(TE) == 1


def reference_sft_mask(tok, ids, header="special", thinking=True):
    """Independent rule: targets only inside assistant turns (content, think markers, <|im_end|>, header)."""
    role_word = {AST: enc(tok, "assistant"), USR: enc(tok, "user"), SYS: enc(tok, "system")}
    mask, role, i, in_media, in_think = [], None, 0, False, False
    while i < len(ids):
        t = ids[i]
        if t in (SYS, USR, AST):
            role = t
            w = role_word[t]
            asst = t == AST
            mask += [asst and header != "none"] + [asst and header == "all"] * len(w)
            i += 1 + len(w)
            continue
        if t == MID:
            mask.append(role == AST and header != "none")
        elif t == MS:
            in_media = True
            mask.append(False)
        elif in_media:
            mask.append(False)
            in_media = t != ME
        elif t == EOS:
            mask.append(role == AST)
        elif t == BOS:
            mask.append(False)
        else:
            in_think = in_think or t == TS
            mask.append(role == AST and not (in_think and not thinking))
            if t == TE:
                in_think = False
        i += 1
    return mask


@pytest.mark.parametrize(
    "rules",
    [ChatRules(), ChatRules(header_targets="all"), ChatRules(header_targets="none", train_on_thinking=False)],
)
def test_sft_mask_rule(tok, rules):
    msgs = [
        *CHAT,
        {"role": "user", "content": "Draw it."},
        {"role": "assistant", "content": "Here:<image>done"},
    ]
    row = make_record("c", kind="sft", messages=msgs, images=[picture(0, (56, 84)), picture(1, (28, 28))])
    out = DocTokenizer(tok, TokenizeConfig(chat=rules)).tokenize(row)
    ids, mask = out["input_ids"], out["loss_mask"]
    assert mask == reference_sft_mask(tok, ids, rules.header_targets, rules.train_on_thinking)
    # no system/user token is ever a target: scan turns independently
    role = None
    for t, m in zip(ids, mask, strict=True):
        role = t if t in (SYS, USR, AST) else role
        if role in (SYS, USR):
            assert not m
        if t in (PAD, MS, MC):
            assert not m
    assert sum(mask) > 0


def test_quarantine_reasons_and_counts(tok_dir, tmp_path):
    img = picture(0, (28, 28))
    rows = [
        make_record("ok", text="<image> fine", images=[img]),
        make_record("mismatch", text="<image><image> two", images=[img]),
        make_record("reserved", kind="text", text="hi <|im_end|> there"),
        make_record("noasst", kind="sft", messages=[{"role": "user", "content": "hi"}]),
        make_record("long", kind="text", text="ball " * 200),
        make_record("chat", kind="sft", messages=CHAT[1:3], images=[img]),
    ]
    write_dataset(tmp_path / "rec", rows)
    m = run_tokenize(tmp_path / "rec", tok_dir, tmp_path / "out", TokenizeConfig(max_tokens_per_doc=64))
    assert m.counts["input"] == 6 and m.counts["accepted"] == 2 and m.counts["quarantined"] == 4
    q = read_table(tmp_path / "out/quarantine", QUARANTINE_SCHEMA).to_pylist()
    reasons = {r["id"]: r["reason"] for r in q}
    assert "placeholder mismatch" in reasons["mismatch"]
    assert "<|im_end|>" in reasons["reserved"]
    assert "assistant" in reasons["noasst"]
    assert "overlong" in reasons["long"] and "64" in reasons["long"]
    acc = read_rows(tmp_path / "out", TOKENIZED_SCHEMA).to_pylist()
    tokens = m.counts["tokens"]
    assert tokens["image"] == sum(r["num_image_tokens"] for r in acc)
    assert tokens["total"] == sum(len(r["input_ids"]) for r in acc) == tokens["text"] + tokens["image"]
    assert m.extra["image_processing"] == {"patch_size": 14, "merge": 2, "max_patches_per_image": 4096}


def test_truncate_never_splits_media_block(tok):
    imgs = [picture(0, (56, 56)), picture(1, (112, 112))]  # 4 and 16 pad tokens
    row = make_record("t", text="ball " * 10 + "<image> mid <image> tail " + "table " * 20, images=imgs)
    full = DocTokenizer(tok, TokenizeConfig(max_tokens_per_doc=4096)).tokenize(row)
    second_start = [i for i, t in enumerate(full["input_ids"]) if t == MS][1]
    limit = second_start + 5  # would cut inside the second block
    out = DocTokenizer(tok, TokenizeConfig(max_tokens_per_doc=limit, overlong="truncate")).tokenize(row)
    assert out["input_ids"] == full["input_ids"][:second_start]
    assert out["loss_mask"] == full["loss_mask"][:second_start]
    assert len(out["images"]) == len(out["grid_hws"]) == 1 and out["num_image_tokens"] == 4
    with pytest.raises(RecordError, match="overlong"):
        DocTokenizer(tok, TokenizeConfig(max_tokens_per_doc=limit)).tokenize(row)


def test_deterministic_output(tok_dir, tmp_path):
    rows = [make_record(f"d{i}", text=f"<image> ball {i}", images=[picture(i, (28, 56))]) for i in range(5)]
    write_dataset(tmp_path / "rec", rows)
    m1 = run_tokenize(tmp_path / "rec", tok_dir, tmp_path / "a", TokenizeConfig())
    m2 = run_tokenize(tmp_path / "rec", tok_dir, tmp_path / "b", TokenizeConfig())
    assert m1.content_hash == m2.content_hash
    assert m1.counts["accepted"] == 5
    assert np.array_equal(
        read_rows(tmp_path / "a").column("input_ids").to_pylist()[0],
        read_rows(tmp_path / "b").column("input_ids").to_pylist()[0],
    )
    with pytest.raises(FileNotFoundError, match="in_dir"):
        run_tokenize(tmp_path / "missing", tok_dir, tmp_path / "c", TokenizeConfig())
