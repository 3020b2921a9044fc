"""The tokenizer step: train the project's byte-level BPE on record text (``train_tokenizer``), or take a
checkpoint's tokenizer as it is (``source: checkpoint``: its files are copied, nothing is trained).

The tokenizer is a byte-level BPE (GPT-2 style: every byte is a base symbol, so no text is ever unknown)
trained with HF ``tokenizers`` on the text of RECORD_SCHEMA datasets: ``text`` and every message
``content``, with the media placeholders (``<image>``, ``<video>``) and any literal special-token strings
removed, so BPE never learns merges across them. The special tokens of the Kimi-VL format
(``special_tokens.OWN_BPE_SPECIALS``, REFERENCE.md "Image tokens in the text" / "SFT chat template") are
passed to the trainer FIRST, so their ids are exactly 0..13, the layout that defines this tokenizer (the
tiny/small presets' ``media_pad_token_id`` = 5); this is asserted after training. Loading (either kind of
tokenizer) is ``tasks.data.text_tokenizer.load_tokenizer``; it reads every id from the files.

Determinism: records are read in shard order; when the corpus exceeds ``max_training_chars`` a seeded
subset of records is kept (whole records, in their original order); the BPE trainer breaks count ties by
pair order, so the same input gives a byte-identical ``tokenizer.json``.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tasks.data.io import DatasetError, shard_files
from tasks.data.schema import IMAGE_TOKEN, RECORD_SCHEMA, VIDEO_TOKEN
from tasks.data.special_tokens import OWN_BPE_SPECIAL_IDS, OWN_BPE_SPECIALS
from tasks.data.text_tokenizer import HF_FILE, load_tokenizer
from tasks.io.files import staged_dir
from tasks.io.manifest import Manifest, Parent, is_up_to_date, read_manifest, sha256_file, write_manifest

TOKENIZER_FILE = HF_FILE
STEP = "train_tokenizer"
# removed from the training text: placeholders and literal special-token strings
_STRIP_RE = re.compile("|".join(re.escape(t) for t in (IMAGE_TOKEN, VIDEO_TOKEN, *OWN_BPE_SPECIALS)))
_MIN_VOCAB = len(OWN_BPE_SPECIALS) + 256  # specials + the 256 byte symbols
CHECKPOINT_TOKENIZER = (
    "tokenizer"  # a native checkpoint's tokenizer folder (written by `kimivl model import`)
)


class TokenizerConfig(BaseModel):
    """Where the tokenizer comes from (``source``) and, for the project's own BPE, its training settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["train", "checkpoint"] = Field(
        "train",
        description="train: the project's byte-level BPE on the corpus; checkpoint: the tokenizer in `path` "
        "(a recipe's `data.tokenizer: from_checkpoint` points it at model.init_checkpoint's tokenizer)",
    )
    path: Path | None = Field(
        None, description="tokenizer directory for source 'checkpoint' (tiktoken.model or tokenizer.json)"
    )

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

    @model_validator(mode="after")
    def _path_for_checkpoint(self) -> TokenizerConfig:
        if self.source == "checkpoint" and self.path is None:
            raise ValueError(
                "path: source 'checkpoint' needs the tokenizer directory (or `tokenizer: from_checkpoint` with "
                "model.init_checkpoint set)"
            )
        return self


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
    """Raise ValueError unless every special token has the id the project's BPE defines (0..13)."""
    for token, want in OWN_BPE_SPECIAL_IDS.items():
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
        special_tokens=list(OWN_BPE_SPECIALS),  # first: ids 0..13
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    check_special_ids(tok, "trained tokenizer")
    return tok


def run_train_tokenizer(in_dirs: list[Path], out_dir: Path, cfg: TokenizerConfig) -> Manifest:
    """Train on the records of ``in_dirs`` (RECORD_SCHEMA datasets) -> ``out_dir/tokenizer.json``; with
    ``source: checkpoint`` copy ``cfg.path``'s tokenizer instead (``in_dirs`` are not read)."""
    if cfg.source == "checkpoint":
        return run_copy_tokenizer(cfg.path, out_dir, cfg)
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
    with staged_dir(out_dir) as stage:
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
            extra={"tokenizer": load_tokenizer(stage).describe(), "model": "byte-level BPE"},
        )


def run_copy_tokenizer(src: Path, out_dir: Path, cfg: TokenizerConfig) -> Manifest:
    """A checkpoint's tokenizer as the data's tokenizer: loaded (format, special tokens and chat template
    checked) and its files copied to ``out_dir``; the manifest's parent is the source files' hash."""
    from tasks.data.chat_format import ChatFormat

    src = Path(src)
    tok = load_tokenizer(src)
    ChatFormat(tok)  # a template this project cannot reproduce stops here, before any tokenization
    parents = [Parent(uri=str(src.resolve()), content_hash=_files_hash(src, tok.files))]
    if is_up_to_date(out_dir, config=cfg, parents=parents):
        return read_manifest(out_dir)
    with staged_dir(out_dir) as stage:
        for name in tok.files:
            shutil.copyfile(src / name, stage / name)
        return write_manifest(
            stage,
            kind="tokenizer",
            step="checkpoint_tokenizer",
            config=cfg,
            parents=parents,
            counts={"vocab_size": tok.vocab_size},
            extra={"tokenizer": tok.describe(), "model": tok.kind, "source": str(src)},
        )


def _files_hash(directory: Path, names: tuple[str, ...]) -> str:
    """sha256 over (name, file sha256) of the tokenizer's files (the rest of a checkpoint is not hashed)."""
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(f"{name}\0{sha256_file(directory / name)}\n".encode())
    return h.hexdigest()


__all__ = [
    "TOKENIZER_FILE",
    "TokenizerConfig",
    "build_tokenizer",
    "check_special_ids",
    "record_texts",
    "run_copy_tokenizer",
    "run_train_tokenizer",
]
