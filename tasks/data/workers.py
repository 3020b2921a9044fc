"""DataLoader worker processes that read and decode a rank's own micro-batches ahead of training.

The sampler (``PackedLoader``'s planning: source draws, packing, schedule) stays in the training process:
it is cheap (metadata only) and its state is the loader state. Reading a batch (its documents' tokens and
image bytes, ``read_sequences``) and decoding its images (``decode_images``: decode, normalise, patchify)
is the expensive part; ``WorkerReader`` hands it to a ``torch.utils.data.DataLoader`` whose workers get
the (source, row, start, end) references of each LOCAL batch from a sampler that runs the planner ahead.
Batches come back in order (``in_order``), ``prefetch`` per worker are in flight.

Exactness: a worker only turns references into tensors (no RNG, no state), so the batches are the same
with 0, 1 or N workers; the loader state saved after batch b is the planner's state right after planning
b (kept with each planned batch), not the planner's look-ahead position. Resuming rebuilds the planner
from that state and starts fresh workers: any number of them.

Workers are started with ``spawn`` (Lance and torch run thread pools; forking a process with live threads
can deadlock) and run single-threaded (torch, OpenMP and Lance pools: ``tasks.train.threads``), so ranks
and workers together use the cores they are given.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset

from tasks.data.sources import PackedBatch, TokenizedSource

if TYPE_CHECKING:
    from tasks.data.loader import PackedLoader, SequencePlan

Refs = list[list[tuple[str, int, int, int]]]
Key = tuple[int, Refs, list[tuple[Any, ...]]]  # batch number, pieces, expected counts per sequence


def _worker_init(_: int) -> None:
    from tasks.train.threads import single_threaded

    single_threaded()


class ReadBatches(Dataset):
    """Map-style dataset whose keys are ``(batch number, refs)``: a worker reads the batch's documents and
    decodes its images. Returns (batch number, token fields, pixel values, images decoded)."""

    def __init__(self, sources: dict[str, TokenizedSource], seq_len: int) -> None:
        self.sources, self.seq_len = sources, seq_len

    def __getitem__(self, key: Key) -> tuple[int, dict[str, torch.Tensor], torch.Tensor, int]:
        from tasks.data.loader import decode_images, image_list, read_sequences, token_fields

        number, refs, expected = key
        seqs = read_sequences(self.sources, refs, self.seq_len)
        images = image_list(seqs)
        return number, token_fields(seqs, expected), decode_images(self.sources, images), len(images)

    def __len__(self) -> int:  # keys come from the sampler; the DataLoader never asks
        raise TypeError("ReadBatches has no length: its keys come from the planner")


class _Keys:
    """The DataLoader's sampler: each ``iter`` runs the reader's planner ahead, yielding local batches."""

    def __init__(self, next_key: Callable[[], Key]) -> None:
        self._next_key = next_key

    def __iter__(self) -> Iterator[Key]:
        while True:
            yield self._next_key()


class WorkerReader:
    """Serves ``PackedLoader``'s batches in order; the ones ``is_local`` says this rank trains on arrive
    read and decoded by ``num_workers`` worker processes (the others stay unread: metadata only)."""

    def __init__(
        self,
        loader: PackedLoader,
        num_workers: int,
        is_local: Callable[[int], bool],
        prefetch: int = 2,
        pin_memory: bool = False,
    ) -> None:
        if num_workers < 1 or prefetch < 1:
            raise ValueError(f"num_workers and prefetch must be >= 1, got {num_workers} and {prefetch}")
        self.loader, self.num_workers, self.is_local = loader, num_workers, is_local
        self.prefetch, self.pin_memory = prefetch, pin_memory
        self._planned: deque[tuple[int, list[SequencePlan], dict[str, Any]]] = deque()
        self._local: deque[Key] = deque()
        self._results: Iterator[Any] | None = None
        self.state = loader.planner_state()  # the loader state after the last batch served

    def _plan(self) -> None:
        number = self.loader.batches
        plans = self.loader.next_plans()
        self._planned.append((number, plans, self.loader.planner_state()))
        if self.is_local(number):
            self._local.append((number, [p.refs() for p in plans], [p.expected() for p in plans]))

    def _next_key(self) -> Key:
        while not self._local:
            self._plan()
        return self._local.popleft()

    def _start(self) -> Iterator[Any]:
        dl = DataLoader(
            ReadBatches(self.loader._by_name, self.loader.cfg.seq_len),
            sampler=_Keys(self._next_key),  # type: ignore[arg-type]
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch,
            multiprocessing_context="spawn",
            worker_init_fn=_worker_init,
            pin_memory=self.pin_memory,
            timeout=float(os.environ.get("KIMIVL_LOADER_TIMEOUT", "600")),
        )
        return iter(dl)

    def next(self) -> PackedBatch:
        while not self._planned:
            self._plan()
        number, plans, state = self._planned.popleft()
        batch = self.loader.batch(plans)
        if self.is_local(number):
            if self._results is None:
                self._results = self._start()
            got, tokens, pixels, n_images = next(self._results)
            if got != number:
                raise RuntimeError(f"data workers returned batch {got}, expected {number}")
            batch.fill(tokens, pixels)
            self.loader.batches_read += 1
            self.loader.images_decoded += n_images
        self.state = state
        return batch

    def reset(self) -> None:
        """Stop the workers (the DataLoader iterator shuts them down when collected) and drop the look-ahead:
        the next batch is planned from the loader's state as it is now (after ``load_state_dict``)."""
        self._results = None
        self._planned.clear()
        self._local.clear()
        self.state = self.loader.planner_state()
