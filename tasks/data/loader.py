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
axis; ``cu_seqlens`` marks every document, so a batch is exactly what ``KimiVL.forward`` takes. A batch is a
``PackedBatch``: its token fields are built at once, its images only when ``pixel_values`` is first read
(or a range of them, ``image_patches``): every rank draws the whole global batch (the token clock counts
all of it), but decodes the images of its own micro-batches only (``images_decoded`` counts them). Images
are decoded (``decode_image``), normalised (``to_tensor``) and patchified at the grid stored by the tokenize
step (``image_to_patches``); a grid that differs from the stored one is an error naming the document.

State (``state_dict``): JSON-serialisable, captures the sampler RNG (``bit_generator.state``), every
source's epoch and position in its permutation, the tokens drawn (schedule progress) and emitted, and the
packer's buffer as (source, row, start, end) references. ``load_state_dict`` on a fresh loader with the same
mixture gives the identical subsequent batches.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kimivl_model.image_processing import image_to_patches
from kimivl_model.lm import positions_from_cu_seqlens
from tasks.data.images import decode_image, to_tensor
from tasks.data.io import read_table
from tasks.data.mixture import ShareSchedule, check_mixture
from tasks.data.pack import Document, MediaIds, PackedSequence, Packer, Piece, build_sequence
from tasks.data.schema import TOKENIZED_SCHEMA
from tasks.data.special_tokens import SpecialIds
from tasks.io.manifest import config_hash, read_manifest

STATE_VERSION = 1


class SourceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="unique source name (used in state and accounting)")
    path: Path = Field(description="tokenized dataset directory (output of the tokenize step)")
    weight: float = Field(ge=0.0, description="relative per-document draw probability")
    group: str | None = Field(None, description="schedule group (default: the source name)")

    @property
    def group_name(self) -> str:
        return self.group or self.name


class MixtureConfig(BaseModel):
    """A stage's data mixture, packing and batch size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: list[SourceSpec] = Field(min_length=1, description="tokenized datasets and their weights")
    schedule: ShareSchedule | None = Field(None, description="optional share schedule of one source group")
    token_budget: int | None = Field(None, ge=1, description="stage token budget (the schedule's time axis)")
    seq_len: int = Field(8192, ge=8, description="tokens per packed sequence (upper bound; never padded)")
    micro_batch_tokens: int = Field(8192, ge=8, description="tokens per batch: a multiple of seq_len")
    seed: int = Field(0, ge=0, description="seed of the source sampler and the per-epoch shuffles")
    pack_buffer_docs: int = Field(64, ge=1, description="pieces buffered before packing (FFD window)")
    weight_unit: Literal["documents", "tokens"] = Field(
        "documents",
        description="weights (and schedule shares) are per drawn document, or per token: the draw "
        "probability of each source is then divided by its mean document length",
    )

    @model_validator(mode="after")
    def _check(self) -> MixtureConfig:
        if self.micro_batch_tokens % self.seq_len:
            raise ValueError(
                f"micro_batch_tokens={self.micro_batch_tokens} must be a multiple of seq_len={self.seq_len}"
            )
        check_mixture(self.sources, self.schedule, lambda s: s.group_name)
        if self.schedule is not None and self.token_budget is None:
            raise ValueError("token_budget is required with a schedule")
        return self

    def probabilities(self, tokens_drawn: int) -> np.ndarray:
        """(num_sources,) draw probabilities after ``tokens_drawn`` tokens."""
        w = np.array([s.weight for s in self.sources], dtype=np.float64)
        if self.schedule is None:
            return w / w.sum()
        sch = self.schedule
        assert self.token_budget is not None
        p = min(tokens_drawn / self.token_budget, 1.0)
        share = sch.start + (sch.end - sch.start) * p
        inside = np.array([s.group_name == sch.group for s in self.sources])
        probs = np.zeros_like(w)
        probs[inside] = share * w[inside] / w[inside].sum()
        if (~inside).any() and w[~inside].sum() > 0:
            probs[~inside] = (1.0 - share) * w[~inside] / w[~inside].sum()
        return probs / probs.sum()

    def state_hash(self) -> str:
        """Config hash without the dataset paths (a moved workspace may resume; data is checked by hash)."""
        d = self.model_dump(mode="json")
        for s in d["sources"]:
            s.pop("path")
        if d["weight_unit"] == "documents":  # the default: states saved before the field existed still load
            d.pop("weight_unit")
        return config_hash(d)


class TokenizedSource:
    """One tokenized dataset held as an Arrow table, walked in a per-epoch seeded permutation."""

    def __init__(self, spec: SourceSpec, seed: int) -> None:
        path = Path(spec.path)
        if not path.is_dir():
            raise FileNotFoundError(f"sources[{spec.name!r}].path: {path} is not a directory")
        m = read_manifest(path)
        if m.kind != "tokenized" or "image_processing" not in m.extra:
            raise ValueError(
                f"sources[{spec.name!r}].path: {path} is a {m.kind!r} dataset, expected 'tokenized'"
            )
        if "tokenizer" not in m.extra:
            raise ValueError(
                f"sources[{spec.name!r}].path: {path}'s manifest does not record its tokenizer's special ids "
                f"(tokenized by an older version): rerun `kimivl data tokenize`"
            )
        self.name = spec.name
        self.content_hash = m.content_hash
        self.special = SpecialIds.from_dict(m.extra["tokenizer"]["special_ids"], str(path))
        self.media_ids = MediaIds.of(self.special)
        self.image_cfg: dict[str, int] = m.extra["image_processing"]
        self.table: pa.Table = read_table(path, TOKENIZED_SCHEMA)
        if self.table.num_rows == 0:
            raise ValueError(f"sources[{spec.name!r}].path: {path} holds no documents")
        self._salt = zlib.crc32(spec.name.encode())
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self.docs_drawn = 0
        self._perm: np.ndarray | None = None
        # mean tokens per document (all modalities): converts token weights into draw probabilities
        self.mean_tokens = float(pc.mean(pc.list_value_length(self.table.column("input_ids"))).as_py())

    def permutation(self) -> np.ndarray:
        if self._perm is None:
            rng = np.random.default_rng([self.seed, self.epoch, self._salt])
            self._perm = rng.permutation(self.table.num_rows)
        return self._perm

    def next_row(self) -> int:
        if self.position >= self.table.num_rows:
            self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        row = int(self.permutation()[self.position])
        self.position += 1
        self.docs_drawn += 1
        return row

    def document(self, row: int) -> Document:
        row_dict = self.table.slice(row, 1).to_pylist()[0]
        return Document.from_row(row_dict, self.media_ids, source=self.name, row_index=row)


def common_special(sources: list[TokenizedSource]) -> SpecialIds:
    """The special ids every source was tokenized with (one model reads them all)."""
    if len({s.special for s in sources}) > 1:
        raise ValueError(
            "sources: tokenized with different tokenizers (special ids "
            + "; ".join(f"{s.name}: media_pad={s.special.media_pad}" for s in sources)
            + "): tokenize every source with the phase's tokenizer"
        )
    return sources[0].special


class PackedBatch(Mapping[str, Any]):
    """One collated batch (the keys of ``PackedLoader.collate`` or ``CaptionLoader``) whose
    ``pixel_values`` are decoded on first access and kept: ``decode(first, last)`` returns the patches of
    images ``[first, last)``; ``image_patches(first, last)`` decodes only those (a sequence-parallel slice's,
    ``KimiVL.shard_batch``)."""

    def __init__(
        self, fields: dict[str, Any], decode: Callable[[int, int], torch.Tensor], images: int
    ) -> None:
        self._fields, self._decode, self._images = fields, decode, images
        self._pixels: torch.Tensor | None = None

    def __getitem__(self, key: str) -> Any:
        if key != "pixel_values":
            return self._fields[key]
        if self._pixels is None:
            self._pixels = self._decode(0, self._images)
        return self._pixels

    def __iter__(self) -> Iterator[str]:
        yield from self._fields
        yield "pixel_values"

    def __len__(self) -> int:
        return len(self._fields) + 1

    def image_patches(self, first: int, last: int) -> torch.Tensor:
        """(patches of images first..last-1, 3, p, p), decoded now unless the whole batch already was."""
        if self._pixels is not None:
            grid = self._fields["grid_hws"]
            cum = [0, *(grid[:, 0] * grid[:, 1]).cumsum(0).tolist()]
            return self._pixels[cum[first] : cum[last]]
        return self._decode(first, last)


def decode_patches(
    record: dict[str, Any], grid: Any, patch: int, merge: int, max_patches: int, where: str
) -> torch.Tensor:
    """One stored image's patches (h*w, 3, p, p) at ``max_patches``; its decoded size must be the record's
    and its patch grid the expected ``grid`` (errors name ``where``)."""
    t = to_tensor(decode_image(record["data"]))  # (3, H, W)
    if (t.shape[1], t.shape[2]) != (record["height"], record["width"]):
        raise ValueError(
            f"{where}: decoded image is {t.shape[2]}x{t.shape[1]} but the record says "
            f"{record['width']}x{record['height']}"
        )
    p, hw = image_to_patches(t, patch, merge, max_patches)
    if tuple(hw) != tuple(grid):
        raise ValueError(f"{where}: image grid {hw} differs from the stored grid {grid}")
    return p


class PackedLoader:
    """Infinite iterator of packed training batches (dicts of tensors) with exact save/restore."""

    def __init__(self, cfg: MixtureConfig) -> None:
        self.cfg = cfg
        self.sources = [TokenizedSource(s, cfg.seed) for s in cfg.sources]
        self._by_name = {s.name: s for s in self.sources}
        self.special = common_special(self.sources)
        self.rng = np.random.default_rng(cfg.seed)
        self.packer = Packer(cfg.seq_len, cfg.pack_buffer_docs)
        self.seqs_per_batch = cfg.micro_batch_tokens // cfg.seq_len
        self.tokens_drawn = 0
        self.batches = 0
        self.images_decoded = 0  # by this process (the images of the micro-batches it trains on)

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
        doc = src.document(src.next_row())
        self.tokens_drawn += len(doc)
        self.packer.add(doc)

    def next_sequence(self) -> PackedSequence:
        while not self.packer.ready():
            self._draw()
        return build_sequence(self.packer.pop(), self.cfg.seq_len)

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> PackedBatch:
        seqs = [self.next_sequence() for _ in range(self.seqs_per_batch)]
        batch = self.collate(seqs)
        self.batches += 1
        return batch

    # ------------------------------------------------------------------------------------ collate
    @staticmethod
    def _image_list(seqs: list[PackedSequence]) -> list[tuple[Any, ...]]:
        """(record, stored grid, source, document ids) of every image, in placeholder order."""
        return [
            (img, grid, src_name, s.doc_ids)
            for s in seqs
            for img, grid, src_name in zip(s.images, s.grid_hws, s.image_sources, strict=True)
        ]

    def decode_images(self, images: list[tuple[Any, ...]]) -> torch.Tensor:
        """Patches (P, 3, p, p) of ``images`` (``_image_list`` entries), decoded and checked now."""
        patches, patch = [], 14
        for img, grid, src_name, doc_ids in images:
            icfg = self._by_name[src_name].image_cfg
            patch = icfg["patch_size"]
            where = f"source {src_name!r} (documents {doc_ids})"
            patches.append(
                decode_patches(img, grid, patch, icfg["merge"], icfg["max_patches_per_image"], where)
            )
        self.images_decoded += len(images)
        return torch.cat(patches) if patches else torch.zeros(0, 3, patch, patch)

    def collate(self, seqs: list[PackedSequence]) -> PackedBatch:
        """Concatenate sequences into one flat batch (document boundaries kept in ``cu_seqlens``); images
        are decoded when the batch's ``pixel_values`` are first read."""
        offsets = np.cumsum([0] + [s.num_tokens for s in seqs[:-1]])
        cu = np.concatenate([[0]] + [s.cu_seqlens[1:] + o for s, o in zip(seqs, offsets, strict=True)])
        cu_t = torch.from_numpy(cu.astype(np.int64))
        src_index = {name: i for i, name in enumerate(self._by_name)}
        images = self._image_list(seqs)
        grid_hws = torch.tensor([g for _, g, _, _ in images], dtype=torch.int64).reshape(-1, 2)
        fields = {
            "input_ids": torch.from_numpy(np.concatenate([s.input_ids for s in seqs])),  # (T,)
            "labels": torch.from_numpy(np.concatenate([s.labels for s in seqs])),  # (T,)
            "position_ids": positions_from_cu_seqlens(cu_t),  # (T,) the model's rule
            "cu_seqlens": cu_t,  # (S+1,)
            "grid_hws": grid_hws,  # (N, 2); "pixel_values" (P, 3, 14, 14): PackedBatch, on first use
            "image_is_video": torch.tensor(
                [v for s in seqs for v in s.image_is_video], dtype=torch.bool
            ),  # (N,)
            "source_ids": torch.tensor(
                [src_index[n] for s in seqs for n in s.sources], dtype=torch.int64
            ),  # (S,)
            # (3,) text, image, video tokens as the packer counted them (``tokens_by_modality`` recounts: a check)
            "token_counts": torch.tensor(
                [
                    sum(s.num_text_tokens for s in seqs),
                    sum(s.num_image_tokens for s in seqs),
                    sum(s.num_video_tokens for s in seqs),
                ],
                dtype=torch.int64,
            ),
        }
        return PackedBatch(fields, lambda a, b: self.decode_images(images[a:b]), len(images))

    # -------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
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
        docs: dict[tuple[str, int], Document] = {}
        pieces = []
        for e in state["buffer"]:
            key = (e["source"], int(e["row"]))
            if key not in docs:
                docs[key] = self._by_name[e["source"]].document(key[1])
            pieces.append(Piece(docs[key], int(e["start"]), int(e["end"])))
        self.packer = Packer(self.cfg.seq_len, self.cfg.pack_buffer_docs)
        self.packer.add_pieces(pieces)


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
