"""Byte-level BPE training: fixed special ids, determinism, placeholders kept out of the vocabulary."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from tasks.data.special_tokens import SPECIAL_TOKENS
from tasks.data.text_tokenizer import load_tokenizer
from tasks.data.tokenizer import TokenizerConfig, run_train_tokenizer
from tasks.io.manifest import read_manifest

from .records import make_record, picture, write_dataset

WORDS = [
    "the",
    "a",
    "red",
    "blue",
    "ball",
    "cube",
    "sits",
    "on",
    "wooden",
    "table",
    "near",
    "window",
    "light",
    "shadow",
    "large",
    "small",
    "bright",
    "dark",
]


def corpus_rows(n: int = 120, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        sent = " ".join(rng.choice(WORDS, size=int(rng.integers(5, 15))))
        if i % 3 == 0:
            rows.append(make_record(f"c{i}", text=f"<image>\n{sent}.", images=[picture(i, (28, 28))]))
        elif i % 3 == 1:
            msgs = [
                {"role": "user", "content": f"<image>What is here? {sent}"},
                {"role": "assistant", "content": f"◁think▷ look ◁/think▷{sent}."},
            ]
            rows.append(make_record(f"s{i}", kind="sft", messages=msgs, images=[picture(i, (28, 28))]))
        else:
            rows.append(make_record(f"t{i}", kind="text", text=f"{sent}. Übergröße naïve café 東京 {i}"))
    return rows


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("records") / "ds"
    write_dataset(d, corpus_rows(), rows_per_shard=50)
    return d


CFG = TokenizerConfig(vocab_size=400, min_frequency=2)


def test_special_ids_fixed_and_roundtrip(records_dir, tmp_path):
    m = run_train_tokenizer([records_dir], tmp_path / "tok", CFG)
    tok = load_tokenizer(tmp_path / "tok")
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(14))
    assert m.counts["vocab_size"] == tok.vocab_size <= 400
    # specials are single tokens when they appear in text
    assert tok.encode("a◁think▷b◁/think▷<|im_end|>").count(12) == 1
    # byte-level: any text round-trips, nothing is unknown
    text = "Grüße, 東京! emoji 🙂 tabs\tand\nnewlines  double"
    assert tok.decode(tok.encode(text)) == text
    # placeholders were removed from the training text: no learned token spans them
    vocab = Tokenizer.from_file(str(tmp_path / "tok/tokenizer.json")).get_vocab()
    assert not [t for t in vocab if "image>" in t or "video>" in t or "<ima" in t]


def test_deterministic_bytes(records_dir, tmp_path):
    m1 = run_train_tokenizer([records_dir], tmp_path / "a", CFG)
    m2 = run_train_tokenizer([records_dir], tmp_path / "b", CFG)
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()
    assert m1.content_hash == m2.content_hash
    other = run_train_tokenizer([records_dir], tmp_path / "c", CFG.model_copy(update={"vocab_size": 350}))
    assert other.content_hash != m1.content_hash


def test_up_to_date_is_skipped(records_dir, tmp_path):
    run_train_tokenizer([records_dir], tmp_path / "tok", CFG)
    before = (tmp_path / "tok/tokenizer.json").stat().st_mtime_ns
    m = run_train_tokenizer([records_dir], tmp_path / "tok", CFG)
    assert (tmp_path / "tok/tokenizer.json").stat().st_mtime_ns == before
    assert m == read_manifest(tmp_path / "tok")
    assert m.parents[0].content_hash == read_manifest(records_dir).content_hash


def test_max_training_chars_subset(records_dir, tmp_path):
    cfg = TokenizerConfig(vocab_size=300, max_training_chars=2000, seed=3)
    m = run_train_tokenizer([records_dir], tmp_path / "tok", cfg)
    assert 0 < m.counts["training_chars"] <= 2000
    assert m.counts["training_records"] < m.counts["records"] == 120


def test_loaded_ids_come_from_the_file_and_a_model_mismatch_names_both(tmp_path):
    """A tokenizer.json whose specials sit elsewhere loads with ITS ids; the model check names both values."""
    from kimivl_model.config import preset
    from tasks.data.text_tokenizer import TokenizerMismatchError, check_model_ids

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(reversed(SPECIAL_TOKENS)), show_progress=False
    )
    tok.train_from_iterator(["some text here"] * 10, trainer=trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    assert loaded.special.media_pad == len(SPECIAL_TOKENS) - 1 - SPECIAL_TOKENS.index("<|media_pad|>") == 8
    assert loaded.special.pad == 13 and loaded.special.think_end == 0
    with pytest.raises(TokenizerMismatchError, match=r"<\|media_pad\|> at id 8.*media_pad_token_id = 5"):
        check_model_ids(loaded.describe(), preset("tiny"), "test")


def test_errors_name_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        run_train_tokenizer([tmp_path / "nope"], tmp_path / "tok", CFG)
    with pytest.raises(FileNotFoundError, match="tokenizer_dir"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValidationError):
        TokenizerConfig(vocab_size=100)  # below 14 specials + 256 bytes
    with pytest.raises(ValidationError):
        TokenizerConfig(vocab_siz=1000)
    json.dumps(CFG.model_dump(mode="json"))
