"""Dedup step: exact, near-duplicate-text (MinHash LSH) and near-duplicate-image (dHash) deduplication.

Order-stable: records are visited in input order (datasets in the order given, rows in shard order); the
first occurrence is kept, a later one goes to ``out_dir/duplicates/`` with ``duplicate_of`` = the id of the
EARLIEST kept record it matches and ``method``. Only kept records enter the indexes, so ``duplicate_of``
always names a kept row. Comparisons span all input rows whatever their ``kind``. Nothing is deleted.

Methods, tried in this order for each record:

- ``exact``: sha256 over the normalised text plus the sha256 of every image's bytes (in order). Text
  normalisation (``normalize_text``): Unicode NFKC, casefold (lowercase), every Unicode punctuation
  character (category P*) replaced by a space, whitespace runs collapsed to one space, stripped.
  ``messages`` records hash ``role + normalised content`` per turn.
- ``minhash`` (records without images): Jaccard similarity of word-``shingle_size``-gram sets of the
  normalised text (placeholders removed), estimated with ``datasketch.MinHash`` (fixed ``seed``,
  ``num_perm`` permutations); candidates come from ``MinHashLSH`` at ``threshold`` and are confirmed by the
  estimated Jaccard >= ``threshold`` (Broder 1997; Leskovec et al., MMDS ch. 3). A text shorter than one
  shingle is a single shingle (the whole text).
- ``phash`` (records with images): a 64-bit difference hash per image (dHash: grayscale, area-resize to
  9x8, bit = left neighbour brighter than right by more than ``dhash_margin`` gray levels). A record is an
  image near-duplicate of an earlier kept record when both have the same number of images, EVERY image is
  within ``image_hamming_threshold`` bits of the image at the same position, and (when
  ``image_dup_requires_text_match``, the default) its text is a near-duplicate of the earlier one (estimated
  Jaccard >= ``threshold``) or empty-ish (no word left once placeholders are removed). A same picture with a
  different caption is a legitimate different sample, hence the text condition. Candidates come from a
  band index on the first image's hash: 64 bits split into ``t + 1`` bands, so by pigeonhole two hashes
  within ``t`` bits share at least one band exactly; only candidates are Hamming-checked (no O(n^2) scan).

The text condition of ``phash`` uses the same MinHash signatures even when ``minhash`` is off. An
undecodable image (the filter step quarantines those) only disables ``phash`` for its record. Images are
decoded on a thread pool one batch ahead of the sequential pass; the result does not depend on the number
of threads.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import math
import os
import unicodedata
import warnings
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from datasketch import MinHash, MinHashLSH
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from tasks.data.filter import document_text, strip_placeholders
from tasks.data.images import MAX_PIXELS
from tasks.data.io import DEFAULT_ROWS_PER_SHARD, ShardWriter, iter_rows
from tasks.data.schema import DUPLICATE_SCHEMA, RECORD_SCHEMA
from tasks.io.files import staged_dir
from tasks.io.manifest import Manifest, is_up_to_date, read_manifest, write_manifest

STEP = "dedup"
METHODS = ("exact", "minhash", "phash")
_SCHEME = "affine32"
_BATCH = 256  # rows whose images are hashed together on the thread pool


class DedupConfig(BaseModel):
    """Configuration of ``run_dedup``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    exact: bool = Field(True, description="drop exact duplicates (normalised text + image bytes hashes)")
    minhash: bool = Field(
        True, description="drop near-duplicate texts of records without images (MinHash LSH)"
    )
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations")
    threshold: float = Field(
        0.8, gt=0.0, lt=1.0, description="Jaccard similarity at/above which texts are near-dups"
    )
    shingle_size: int = Field(5, ge=1, le=32, description="words per shingle (word n-grams)")
    seed: int = Field(1, ge=0, description="MinHash permutation seed (fixed for determinism)")
    phash: bool = Field(True, description="drop image near-duplicates (dHash on every image)")
    image_hamming_threshold: int = Field(
        4, ge=0, le=31, description="images whose 64-bit dHashes differ in <= this many bits match"
    )
    dhash_margin: float = Field(
        1.0,
        ge=0.0,
        description="gray levels a pixel must exceed its right neighbour by for a 1 bit (0 = classic)",
    )
    image_dup_requires_text_match: bool = Field(
        True,
        description="an image near-dup also needs a near-duplicate (or empty-ish) text; False: images alone",
    )
    rows_per_shard: int = Field(DEFAULT_ROWS_PER_SHARD, ge=1, description="rows per output Parquet shard")


# ---------------------------------------------------------------- text


class _PunctToSpace(dict):
    """``str.translate`` table: Unicode punctuation (category P*) -> space; filled per code point seen."""

    def __missing__(self, cp: int) -> str:
        ch = chr(cp)
        out = " " if unicodedata.category(ch).startswith("P") else ch
        self[cp] = out
        return out


_PUNCT_TO_SPACE = _PunctToSpace()


def normalize_text(text: str) -> str:
    """NFKC, casefold, punctuation -> space, collapse whitespace, strip."""
    t = unicodedata.normalize("NFKC", text).casefold().translate(_PUNCT_TO_SPACE)
    return " ".join(t.split())


def exact_key(
    row: dict[str, Any], image_digests: list[bytes] | None = None, norm_text: str | None = None
) -> bytes:
    """sha256 of the normalised text (or role-tagged turns) and the image bytes' sha256s.

    ``image_digests`` / ``norm_text`` (``normalize_text(row["text"])``) may be passed when already computed.
    """
    if image_digests is None:
        image_digests = [hashlib.sha256(im["data"]).digest() for im in row.get("images") or []]
    h = hashlib.sha256()
    if row.get("messages") is not None:
        for m in row["messages"]:
            h.update(f"{m['role']}\x1f{normalize_text(m['content'])}\x1e".encode())
    else:
        norm = normalize_text(row.get("text") or "") if norm_text is None else norm_text
        h.update(b"T\x1f" + norm.encode())
    for d in image_digests:
        h.update(b"\x1d" + d)
    return h.digest()


def shingles(words: list[str], k: int) -> list[str]:
    """Distinct word k-grams in order of first appearance; a text shorter than k is one shingle."""
    if not words:
        return []
    if len(words) <= k:
        return [" ".join(words)]
    return list(dict.fromkeys(" ".join(words[i : i + k]) for i in range(len(words) - k + 1)))


# ---------------------------------------------------------------- images


def dhash(img: Image.Image, margin: float = 1.0) -> int:
    """64-bit difference hash: gray, area-resize to 9x8, bit = pixel > right neighbour + margin (row-major)."""
    gray = img.convert("L")
    factor = min(gray.width // 64, gray.height // 64)
    if factor > 1:
        gray = gray.reduce(factor)  # cheap box pre-shrink of large images
    small = np.asarray(gray.convert("F").resize((9, 8), Image.Resampling.BOX), dtype=np.float64)  # (8, 9)
    bits = (small[:, :-1] - small[:, 1:]) > margin  # (8, 8)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class HammingIndex:
    """Hashes of ``bits`` bits, queried for all entries within ``threshold`` bits (band pigeonhole)."""

    def __init__(self, threshold: int, bits: int = 64):
        if not 0 <= threshold < bits:
            raise ValueError(f"threshold must be in [0, {bits}), got {threshold}")
        self.threshold = threshold
        nb = threshold + 1
        edges = [round(i * bits / nb) for i in range(nb + 1)]
        self._bands = [(lo, (1 << (hi - lo)) - 1) for lo, hi in itertools.pairwise(edges)]
        self._tables: list[defaultdict[int, list[int]]] = [defaultdict(list) for _ in self._bands]
        self._hashes: list[int] = []

    def add(self, h: int) -> int:
        """Insert a hash; returns its position."""
        pos = len(self._hashes)
        self._hashes.append(h)
        for table, (shift, mask) in zip(self._tables, self._bands, strict=True):
            table[(h >> shift) & mask].append(pos)
        return pos

    def query(self, h: int) -> list[int]:
        """Positions (ascending) of inserted hashes within ``threshold`` bits of ``h``."""
        cands: set[int] = set()
        for table, (shift, mask) in zip(self._tables, self._bands, strict=True):
            cands.update(table.get((h >> shift) & mask, ()))
        return sorted(p for p in cands if hamming(self._hashes[p], h) <= self.threshold)


def dhash_bytes(data: bytes, margin: float = 1.0) -> int | None:
    """dHash of encoded image bytes, or None when they do not fully decode (within ``images.MAX_PIXELS``).

    (JPEG ``draft`` decoding at a reduced DCT scale is deliberately not used: it moved hashes of the same
    picture by up to 18 bits against a full decode.)
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_PIXELS:
                return None
            img.load()
            return dhash(img, margin)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None


# ---------------------------------------------------------------- step


class _Deduper:
    """Streaming state: indexes over the kept records only."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self._perms = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=_SCHEME).permutations
        self._need = math.ceil(cfg.threshold * cfg.num_perm - 1e-9)  # equal slots for Jaccard >= threshold
        self.lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
        self.images = HammingIndex(cfg.image_hamming_threshold)
        self.exact: dict[bytes, int] = {}
        self.ids: list[str] = []  # kept position -> id
        self.sigs: list[np.ndarray | None] = []  # kept position -> MinHash hash values (num_perm,)
        self.img_hashes: dict[int, tuple[int, ...]] = {}  # kept position -> dHashes
        self.first_image_pos: dict[int, int] = {}  # HammingIndex position -> kept position

    def _minhash(self, words: list[str]) -> MinHash | None:
        sh = shingles(words, self.cfg.shingle_size)
        if not sh:
            return None
        m = MinHash(num_perm=self.cfg.num_perm, seed=self.cfg.seed, permutations=self._perms, scheme=_SCHEME)
        m.update_batch([s.encode() for s in sh])
        return m

    def _similar(self, sig: np.ndarray | None, pos: int) -> bool:
        """Estimated Jaccard (share of equal MinHash slots) >= threshold."""
        other = self.sigs[pos]
        if sig is None or other is None:
            return False
        return int(np.count_nonzero(sig == other)) >= self._need

    def visit(
        self, row: dict[str, Any], digests: list[bytes], hashes: tuple[int, ...] | None
    ) -> tuple[str, str] | None:
        """(kept id, method) when ``row`` duplicates a kept record; else keeps it and returns None.

        ``digests``: sha256 of each image's bytes; ``hashes``: their dHashes (None: phash off or undecodable).
        """
        cfg = self.cfg
        if row.get("messages") is None:  # normalise once; placeholders (kept by NFKC/casefold) dropped after
            norm = normalize_text(row.get("text") or "")
            words = strip_placeholders(norm).split()
        else:
            norm, words = None, normalize_text(strip_placeholders(document_text(row))).split()
        key = exact_key(row, digests, norm) if cfg.exact else None
        if key is not None and key in self.exact:
            return self.ids[self.exact[key]], "exact"
        has_images = bool(digests)
        m = self._minhash(words)
        sig = None if m is None else m.hashvalues

        if not has_images and cfg.minhash and m is not None:
            found = sorted(int(p) for p in self.lsh.query(m) if self._similar(sig, int(p)))
            if found:
                return self.ids[found[0]], "minhash"
        if hashes:
            for ipos in self.images.query(hashes[0]):
                pos = self.first_image_pos[ipos]
                other = self.img_hashes[pos]
                if len(other) != len(hashes):
                    continue
                if any(
                    hamming(a, b) > cfg.image_hamming_threshold for a, b in zip(hashes, other, strict=True)
                ):
                    continue
                if not cfg.image_dup_requires_text_match or not words or self._similar(sig, pos):
                    return self.ids[pos], "phash"

        pos = len(self.ids)  # keep it
        self.ids.append(row["id"])
        self.sigs.append(sig)
        if key is not None:
            self.exact[key] = pos
        if not has_images and cfg.minhash and m is not None:
            self.lsh.insert(pos, m, check_duplication=False)
        if hashes:
            self.img_hashes[pos] = hashes
            self.first_image_pos[self.images.add(hashes[0])] = pos
        return None


def _batches(dirs: list[Path], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for d in dirs:
        for row in iter_rows(d, RECORD_SCHEMA):
            batch.append(row)
            if len(batch) >= size:
                yield batch
                batch = []
    if batch:
        yield batch


def run_dedup(
    in_dirs: Path | list[Path], out_dir: Path, cfg: DedupConfig, *, workers: int | None = None
) -> Manifest:
    """Keep the first occurrence of each record across ``in_dirs`` (in order); later copies -> duplicates/.

    ``workers``: threads decoding images for the dHash (default: up to 8 CPUs); outputs do not depend on it.
    """
    dirs = [Path(in_dirs)] if isinstance(in_dirs, str | Path) else [Path(d) for d in in_dirs]
    if not dirs:
        raise ValueError("in_dirs: expected at least one input dataset directory, got none")
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"dedup input dataset {d} does not exist (expected a dataset directory)")
    out_dir = Path(out_dir)
    parents = [read_manifest(d).parent_of(d) for d in dirs]
    if is_up_to_date(out_dir, config=cfg, parents=parents):
        return read_manifest(out_dir)
    workers = workers or min(8, os.cpu_count() or 1)
    with staged_dir(out_dir) as stage, ThreadPoolExecutor(max_workers=workers) as pool:
        accepted = ShardWriter(stage, RECORD_SCHEMA, cfg.rows_per_shard)
        dups = ShardWriter(stage / "duplicates", DUPLICATE_SCHEMA, cfg.rows_per_shard)
        by_method = dict.fromkeys(METHODS, 0)
        deduper = _Deduper(cfg)
        n_in = 0
        hash_one = partial(dhash_bytes, margin=cfg.dhash_margin)

        def submit(
            batch: list[dict[str, Any]],
        ) -> tuple[list[dict[str, Any]], list[list[bytes]], dict[bytes, Any]]:
            """Start hashing the batch's distinct images on the pool (overlaps the sequential dedup)."""
            digests = [[hashlib.sha256(im["data"]).digest() for im in r["images"]] for r in batch]
            futures: dict[bytes, Any] = {}
            if cfg.phash:
                for r, ds in zip(batch, digests, strict=True):
                    for d, im in zip(ds, r["images"], strict=True):
                        if d not in futures:
                            futures[d] = pool.submit(hash_one, im["data"])
            return batch, digests, futures

        pending = None
        for nxt in itertools.chain(_batches(dirs, _BATCH), [None]):
            current, pending = pending, (submit(nxt) if nxt is not None else None)
            if current is None:
                continue
            batch, digests, futures = current
            for row, ds in zip(batch, digests, strict=True):
                n_in += 1
                hs = [futures[d].result() for d in ds] if futures else []
                hit = deduper.visit(row, ds, tuple(hs) if hs and None not in hs else None)
                if hit is None:
                    accepted.write(row)
                else:
                    by_method[hit[1]] += 1
                    dups.write({**row, "duplicate_of": hit[0], "method": hit[1]})
        n_acc, n_dup = accepted.close(), dups.close()
        if n_acc + n_dup != n_in:  # pragma: no cover - invariant
            raise AssertionError(f"dedup lost rows: {n_acc} + {n_dup} != {n_in}")
        counts = {"input": n_in, "accepted": n_acc, "duplicates": n_dup, "by_method": by_method}
        manifest = write_manifest(
            stage, kind="dataset", step=STEP, config=cfg, parents=parents, counts=counts
        )
    return manifest
