"""Pluggable tokenizers: the public tiktoken format (special tokens at the TOP of the vocabulary), its chat
template held against the Kimi-VL format, token ids and loss masks from the loaded ids only, and the
model-agreement check that stops a mismatch before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kimivl_model.config import preset
from tasks.data.chat_format import ChatFormat
from tasks.data.special_tokens import THINK_END, THINK_START
from tasks.data.text_tokenizer import (
    TokenizerFormatError,
    TokenizerMismatchError,
    check_model_ids,
    load_tokenizer,
)
from tasks.data.tokenize import ChatRules, DocTokenizer, RecordError, TokenizeConfig
from tests.public_fixture import script

from .records import make_record, picture

N_BASE = 1792


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("kimi-tok")
    return script().write_tokenizer(d, script().train_ranks(N_BASE, seed=0))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def test_tiktoken_format_special_ids_from_the_file(tok):
    assert tok.kind == "tiktoken" and tok.base_vocab_size == N_BASE and tok.vocab_size == N_BASE + 256
    sp = tok.special
    # the published offsets from the first special id (163584 + k there)
    assert (sp.bos, sp.eos, sp.im_end, sp.im_user, sp.im_assistant) == tuple(
        N_BASE + k for k in (0, 1, 2, 3, 4)
    )
    assert (sp.im_system, sp.im_middle) == (N_BASE + 10, N_BASE + 17)
    assert (sp.media_start, sp.media_content, sp.media_end, sp.media_pad) == tuple(
        N_BASE + k for k in (18, 19, 20, 21)
    )
    assert sp.pad == N_BASE + 255 and sp.think_start is None  # think markers are plain text here
    assert tok.special_strings[N_BASE + 5] == f"<|reserved_token_{N_BASE + 5}|>"  # unnamed ids are reserved
    assert min(sp.ids()) >= N_BASE  # every special sits above the BPE ranks, none at 0..13
    assert tok.max_used_id() == N_BASE + 255 and tok.chat_template is not None


def test_encode_decode_round_trip_and_specials_in_text_stay_text(tok):
    text = "Grüße, 東京! emoji 🙂 tabs\tand\nnewlines  123456 don't"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("a <|im_end|> [BOS] b")  # special strings inside text are NOT control tokens
    assert not set(ids) & tok.special.ids() and tok.decode(ids) == "a <|im_end|> [BOS] b"
    ids, starts = tok.encode_with_offsets("hello world, again")
    assert len(ids) == len(starts) and starts[0] == 0 and starts == sorted(starts)
    assert tok.encode_batch(["x y", "z"]) == [tok.encode("x y"), tok.encode("z")]


def test_long_runs_are_cut_as_the_public_tokenizer_cuts_them(tok):
    """> 25,000 same-class characters are encoded in pieces (tiktoken's regex would crawl) and round-trip."""
    text = "ab " + "x" * 60_000 + " " * 30_001 + "end"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # pieces: cuts after 25,000 characters of each run, nowhere else
    from tasks.data.text_tokenizer import _pieces

    assert [len(p) for _, p in _pieces(text)] == [3 + 25_000, 25_000, 10_000 + 25_000, 5_001 + 3]


def test_malformed_files_are_named(tmp_path, tok_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tiktoken.model").write_text("aGVsbG8= 0\nnot-base64!! 1\n")
    (bad / "tokenizer_config.json").write_text((tok_dir / "tokenizer_config.json").read_text())
    with pytest.raises(TokenizerFormatError, match=r"tiktoken.model: line 2"):
        load_tokenizer(bad)
    (bad / "tokenizer_config.json").unlink()
    (bad / "tiktoken.model").write_text((tok_dir / "tiktoken.model").read_text())
    with pytest.raises(TokenizerFormatError, match="tokenizer_config.json: missing"):
        load_tokenizer(bad)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {"5": {"content": "<|media_pad|>"}}
    (bad / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        TokenizerFormatError, match=r"added_tokens_decoder.5: id 5 is inside the 1792 BPE ranks"
    ):
        load_tokenizer(bad)
    cfg["added_tokens_decoder"] = {str(N_BASE): {"content": "[BOS]"}, str(N_BASE + 1): {"content": "[EOS]"}}
    (bad / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerFormatError, match=r"lacks special tokens .*media_pad '<\|media_pad\|>'"):
        load_tokenizer(bad)
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tiktoken.model"):
        load_tokenizer(tmp_path)


def test_model_check_names_both_values(tok):
    with pytest.raises(TokenizerMismatchError, match=r"<\|media_pad\|> at id 1813.*media_pad_token_id = 5"):
        check_model_ids(tok.describe(), preset("tiny"), "test")
    cfg = script().public_config(N_BASE)
    from kimivl_model.hf_interop import from_hf_config

    model_cfg = from_hf_config(cfg)
    check_model_ids(tok.describe(), model_cfg, "test")  # the checkpoint's own config reads these ids
    small = model_cfg.replace(lm=model_cfg.lm.__class__(**{**model_cfg.lm.__dict__, "vocab_size": 2000}))
    with pytest.raises(TokenizerMismatchError, match=r"emits ids up to 2047.*lm.vocab_size is 2000"):
        check_model_ids(tok.describe(), small.replace(media_pad_token_id=N_BASE + 21), "test")


# ---------------------------------------------------------------------------------------- chat format

CHAT = [
    {"role": "user", "content": "<image>\nWhat is it?"},
    {"role": "assistant", "content": f"{THINK_START} round {THINK_END}A ball."},
    {"role": "user", "content": "Color?"},
    {"role": "assistant", "content": "Red."},
]


def test_template_default_system_turn_is_detected_and_the_format_matches(tok):
    cf = ChatFormat(tok)
    assert cf.default_system == "You are a helpful assistant"
    assert cf.render_text(CHAT, True) == cf.render_template(CHAT, True)


def test_a_template_the_format_cannot_reproduce_is_refused(tmp_path, tok_dir):
    d = tmp_path / "t"
    d.mkdir()
    (d / "tiktoken.model").write_text((tok_dir / "tiktoken.model").read_text())
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = cfg["chat_template"].replace(
        "{{ m['role'] }}<|im_middle|>", "{{ m['role'] }}:<|im_middle|>"
    )
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerFormatError, match="first difference at character"):
        ChatFormat(load_tokenizer(d))


def _expand_pads(ids: list[int], pad: int, counts: list[int]) -> list[int]:
    out, k = [], 0
    for t in ids:
        if t == pad:
            out += [pad] * counts[k]
            k += 1
        else:
            out.append(t)
    return out


def test_doc_tokenizer_ids_are_the_template_rendering_byte_for_byte(tok):
    """Tokenized conversation == the checkpoint's template rendered and encoded (specials as tokens), with
    each image's single pad expanded to its token count; masks: answers + their closing specials only."""
    row = make_record("c", kind="sft", messages=CHAT, images=[picture(0, (84, 56))])
    cfg = TokenizeConfig(add_bos=False, add_eos=False)
    out = DocTokenizer(tok, cfg).tokenize(row)
    rendered = ChatFormat(tok).render_template(CHAT)
    want = tok.backend.encode(rendered, allowed_special="all")
    n_img = [(g["h"] // 2) * (g["w"] // 2) for g in out["grid_hws"]]
    assert out["input_ids"] == _expand_pads(want, tok.special.media_pad, n_img)
    assert out["input_ids"].count(tok.special.media_pad) == sum(n_img) == out["num_image_tokens"]
    ids, mask = np.array(out["input_ids"]), np.array(out["loss_mask"])
    # the default system turn and every user token: no loss; targets decode to the answers + specials
    assert not mask[: list(ids).index(tok.special.im_user)].any()
    target_text = tok.decode(ids[mask].tolist())
    assert target_text == (
        f"<|im_assistant|><|im_middle|>{THINK_START} round {THINK_END}A ball.<|im_end|>"
        "<|im_assistant|><|im_middle|>Red.<|im_end|>"
    )


def test_thinking_mask_works_when_the_markers_are_plain_text(tok):
    assert tok.special.think_start is None
    row = make_record("c", kind="sft", messages=CHAT[:2], images=[picture(0, (84, 56))])
    cfg = TokenizeConfig(add_bos=False, add_eos=False, chat=ChatRules(train_on_thinking=False))
    out = DocTokenizer(tok, cfg).tokenize(row)
    ids, mask = np.array(out["input_ids"]), np.array(out["loss_mask"])
    targets = tok.decode(ids[mask].tolist())
    assert "think" not in targets and "round" not in targets and "A ball.<|im_end|>" in targets


def test_bos_needs_a_bos_token_and_reserved_strings_quarantine(tok, tmp_path):
    row = make_record("c", kind="sft", messages=[{"role": "user", "content": "x [EOS] y"}, CHAT[1]])
    with pytest.raises(RecordError, match=r"reserved special token '\[EOS\]'"):
        DocTokenizer(tok, TokenizeConfig(add_bos=False)).tokenize(row)
    out = DocTokenizer(tok, TokenizeConfig(add_bos=True, add_eos=True)).tokenize(
        make_record("t", kind="text", text="plain text")
    )
    assert out["input_ids"][0] == tok.special.bos and out["input_ids"][-1] == tok.special.eos
