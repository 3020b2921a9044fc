"""Stage mixtures and the resumable packed-batch loader.

Mixture sampling: at each document draw one source is chosen with probability equal to its current weight
(weights are per-DOCUMENT draw probabilities, normalised; with ``weight_unit: tokens`` they are token shares
and each is divided by the source's mean document length before drawing), using one seeded ``numpy`` Generator. With a
``linear`` schedule the chosen source group's share moves from ``start`` to ``end`` as the tokens drawn so
far go from 0 to ``token_budget`` (joint pretraining's rising multimodal share, REFERENCE.md stage 3):
share(p) = start + (end - start) * min(p, 1); the group's sources split that share by their weights, the
other sources split 1 - share by theirs. Each source walks its documents in a shuffled order, epoch by
epoch; the permutation of epoch e is drawn from ``default_rng([seed, e, crc32(source name)])``, so every
epoch (and every source) has its own order and restoring never needs to store a permutation.

Batches: ``micro_batch_tokens / seq_len`` packed sequences (``pack.Packer``) concatenated on one flat token
axis; ``cu_seqlens`` marks every document, so a batch is exactly what ``KimiVL.forward`` takes. The sampler
draws and packs documents by their metadata (``sources.DocRef``: length, image grids, media kind), so a
batch's boundaries, sources and token counts exist before any token is read. A batch is a ``PackedBatch``:
those fields at once, ``input_ids``/``labels`` when first read (its documents are read then, one read per
source), ``pixel_values`` when first read (or a range of them, ``image_patches``). Every rank plans the
whole global batch (the token clock counts all of it) but reads and decodes only its own micro-batches
(``batches_read``, ``images_decoded`` count them); DataLoader workers can do that reading ahead
(``tasks.data.workers``). Images are decoded (``decode_image``), normalised (``to_tensor``) and patchified
at the grid stored by the tokenize step (``image_to_patches``); a grid that differs from the stored one is
an error naming the document, as are tokens that disagree with the dataset's recorded counts.

State (``state_dict``): JSON-serialisable, captures the sampler RNG (``bit_generator.state``), every
source's epoch and position in its permutation, the tokens drawn (schedule progress) and emitted, and the
packer's buffer as (source, row, start, end) references. ``load_state_dict`` on a fresh loader with the same
mixture gives the identical subsequent batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kimivl_model.lm import positions_from_cu_seqlens
from tasks.data.pack import PackedSequence, Packer, Piece, build_sequence
from tasks.data.sources import (
    MixtureConfig,
    PackedBatch,
    SourceSpec,
    TokenizedSource,
    common_special,
    decode_patches,
)

if TYPE_CHECKING:
    from tasks.data.workers import WorkerReader

__all__ = [
    "MixtureConfig", "PackedBatch", "PackedLoader", "SourceSpec", "TokenizedSource", "common_special",
    "decode_patches", "tokens_by_modality", "tokens_by_source",
]  # fmt: skip

STATE_VERSION = 1


class SequencePlan:
    """One packed sequence as the sampler decided it: its pieces (over ``DocRef``s, no tokens) and the
    fields that follow from their metadata alone."""

    def __init__(self, pieces: list[Piece], merges: dict[str, int]) -> None:
        self.pieces = pieces
        self.lens = [len(p) for p in pieces]
        self.grids: list[tuple[int, int]] = []
        self.is_video: list[bool] = []
        self.image_tokens = self.video_tokens = 0
        for p in pieces:
            i0, i1 = p.image_range()
            grids = p.doc.grid_hws[i0:i1]
            video = p.doc.media_kind == "video"
            m = merges[p.doc.source]
            pads = sum((h // m) * (w // m) for h, w in grids)
            self.grids.extend(grids)
            self.is_video.extend([video] * len(grids))
            self.video_tokens += pads if video else 0
            self.image_tokens += 0 if video else pads

    @property
    def num_tokens(self) -> int:
        return sum(self.lens)

    def refs(self) -> list[tuple[str, int, int, int]]:
        """(source, row, start, end) of every piece: what a worker needs to read this sequence."""
        return [(p.doc.source, p.doc.row, p.start, p.end) for p in self.pieces]

    def expected(self) -> tuple[int, int, int, list[int]]:
        """What reading the sequence must give: tokens, image and video tokens, document lengths."""
        return self.num_tokens, self.image_tokens, self.video_tokens, list(self.lens)


def plan_fields(plans: list[SequencePlan], source_index: dict[str, int]) -> dict[str, Any]:
    """The fields of a batch that need no tokens: document boundaries, positions, image grids, sources and
    the token counts per modality (the packer's count; ``tokens_by_modality`` recounts from the tokens)."""
    lens = [n for s in plans for n in s.lens]
    cu_t = torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]).astype(np.int64))
    text = sum(s.num_tokens - s.image_tokens - s.video_tokens for s in plans)
    return {
        "position_ids": positions_from_cu_seqlens(cu_t),  # (T,) the model's rule
        "cu_seqlens": cu_t,  # (S+1,)
        "grid_hws": torch.tensor([g for s in plans for g in s.grids], dtype=torch.int64).reshape(-1, 2),
        "image_is_video": torch.tensor([v for s in plans for v in s.is_video], dtype=torch.bool),  # (N,)
        "source_ids": torch.tensor(
            [source_index[p.doc.source] for s in plans for p in s.pieces], dtype=torch.int64
        ),  # (S,)
        "token_counts": torch.tensor(
            [text, sum(s.image_tokens for s in plans), sum(s.video_tokens for s in plans)], dtype=torch.int64
        ),  # (3,) text, image, video
    }


LAZY_KEYS = ("input_ids", "labels")


def read_sequences(
    sources: dict[str, TokenizedSource], refs: list[list[tuple[str, int, int, int]]], seq_len: int
) -> list[PackedSequence]:
    """The packed sequences of ``refs`` (``SequencePlan.refs`` per sequence), their documents read now
    (one read per source)."""
    rows: dict[str, set[int]] = {}
    for seq in refs:
        for src, row, _, _ in seq:
            rows.setdefault(src, set()).add(row)
    docs = {(src, r): d for src, rs in rows.items() for r, d in sources[src].documents(sorted(rs)).items()}
    return [build_sequence([Piece(docs[(s, r)], a, b) for s, r, a, b in seq], seq_len) for seq in refs]


def token_fields(seqs: list[PackedSequence], expected: list[tuple[Any, ...]] | None = None) -> dict[str, Any]:
    """``input_ids`` and ``labels`` of a batch of sequences; checked against ``expected``
    (``SequencePlan.expected``: the metadata the sampler packed by) when given: a disagreement names the
    documents."""
    for seq, want in zip(seqs, expected or [], strict=False):
        built = (seq.num_tokens, seq.num_image_tokens, seq.num_video_tokens, np.diff(seq.cu_seqlens).tolist())
        if built != tuple(want):
            raise ValueError(
                f"documents {seq.doc_ids}: tokens read (tokens, image, video = {built[:3]}) differ from the "
                f"dataset's recorded counts {tuple(want)[:3]}: the dataset is inconsistent"
            )
    return {
        "input_ids": torch.from_numpy(np.concatenate([s.input_ids for s in seqs])),  # (T,)
        "labels": torch.from_numpy(np.concatenate([s.labels for s in seqs])),  # (T,)
    }


def image_list(seqs: list[PackedSequence]) -> list[tuple[Any, ...]]:
    """(record, stored grid, source, document ids) of every image, in placeholder order."""
    return [
        (img, grid, src_name, s.doc_ids)
        for s in seqs
        for img, grid, src_name in zip(s.images, s.grid_hws, s.image_sources, strict=True)
    ]


def decode_images(sources: dict[str, TokenizedSource], images: list[tuple[Any, ...]]) -> torch.Tensor:
    """Patches (P, 3, p, p) of ``images`` (``image_list`` entries), decoded and checked now."""
    patches, patch = [], 14
    for img, grid, src_name, doc_ids in images:
        icfg = sources[src_name].image_cfg
        patch = icfg["patch_size"]
        where = f"source {src_name!r} (documents {doc_ids})"
        patches.append(decode_patches(img, grid, patch, icfg["merge"], icfg["max_patches_per_image"], where))
    return torch.cat(patches) if patches else torch.zeros(0, 3, patch, patch)


class _Reading:
    """A batch's documents, read once when the batch first needs its tokens or images."""

    def __init__(self, loader: PackedLoader, plans: list[SequencePlan]) -> None:
        self.loader, self.plans = loader, plans
        self._seqs: list[PackedSequence] | None = None

    def sequences(self) -> list[PackedSequence]:
        if self._seqs is None:
            refs = [p.refs() for p in self.plans]
            self._seqs = read_sequences(self.loader._by_name, refs, self.loader.cfg.seq_len)
            self.loader.batches_read += 1
        return self._seqs

    def tokens(self) -> dict[str, Any]:
        return token_fields(self.sequences(), [p.expected() for p in self.plans])

    def decode(self, first: int, last: int) -> torch.Tensor:
        images = image_list(self.sequences())[first:last]
        self.loader.images_decoded += len(images)
        return decode_images(self.loader._by_name, images)


class PackedLoader:
    """Infinite iterator of packed training batches with exact save/restore. The sampler draws and packs
    documents by their metadata only; a batch reads its documents' tokens and images when first used, so a
    rank reads only the micro-batches it trains on (``batches_read``, ``images_decoded`` count them)."""

    def __init__(self, cfg: MixtureConfig) -> None:
        self.cfg = cfg
        self.sources = [TokenizedSource(s, cfg.seed) for s in cfg.sources]
        self._by_name = {s.name: s for s in self.sources}
        self._merges = {s.name: int(s.image_cfg["merge"]) for s in self.sources}
        self._index = {s.name: i for i, s in enumerate(self.sources)}
        self.special = common_special(self.sources)
        self.rng = np.random.default_rng(cfg.seed)
        self.packer = Packer(cfg.seq_len, cfg.pack_buffer_docs)
        self.seqs_per_batch = cfg.micro_batch_tokens // cfg.seq_len
        self.tokens_drawn = 0
        self.batches = 0
        self.batches_read = 0  # by this process: batches whose documents it read
        self.images_decoded = 0  # by this process (the images of the micro-batches it trains on)
        self._reader: WorkerReader | None = None  # use_workers

    @property
    def source_names(self) -> list[str]:
        """Source names in ``source_ids`` order (a batch's ``source_ids`` index this list)."""
        return [s.name for s in self.sources]

    # ----------------------------------------------------------------------------------- sampling
    def draw_probabilities(self) -> np.ndarray:
        """(num_sources,) probabilities of the next document draw. With ``weight_unit: tokens`` each
        source's share is divided by its mean document length: source i then yields tokens at the rate
        p_i / mean_i * mean_i, i.e. the expected token shares are the configured shares."""
        p = self.cfg.probabilities(self.tokens_drawn)
        if self.cfg.weight_unit == "tokens":
            p = p / np.array([s.mean_tokens for s in self.sources])
            p = p / p.sum()
        return p

    def _draw(self) -> None:
        cum = np.cumsum(self.draw_probabilities())
        k = int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"))
        src = self.sources[min(k, len(self.sources) - 1)]
        doc = src.next_ref()
        self.tokens_drawn += len(doc)
        self.packer.add(doc)  # type: ignore[arg-type]  # a DocRef: length, grids, media blocks on demand

    def next_plan(self) -> SequencePlan:
        while not self.packer.ready():
            self._draw()
        return SequencePlan(self.packer.pop(), self._merges)

    def __iter__(self) -> PackedLoader:
        return self

    def next_plans(self) -> list[SequencePlan]:
        """The sequences of the next batch, as planned (nothing read)."""
        plans = [self.next_plan() for _ in range(self.seqs_per_batch)]
        self.batches += 1
        return plans

    def __next__(self) -> PackedBatch:
        if self._reader is not None:
            return self._reader.next()
        return self.batch(self.next_plans())

    def batch(self, plans: list[SequencePlan]) -> PackedBatch:
        """A batch of planned sequences: its metadata fields now, tokens and images on first use."""
        reading = _Reading(self, plans)
        n_images = sum(len(p.grids) for p in plans)
        fields = plan_fields(plans, self._index)
        return PackedBatch(fields, reading.decode, n_images, load=reading.tokens, lazy_keys=LAZY_KEYS)

    # ------------------------------------------------------------------------------------ workers
    def use_workers(
        self, num_workers: int, is_local: Callable[[int], bool], prefetch: int = 2, pin_memory: bool = False
    ) -> None:
        """Read and decode the batches ``is_local(batch number)`` selects in ``num_workers`` DataLoader
        worker processes, ``prefetch`` batches ahead per worker (``tasks.data.workers``); 0 = in this
        process, when a batch is first used."""
        from tasks.data.workers import WorkerReader

        old, self._reader = self._reader, None
        if old is not None:  # workers ran ahead: continue after the last batch served, not the look-ahead
            self.load_state_dict(old.state)
        if num_workers > 0:
            self._reader = WorkerReader(self, num_workers, is_local, prefetch, pin_memory)

    # -------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The state after the last batch served (with workers: not the planner's look-ahead)."""
        return self._reader.state if self._reader is not None else self.planner_state()

    def planner_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "mixture_hash": self.cfg.state_hash(),
            "rng": self.rng.bit_generator.state,
            "sources": [
                {
                    "name": s.name,
                    "content_hash": s.content_hash,
                    "epoch": s.epoch,
                    "position": s.position,
                    "docs_drawn": s.docs_drawn,
                }
                for s in self.sources
            ],
            "tokens_drawn": self.tokens_drawn,
            "batches": self.batches,
            "buffer": [
                {"source": p.doc.source, "row": p.doc.row, "start": p.start, "end": p.end}
                for p in self.packer.buffer
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state: version {state.get('version')!r}, expected {STATE_VERSION}")
        if state["mixture_hash"] != self.cfg.state_hash():
            raise ValueError(
                "state: saved with a different mixture config (sources, weights, schedule, seq_len...)"
            )
        if [s["name"] for s in state["sources"]] != [s.name for s in self.sources]:
            raise ValueError(
                f"state: sources {[s['name'] for s in state['sources']]} differ from the mixture's"
            )
        for saved, src in zip(state["sources"], self.sources, strict=True):
            if saved["content_hash"] != src.content_hash:
                raise ValueError(f"state: source {src.name!r} data changed since the state was saved")
            src.epoch, src.position, src.docs_drawn = (
                int(saved["epoch"]),
                int(saved["position"]),
                saved["docs_drawn"],
            )
            src._perm = None
        self.rng.bit_generator.state = state["rng"]
        self.tokens_drawn = int(state["tokens_drawn"])
        self.batches = int(state["batches"])
        rows: dict[str, list[int]] = {}
        for e in state["buffer"]:
            rows.setdefault(e["source"], []).append(int(e["row"]))
        refs = {(s, r): d for s, rs in rows.items() for r, d in self._by_name[s].refs(rs).items()}
        pieces = [
            Piece(refs[(e["source"], int(e["row"]))], int(e["start"]), int(e["end"])) for e in state["buffer"]
        ]
        self.packer = Packer(self.cfg.seq_len, self.cfg.pack_buffer_docs)
        self.packer.add_pieces(pieces)
        if self._reader is not None:
            self._reader.reset()


def tokens_by_source(batch: dict[str, torch.Tensor], names: list[str]) -> dict[str, int]:
    """Tokens of a packed batch per source (text + image + video, all of a document's tokens), from its
    ``cu_seqlens`` segments and their ``source_ids``; sums to the batch's token count. ``names`` is the
    loader's ``source_names``."""
    lens = batch["cu_seqlens"].to(torch.int64).diff()
    ids = batch["source_ids"].to(torch.int64)
    if ids.numel() != lens.numel():
        raise ValueError(f"batch has {lens.numel()} segments but {ids.numel()} source_ids")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(names)):
        raise ValueError(f"batch source_ids {ids.unique().tolist()} outside the {len(names)} sources {names}")
    per = torch.zeros(len(names), dtype=torch.int64).index_add_(0, ids, lens)
    return {n: int(v) for n, v in zip(names, per.tolist(), strict=True)}


def tokens_by_modality(batch: dict[str, torch.Tensor], media_pad_id: int, merge: int = 2) -> dict[str, int]:
    """Exact token accounting of a batch: text / image / video tokens actually present (no padding);
    ``media_pad_id`` = the tokenizer's ``<|media_pad|>`` (``PackedLoader.special.media_pad``)."""
    ids = batch["input_ids"]
    n_pad = int((ids == media_pad_id).sum())
    grids = batch["grid_hws"].to(torch.int64)
    per_image = (
        (grids[:, 0] // merge) * (grids[:, 1] // merge)
        if grids.numel()
        else torch.zeros(0, dtype=torch.int64)
    )
    if int(per_image.sum()) != n_pad:
        raise ValueError(
            f"batch holds {n_pad} <|media_pad|> tokens but its grid_hws give {int(per_image.sum())}"
        )
    video = int(per_image[batch["image_is_video"]].sum()) if per_image.numel() else 0
    return {
        "text": int(ids.numel()) - n_pad,
        "image": n_pad - video,
        "video": video,
        "padding": 0,
        "total": int(ids.numel()),
    }
