"""A mixture's sources: their config, the tokenized datasets they read (``tasks.data.row_store``, local or
S3), the planner's token-free view of a document (``DocRef``) and the lazily filled batch (``PackedBatch``).

A ``TokenizedSource`` walks its documents in a shuffled order, epoch by epoch; the permutation of epoch e
is drawn from ``default_rng([seed, e, crc32(source name)])``, so every epoch (and every source) has its own
order and restoring never needs to store a permutation. The sampler needs only each drawn document's
length, image grids and media kind (``DocRef``): they are read in windows of the permutation
(``window`` rows per ``take``, only those columns); the tokens and image bytes of a document are read by
the rank that trains on it, when it needs them (``TokenizedSource.documents``).
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kimivl_model.image_processing import image_to_patches
from tasks.data.images import ImageDecodeError, decode_image, to_tensor
from tasks.data.mixture import ShareSchedule, check_mixture
from tasks.data.pack import Document, MediaIds, media_blocks
from tasks.data.row_store import RowStore, is_uri, join
from tasks.data.schema import TOKENIZED_SCHEMA
from tasks.data.special_tokens import SpecialIds
from tasks.io.manifest import MANIFEST_NAME, Manifest, ManifestError, config_hash, read_manifest

# what the sampler reads of a drawn document (no tokens, no image bytes)
META_COLUMNS = ["id", "media_kind", "grid_hws", "num_text_tokens", "num_image_tokens", "num_video_tokens"]
META_WINDOW = 256  # rows of the permutation whose metadata one read fetches


class SourceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="unique source name (used in state and accounting)")
    path: str = Field(description="tokenized dataset: a directory or an s3://bucket/prefix URI")
    weight: float = Field(ge=0.0, description="relative per-document draw probability")
    group: str | None = Field(None, description="schedule group (default: the source name)")

    @field_validator("path", mode="before")
    @classmethod
    def _path(cls, v: Any) -> str:
        return str(v) if isinstance(v, os.PathLike) else v

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


def read_dataset_manifest(path: str | os.PathLike) -> Manifest:
    """The manifest of a dataset directory, local or on S3."""
    if not is_uri(path):
        return read_manifest(Path(path))
    from tasks.io.storage import StorageError, read_bytes

    uri = str(join(path, MANIFEST_NAME))
    try:
        return Manifest.from_dict(json.loads(read_bytes(uri)))
    except StorageError as e:
        raise ManifestError(f"{uri}: unreadable ({e})") from None
    except (json.JSONDecodeError, TypeError) as e:
        raise ManifestError(f"{uri}: unreadable manifest ({e})") from None


class DocRef:
    """The sampler's view of a document: its length, image grids and media kind, no tokens. Its media
    blocks (needed only to cut a document longer than ``seq_len``) are read on demand."""

    def __init__(self, meta: dict[str, Any], owner: TokenizedSource, row: int) -> None:
        self.id = meta["id"]
        self.n = int(meta["num_text_tokens"] + meta["num_image_tokens"] + meta["num_video_tokens"])
        self.grid_hws = tuple((int(g["h"]), int(g["w"])) for g in meta["grid_hws"])
        self.media_kind = meta["media_kind"]
        self.source, self.row, self._owner = owner.name, row, owner

    def __len__(self) -> int:
        return self.n

    @cached_property
    def media_blocks(self) -> list[tuple[int, int]]:
        ids = self._owner.store.take([self.row], ["input_ids"]).column(0)[0].as_py()  # tokens, no image bytes
        return media_blocks(np.asarray(ids, dtype=np.int64), self._owner.media_ids, self.id)


class TokenizedSource:
    """One tokenized dataset (``RowStore``), walked in a per-epoch seeded permutation."""

    def __init__(self, spec: SourceSpec, seed: int, window: int = META_WINDOW) -> None:
        where = f"sources[{spec.name!r}].path"
        if not is_uri(spec.path) and not Path(spec.path).is_dir():
            raise FileNotFoundError(f"{where}: {spec.path} is not a directory")
        try:
            m = read_dataset_manifest(spec.path)
        except ManifestError as e:
            raise FileNotFoundError(f"{where}: {e}") from None
        if m.kind != "tokenized" or "image_processing" not in m.extra:
            raise ValueError(f"{where}: {spec.path} is a {m.kind!r} dataset, expected 'tokenized'")
        if "tokenizer" not in m.extra:
            raise ValueError(
                f"{where}: {spec.path}'s manifest does not record its tokenizer's special ids "
                f"(tokenized by an older version): rerun `kimivl data tokenize`"
            )
        self.name, self.path, self.window = spec.name, spec.path, window
        self.content_hash = m.content_hash
        self.special = SpecialIds.from_dict(m.extra["tokenizer"]["special_ids"], str(spec.path))
        self.media_ids = MediaIds.of(self.special)
        self.image_cfg: dict[str, int] = m.extra["image_processing"]
        self._store: RowStore | None = RowStore(spec.path, TOKENIZED_SCHEMA)
        self.num_rows = self.store.num_rows
        if self.num_rows == 0:
            raise ValueError(f"{where}: {spec.path} holds no documents")
        # mean tokens per document (all modalities): converts token weights into draw probabilities
        self.mean_tokens = float(m.counts["tokens"]["total"]) / self.num_rows
        self._salt = zlib.crc32(spec.name.encode())
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self.docs_drawn = 0
        self._perm: np.ndarray | None = None
        self._window: tuple[list[str], dict[int, dict[str, Any]]] = ([], {})  # columns of upcoming rows

    def __getstate__(self) -> dict[str, Any]:  # for DataLoader workers: they reopen the store when used
        d = dict(self.__dict__)
        d["_store"], d["_window"], d["_perm"] = None, ([], {}), None
        return d

    @property
    def store(self) -> RowStore:
        if self._store is None:
            self._store = RowStore(self.path, TOKENIZED_SCHEMA)
        return self._store

    def permutation(self) -> np.ndarray:
        if self._perm is None:
            rng = np.random.default_rng([self.seed, self.epoch, self._salt])
            self._perm = rng.permutation(self.num_rows)
        return self._perm

    def next_row(self) -> int:
        if self.position >= self.num_rows:
            self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        row = int(self.permutation()[self.position])
        self.position += 1
        self.docs_drawn += 1
        return row

    def next_columns(self, columns: list[str]) -> tuple[int, dict[str, Any]]:
        """The next document of the walk: its row and ``columns``, read for a window of the permutation at
        a time (one ``take`` per ``window`` draws)."""
        row = self.next_row()
        cols, rows = self._window
        if cols != columns or row not in rows:
            upcoming = self.permutation()[self.position - 1 : self.position - 1 + self.window].tolist()
            table = self.store.take(upcoming, columns).to_pylist()
            self._window = (list(columns), dict(zip(upcoming, table, strict=True)))
        return row, self._window[1][row]

    def next_ref(self) -> DocRef:
        """The next document of the walk, as metadata."""
        row, meta = self.next_columns(META_COLUMNS)
        return DocRef(meta, self, row)

    def refs(self, rows: Iterable[int]) -> dict[int, DocRef]:
        """Metadata of ``rows`` (one read)."""
        rows = list(dict.fromkeys(int(r) for r in rows))
        table = self.store.take(rows, META_COLUMNS).to_pylist()
        return {r: DocRef(meta, self, r) for r, meta in zip(rows, table, strict=True)}

    def documents(self, rows: Iterable[int]) -> dict[int, Document]:
        """Whole documents (tokens, masks, image bytes) of ``rows`` (one read)."""
        rows = list(dict.fromkeys(int(r) for r in rows))
        table = self.store.take(rows).to_pylist()
        return {
            r: Document.from_row(d, self.media_ids, source=self.name, row_index=r)
            for r, d in zip(rows, table, strict=True)
        }

    def document(self, row: int) -> Document:
        return self.documents([row])[row]


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
    """One collated batch whose heavy fields are filled on first access: ``fields`` are there from the
    start; the keys of ``load()`` (tokens read from the dataset: ``input_ids``, ``labels``) are loaded on
    the first read of any of them; ``pixel_values`` are decoded on first read and kept: ``decode(first,
    last)`` returns the patches of images ``[first, last)``, ``image_patches(first, last)`` decodes only
    those (a sequence-parallel slice's, ``KimiVL.shard_batch``)."""

    def __init__(
        self,
        fields: dict[str, Any],
        decode: Callable[[int, int], torch.Tensor],
        images: int,
        load: Callable[[], dict[str, Any]] | None = None,
        lazy_keys: tuple[str, ...] = (),
    ) -> None:
        self._fields, self._decode, self._images = dict(fields), decode, images
        self._load, self._lazy = load, lazy_keys
        self._pixels: torch.Tensor | None = None

    @property
    def loaded(self) -> bool:
        """Whether this batch's tokens were read (a rank reads only the micro-batches it trains on)."""
        return self._load is None

    def _ensure(self) -> None:
        if self._load is not None:
            self._fields.update(self._load())
            self._load = None

    def __getitem__(self, key: str) -> Any:
        if key == "pixel_values":
            if self._pixels is None:
                self._pixels = self._decode(0, self._images)
            return self._pixels
        if key in self._lazy:
            self._ensure()
        return self._fields[key]

    def __iter__(self) -> Iterator[str]:
        keys = [*self._fields, *(k for k in self._lazy if k not in self._fields), "pixel_values"]
        yield from keys  # listed first: reading a lazy key while iterating adds fields

    def __len__(self) -> int:
        return len(set(self._fields) | set(self._lazy)) + 1

    def image_patches(self, first: int, last: int) -> torch.Tensor:
        """(patches of images first..last-1, 3, p, p), decoded now unless the whole batch already was."""
        if self._pixels is not None:
            grid = self._fields["grid_hws"]
            cum = [0, *(grid[:, 0] * grid[:, 1]).cumsum(0).tolist()]
            return self._pixels[cum[first] : cum[last]]
        return self._decode(first, last)

    def fill(self, fields: dict[str, Any], pixels: torch.Tensor) -> None:
        """The lazy fields and the patches, read and decoded elsewhere (a DataLoader worker)."""
        if set(fields) != set(self._lazy):
            raise ValueError(f"PackedBatch.fill: got fields {sorted(fields)}, expected {sorted(self._lazy)}")
        self._fields.update(fields)
        self._load, self._pixels = None, pixels


def decode_patches(
    record: dict[str, Any], grid: Any, patch: int, merge: int, max_patches: int, where: str
) -> torch.Tensor:
    """One stored image's patches (h*w, 3, p, p) at ``max_patches``; its decoded size must be the record's
    and its patch grid the expected ``grid`` (errors name ``where``)."""
    try:
        t = to_tensor(decode_image(record["data"]))  # (3, H, W)
    except ImageDecodeError as e:
        raise ImageDecodeError(f"{where}: {e}") from None
    if (t.shape[1], t.shape[2]) != (record["height"], record["width"]):
        raise ValueError(
            f"{where}: decoded image is {t.shape[2]}x{t.shape[1]} but the record says "
            f"{record['width']}x{record['height']}"
        )
    p, hw = image_to_patches(t, patch, merge, max_patches)
    if tuple(hw) != tuple(grid):
        raise ValueError(f"{where}: image grid {hw} differs from the stored grid {grid}")
    return p
