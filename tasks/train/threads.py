"""Threads per process: training ranks and data workers on one host share its cores, never oversubscribe.

A rank's share is ``CPUs // local ranks`` (``LOCAL_WORLD_SIZE`` from torchrun, ``LOCAL_SIZE`` from the
deepspeed launcher, which sets no thread count of its own); each DataLoader worker of the rank
(``train.data_workers``) takes one core of that share and runs single-threaded, the rank's compute gets
the rest (at least 1). ``OMP_NUM_THREADS``, when set, wins: the operator decided. Why: with a second
training process on this 2-core host a phase that takes 15 s alone took 8.5 minutes and ~20x its CPU
time, threads spinning against each other. Lance's CPU pool (the tokenized datasets, ``tasks.data.row_store``)
is bounded the same way through ``LANCE_CPU_THREADS`` (read when Lance first runs in a process).
"""

from __future__ import annotations

import os

import torch


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's or numactl's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_ranks(environ: dict[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    return int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or 1)


def rank_threads(workers: int, environ: dict[str, str] | None = None, cpus: int | None = None) -> int:
    """Compute threads of one training rank that runs ``workers`` data workers."""
    env = os.environ if environ is None else environ
    if env.get("OMP_NUM_THREADS"):
        return max(1, int(env["OMP_NUM_THREADS"]))
    share = max(1, (cpus or usable_cpus()) // local_ranks(env))
    return max(1, share - workers)


def configure_rank(workers: int) -> int:
    """Set this training rank's thread counts (torch intra-op, Lance's CPU pool); returns the count."""
    n = rank_threads(workers)
    os.environ.setdefault("LANCE_CPU_THREADS", str(n))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def single_threaded() -> None:
    """For a data worker process: one compute thread everywhere."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LANCE_CPU_THREADS"):
        os.environ[var] = "1"
    torch.set_num_threads(1)
