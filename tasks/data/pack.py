"""Packing tokenized documents into sequences of at most ``seq_len`` tokens (no padding).

A packed sequence is the concatenation of whole documents (or chunks of documents longer than
``seq_len``) on one flat token axis, with ``cu_seqlens`` = cumsum([0, len_1, len_2, ...]) marking document
boundaries, ``position_ids`` restarting at 0 in every document, and labels ALREADY SHIFTED within each
document (the contract of ``kimivl_model.lm.KimiLM.forward``)::

    labels[t] = input_ids[t + 1] if loss_mask[t + 1] else -100     (t, t + 1 in the same document)
    labels[last token of each document] = -100

so nothing is ever predicted across a document boundary. Sequences are NOT padded: a sequence may be
shorter than ``seq_len``; its ``fill`` = tokens / seq_len measures packing quality and
``packing_efficiency`` = real tokens / (num_sequences * seq_len) is the share of a fixed-length row that
holds real tokens.

Algorithm (deterministic): documents enter a buffer in arrival order; a document longer than ``seq_len``
enters as consecutive chunks of at most ``seq_len`` tokens, each cut moved back to the start of a media
block it would fall in (a block is ``<|media_start|> ... <|media_end|>``; a block longer than ``seq_len`` is
an error naming the document). Once the buffer holds at least ``buffer_docs`` pieces AND at least
2 x ``seq_len`` tokens, one sequence is emitted: the OLDEST buffered piece first, then first-fit-decreasing
over the rest (pieces sorted by length, descending, ties by arrival; each added if it still fits). Pieces
left behind stay buffered for the next sequences (small ones become fillers). Because every sequence takes
the oldest piece, a piece with k pieces ahead of it is emitted within k + 1 sequences: nothing starves.
(Plain first-fit-decreasing packs as tightly but can leave short documents waiting indefinitely: in the
tiny SFT phases one source's short documents were never emitted at all, so the trained mixture was not the
drawn one.) A chunk is its own document for attention, positions and labels (its first token is not
predicted).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from kimivl_model.lm import IGNORE_INDEX, positions_from_cu_seqlens  # the model's contracts
from tasks.data.special_tokens import SpecialIds


@dataclass(frozen=True)
class MediaIds:
    """The media-block token ids of the tokenizer a document was made with (never assumed: read from the
    tokenize step's manifest, ``tasks.data.loader``)."""

    start: int  # <|media_start|>
    end: int  # <|media_end|>
    pad: int  # <|media_pad|>

    @classmethod
    def of(cls, special: SpecialIds) -> MediaIds:
        return cls(start=special.media_start, end=special.media_end, pad=special.media_pad)


@dataclass(frozen=True, eq=False)
class Document:
    """One tokenized document (a TOKENIZED_SCHEMA row); ``source``/``row`` locate it for loader state."""

    id: str
    input_ids: np.ndarray  # (T,) int64, unshifted
    loss_mask: np.ndarray  # (T,) bool, True = token is a target
    media_ids: MediaIds  # the media-block ids of its tokenizer
    images: tuple[dict[str, Any], ...] = ()  # IMAGE_STRUCT dicts, one per media block, in order
    grid_hws: tuple[tuple[int, int], ...] = ()  # patch grid per image
    media_kind: str = "none"
    source: str = ""
    row: int = -1

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 1 or self.input_ids.shape != self.loss_mask.shape:
            raise ValueError(
                f"document {self.id!r}: input_ids and loss_mask must be 1-D of equal length, got "
                f"{self.input_ids.shape} and {self.loss_mask.shape}"
            )
        if len(self.images) != len(self.grid_hws) or len(self.media_blocks) != len(self.grid_hws):
            raise ValueError(
                f"document {self.id!r}: {len(self.media_blocks)} media blocks, {len(self.images)} images and "
                f"{len(self.grid_hws)} grids must all be equal"
            )

    @classmethod
    def from_row(
        cls, row: dict[str, Any], media_ids: MediaIds, source: str = "", row_index: int = -1
    ) -> Document:
        return cls(
            id=row["id"],
            input_ids=np.asarray(row["input_ids"], dtype=np.int64),
            loss_mask=np.asarray(row["loss_mask"], dtype=bool),
            media_ids=media_ids,
            images=tuple(row["images"]),
            grid_hws=tuple((int(g["h"]), int(g["w"])) for g in row["grid_hws"]),
            media_kind=row["media_kind"],
            source=source,
            row=row_index,
        )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @cached_property
    def media_blocks(self) -> list[tuple[int, int]]:
        """(start, end) inclusive token spans of the media blocks, in order."""
        return media_blocks(self.input_ids, self.media_ids, self.id)


def media_blocks(input_ids: np.ndarray, media_ids: MediaIds, doc_id: str) -> list[tuple[int, int]]:
    """(start, end) inclusive token spans of a document's media blocks, in order (``doc_id`` for errors)."""
    starts = np.flatnonzero(input_ids == media_ids.start).tolist()
    ends = np.flatnonzero(input_ids == media_ids.end).tolist()
    ok = len(starts) == len(ends) and all(
        s < e and (i + 1 == len(starts) or e < starts[i + 1])
        for i, (s, e) in enumerate(zip(starts, ends, strict=True))
    )
    if not ok:
        raise ValueError(f"document {doc_id!r}: unbalanced <|media_start|>/<|media_end|> tokens")
    return list(zip(starts, ends, strict=True))


@dataclass(frozen=True, eq=False)
class Piece:
    """Tokens [start, end) of a document: the whole document or one chunk of it."""

    doc: Document
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start

    def image_range(self) -> tuple[int, int]:
        """Indices [i0, i1) of the document's images whose blocks lie in this piece."""
        if self.start == 0 and self.end == len(self.doc):  # the whole document: no need for its blocks
            return 0, len(self.doc.grid_hws)
        starts = [s for s, _ in self.doc.media_blocks]
        return bisect.bisect_left(starts, self.start), bisect.bisect_left(starts, self.end)


def split_document(doc: Document, seq_len: int) -> list[Piece]:
    """Consecutive chunks of at most ``seq_len`` tokens, never cutting a media block."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be > 0, got {seq_len}")
    if len(doc) == 0:
        raise ValueError(f"document {doc.id!r} is empty")
    pieces, start, n = [], 0, len(doc)
    while n - start > seq_len:
        cut = start + seq_len
        for s, e in doc.media_blocks:
            if s < cut <= e:
                if s <= start:
                    raise ValueError(
                        f"document {doc.id!r}: media block at tokens [{s}, {e}] ({e - s + 1} tokens) is longer "
                        f"than seq_len={seq_len}; raise seq_len or lower max_patches_per_image"
                    )
                cut = s
                break
        pieces.append(Piece(doc, start, cut))
        start = cut
    pieces.append(Piece(doc, start, n))
    return pieces


@dataclass
class PackedSequence:
    """One packed row of at most ``seq_len`` tokens (flat, unpadded); numpy int64 arrays."""

    input_ids: np.ndarray  # (T,)
    labels: np.ndarray  # (T,) shifted within each document, -100 = ignore
    cu_seqlens: np.ndarray  # (S+1,)
    images: list[dict[str, Any]]  # in placeholder order
    grid_hws: list[tuple[int, int]]  # (N,) patch grids
    image_is_video: list[bool]  # (N,) True for video frames
    image_sources: list[str]  # (N,) source name per image (its image-processing settings)
    doc_ids: list[str]  # (S,) document id per segment
    sources: list[str]  # (S,) source name per segment
    seq_len: int
    num_text_tokens: int = 0
    num_image_tokens: int = 0
    num_video_tokens: int = 0
    num_padding_tokens: int = 0  # always 0: sequences are never padded

    @property
    def position_ids(self) -> np.ndarray:
        """(T,) positions restarting at 0 in every document: the model's own rule (``positions_from_cu_seqlens``)."""
        return positions_from_cu_seqlens(torch.from_numpy(self.cu_seqlens)).numpy()

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def fill(self) -> float:
        return self.num_tokens / self.seq_len


def shifted_labels(input_ids: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """(T,) labels of ONE document: labels[t] = input_ids[t+1] if loss_mask[t+1] else -100; last = -100."""
    labels = np.full(input_ids.shape, IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(loss_mask[1:], input_ids[1:], IGNORE_INDEX)
    return labels


def build_sequence(pieces: list[Piece], seq_len: int) -> PackedSequence:
    """Concatenate pieces (each its own document segment) into one PackedSequence."""
    total = sum(len(p) for p in pieces)
    if not pieces or total > seq_len:
        raise ValueError(f"pieces must be non-empty and hold <= seq_len={seq_len} tokens, got {total}")
    ids, labels, lens = [], [], []
    images, grids, is_video, image_sources = [], [], [], []
    n_image = n_video = 0
    for p in pieces:
        d = p.doc
        x = d.input_ids[p.start : p.end]
        ids.append(x)
        labels.append(shifted_labels(x, d.loss_mask[p.start : p.end]))
        lens.append(len(p))
        i0, i1 = p.image_range()
        images.extend(d.images[i0:i1])
        grids.extend(d.grid_hws[i0:i1])
        video = d.media_kind == "video"
        is_video.extend([video] * (i1 - i0))
        image_sources.extend([d.source] * (i1 - i0))
        n_pad = int((x == d.media_ids.pad).sum())
        n_video += n_pad if video else 0
        n_image += 0 if video else n_pad
    input_ids = np.concatenate(ids)
    return PackedSequence(
        input_ids=input_ids,
        labels=np.concatenate(labels),
        cu_seqlens=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
        images=images,
        grid_hws=grids,
        image_is_video=is_video,
        image_sources=image_sources,
        doc_ids=[p.doc.id if len(p) == len(p.doc) else f"{p.doc.id}@{p.start}" for p in pieces],
        sources=[p.doc.source for p in pieces],
        seq_len=seq_len,
        num_text_tokens=total - n_image - n_video,
        num_image_tokens=n_image,
        num_video_tokens=n_video,
    )


class Packer:
    """Buffered packer: oldest piece first, then first-fit-decreasing (see the module docstring); its
    buffer is loader state."""

    def __init__(self, seq_len: int, buffer_docs: int = 64) -> None:
        if seq_len <= 0 or buffer_docs <= 0:
            raise ValueError(f"seq_len and buffer_docs must be > 0, got {seq_len} and {buffer_docs}")
        self.seq_len = seq_len
        self.buffer_docs = buffer_docs
        self.buffer: list[Piece] = []  # arrival order
        self.buffered_tokens = 0

    def add(self, doc: Document) -> None:
        self.add_pieces(split_document(doc, self.seq_len))

    def add_pieces(self, pieces: list[Piece]) -> None:
        self.buffer.extend(pieces)
        self.buffered_tokens += sum(len(p) for p in pieces)

    def ready(self) -> bool:
        return len(self.buffer) >= self.buffer_docs and self.buffered_tokens >= 2 * self.seq_len

    def pop(self) -> list[Piece]:
        """Choose and remove the pieces of the next sequence: the oldest piece (it always fits: pieces are
        at most ``seq_len``), then first-fit-decreasing over the others."""
        if not self.buffer:
            raise ValueError("Packer.pop: the buffer is empty")
        # stable sort: ties by arrival
        order = sorted(range(1, len(self.buffer)), key=lambda i: -len(self.buffer[i]))
        room, chosen = self.seq_len - len(self.buffer[0]), [0]
        for i in order:
            if room == 0:
                break
            n = len(self.buffer[i])
            if n <= room:
                chosen.append(i)
                room -= n
        taken = set(chosen)
        out = [self.buffer[i] for i in chosen]
        self.buffer = [p for i, p in enumerate(self.buffer) if i not in taken]
        self.buffered_tokens -= sum(len(p) for p in out)
        return out


def pack_documents(docs: Iterable[Document], seq_len: int, buffer_docs: int = 64) -> list[PackedSequence]:
    """Pack a finite stream of documents; the buffer is flushed at the end."""
    packer = Packer(seq_len, buffer_docs)
    out: list[PackedSequence] = []
    for d in docs:
        packer.add(d)
        while packer.ready():
            out.append(build_sequence(packer.pop(), seq_len))
    while packer.buffer:
        out.append(build_sequence(packer.pop(), seq_len))
    return out


def packing_efficiency(seqs: list[PackedSequence], seq_len: int | None = None) -> float:
    """Real tokens / (num_sequences * seq_len): the share of fixed-length rows holding real tokens."""
    if not seqs:
        raise ValueError("packing_efficiency: seqs is empty")
    n = seq_len or seqs[0].seq_len
    return sum(s.num_tokens for s in seqs) / (len(seqs) * n)
