"""Train the project's byte-level BPE tokenizer on record text (step ``train_tokenizer``).

The tokenizer is a byte-level BPE (GPT-2 style: every byte is a base symbol, so no text is ever unknown)
trained with HF ``tokenizers`` on the text of RECORD_SCHEMA datasets: ``text`` and every message
``content``, with the media placeholders (``<image>``, ``<video>``) and any literal special-token strings
removed, so BPE never learns merges across them. The special tokens of the Kimi-VL format
(``special_tokens.SPECIAL_TOKENS``, REFERENCE.md "Image tokens in the text" / "SFT chat template") are
passed to the trainer FIRST, so their ids are exactly 0..13 as model presets expect (``media_pad`` = 5);
this is asserted after training and by ``load_tokenizer``.

Determinism: records are read in shard order; when the corpus exceeds ``max_training_chars`` a seeded
subset of records is kept (whole records, in their original order); the BPE trainer breaks count ties by
pair order, so the same input gives a byte-identical ``tokenizer.json``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tasks.data.io import DatasetError, shard_files, staged_output
from tasks.data.schema import IMAGE_TOKEN, RECORD_SCHEMA, VIDEO_TOKEN
from tasks.data.special_tokens import SPECIAL_IDS, SPECIAL_TOKENS
from tasks.manifest import Manifest, is_up_to_date, read_manifest, write_manifest

TOKENIZER_FILE = "tokenizer.json"
STEP = "train_tokenizer"
# removed from the training text: placeholders and literal special-token strings
_STRIP_RE = re.compile("|".join(re.escape(t) for t in (IMAGE_TOKEN, VIDEO_TOKEN, *SPECIAL_TOKENS)))
_MIN_VOCAB = len(SPECIAL_TOKENS) + 256  # specials + the 256 byte symbols


class TokenizerConfig(BaseModel):
    """Byte-level BPE training settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(
        4096,
        ge=_MIN_VOCAB + 1,
        le=1 << 20,
        description="target vocabulary size incl. the 14 special tokens and 256 byte symbols "
        "(4096 = the tiny preset's LM vocab); a small corpus may yield fewer",
    )
    min_frequency: int = Field(2, ge=1, description="a pair must occur at least this often to be merged")
    seed: int = Field(0, ge=0, description="seed of the record subset kept when max_training_chars caps it")
    max_training_chars: int = Field(
        200_000_000,
        ge=1,
        description="cap on training characters; beyond it a seeded subset of whole records is used",
    )


def record_texts(row: dict) -> list[str]:
    """The trainable text of one record (text or message contents), placeholders/specials removed."""
    parts: list[str] = []
    if row.get("text") is not None:
        parts.append(row["text"])
    for m in row.get("messages") or []:
        parts.append(m["content"])
    return [_STRIP_RE.sub(" ", p) for p in parts if p]


def _iter_text_rows(in_dirs: list[Path]) -> Iterator[dict]:
    """Only the text/messages columns of every shard (images are never read)."""
    for d in in_dirs:
        for f in shard_files(d):
            try:
                pf = pq.ParquetFile(f)
            except OSError as e:
                raise DatasetError(f"{f}: not a readable Parquet file ({e})") from None
            if not pf.schema_arrow.equals(RECORD_SCHEMA, check_metadata=False):
                raise DatasetError(f"{f}: not a RECORD_SCHEMA shard (columns {pf.schema_arrow.names})")
            for batch in pf.iter_batches(batch_size=1024, columns=["text", "messages"]):
                yield from batch.to_pylist()


def _select_records(in_dirs: list[Path], cfg: TokenizerConfig) -> tuple[np.ndarray | None, int, int]:
    """(indices of kept records or None for all, records, training chars)."""
    lengths = np.array(
        [sum(len(t) for t in record_texts(r)) for r in _iter_text_rows(in_dirs)], dtype=np.int64
    )
    total = int(lengths.sum())
    if total <= cfg.max_training_chars:
        return None, len(lengths), total
    order = np.random.default_rng(cfg.seed).permutation(len(lengths))
    keep = order[np.cumsum(lengths[order]) <= cfg.max_training_chars]
    keep.sort()
    return keep, len(lengths), int(lengths[keep].sum())


def _corpus(in_dirs: list[Path], keep: np.ndarray | None) -> Iterator[str]:
    wanted = None if keep is None else set(keep.tolist())
    for i, row in enumerate(_iter_text_rows(in_dirs)):
        if wanted is None or i in wanted:
            yield from record_texts(row)


def check_special_ids(tok: Tokenizer, where: str) -> None:
    """Raise ValueError unless every special token has its fixed id (special_tokens.SPECIAL_IDS)."""
    for token, want in SPECIAL_IDS.items():
        got = tok.token_to_id(token)
        if got != want:
            raise ValueError(f"{where}: special token {token!r} has id {got}, expected {want}")


def build_tokenizer(texts: Iterator[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train the byte-level BPE in memory (no I/O)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),  # first: ids 0..13
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    check_special_ids(tok, "trained tokenizer")
    return tok


def load_tokenizer(tokenizer_dir: Path) -> Tokenizer:
    """Load ``DIR/tokenizer.json`` and verify the fixed special-token ids."""
    path = Path(tokenizer_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer_dir: {path} does not exist (run train_tokenizer first)")
    tok = Tokenizer.from_file(str(path))
    check_special_ids(tok, str(path))
    return tok


def run_train_tokenizer(in_dirs: list[Path], out_dir: Path, cfg: TokenizerConfig) -> Manifest:
    """Train on the records of ``in_dirs`` (RECORD_SCHEMA datasets) -> ``out_dir/tokenizer.json``."""
    in_dirs = [Path(d) for d in in_dirs]
    if not in_dirs:
        raise ValueError("in_dirs: expected at least one record dataset directory, got none")
    for d in in_dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"in_dirs: {d} is not a directory")
    parents = [read_manifest(d).parent_of(d) for d in in_dirs]
    if is_up_to_date(out_dir, config=cfg, parents=parents):
        return read_manifest(out_dir)

    keep, n_records, n_chars = _select_records(in_dirs, cfg)
    if n_chars == 0:
        raise DatasetError(f"in_dirs: {[str(d) for d in in_dirs]} hold no text to train a tokenizer on")
    tok = build_tokenizer(_corpus(in_dirs, keep), cfg)
    with staged_output(out_dir) as stage:
        (stage / TOKENIZER_FILE).write_text(tok.to_str(pretty=True))
        return write_manifest(
            stage,
            kind="tokenizer",
            step=STEP,
            config=cfg,
            parents=parents,
            counts={
                "records": n_records,
                "training_records": n_records if keep is None else len(keep),
                "training_chars": n_chars,
                "vocab_size": tok.get_vocab_size(),
            },
            extra={"special_ids": dict(SPECIAL_IDS), "model": "byte-level BPE"},
        )


__all__ = [
    "TOKENIZER_FILE",
    "TokenizerConfig",
    "build_tokenizer",
    "check_special_ids",
    "load_tokenizer",
    "record_texts",
    "run_train_tokenizer",
]
