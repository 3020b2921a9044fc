"""Shared plumbing of the ``bench.*`` benchmarks: CLI, machine facts, interleaved timing, atomic results.

Every benchmark module has a pure ``run(quick, ...) -> dict`` (the figures) and a ``main(argv)`` that
parses ``--quick`` / ``--threads N`` / ``--out-dir``, wraps the figures with ``machine`` facts (CPU model,
torch threads, load average at start and end, torch version, date), prints ONE JSON object and writes the
same object atomically to ``bench/results/NAME.json``. Timing lives in benchmarks, never in tests.

Timing rules: warm up every contender first, then take several repeats with the contenders INTERLEAVED
(A B A B ..., order alternating), so load from other processes on a shared machine hits both alike; report
medians (``time.perf_counter``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """'model name' of /proc/cpuinfo (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD flags that matter for fp32/bf16 GEMM speed (avx2, avx512f, amx...)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return sorted(have & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    except OSError:
        pass
    return []


def machine_info(load_start: tuple[float, float, float]) -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def parser(doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few steps (tests, smoke runs)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where NAME.json goes")
    ap.add_argument("--no-write", action="store_true", help="print only")
    return ap


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    """Write ``obj`` as JSON to ``path`` via a temp file in the same folder + os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(obj, sort_keys=True, indent=1) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def bench_main(
    name: str,
    doc: str | None,
    run: Callable[..., dict],
    argv: list[str] | None,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> dict:
    """Parse the common CLI (+ ``add_args``' options), run ``run(quick=..., **those options)``, add
    ``bench`` + ``machine``, print and write."""
    ap = parser(doc)
    if add_args is not None:
        add_args(ap)
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = os.getloadavg()
    common = vars(parser(doc).parse_args([]))
    extra = {k: v for k, v in vars(args).items() if k not in common}
    figures = run(quick=args.quick, **extra)
    out = {"bench": name, "quick": bool(args.quick), **figures, "machine": machine_info(load_start)}
    print(json.dumps(out, sort_keys=True))
    if not args.no_write:
        write_json_atomic(args.out_dir / f"{name}.json", out)
    return out


# ------------------------------------------------------------------------------------------ timing
class Samples(dict):
    """name -> seconds per call; ``cpu_share`` = CPU seconds this process got / (wall seconds x torch
    threads) while timing: ~1.0 on an idle machine, well below 1 when other processes took the cores
    (the timings are then inflated; ratios of interleaved contenders stay comparable)."""

    cpu_share: float = 1.0


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> Samples:
    """Seconds per call of each function: ``warmup`` untimed calls each, then ``repeats`` timed rounds
    with the functions interleaved (order reversed every other round)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    samples = Samples({n: [] for n in names})
    cpu = wall = 0.0
    for r in range(repeats):
        for n in names if r % 2 == 0 else reversed(names):
            c0, t0 = time.process_time(), time.perf_counter()
            fns[n]()
            dt = time.perf_counter() - t0
            cpu += time.process_time() - c0
            wall += dt
            samples[n].append(dt)
    samples.cpu_share = rnd(cpu / max(wall * torch.get_num_threads(), 1e-9), 3)
    return samples


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def rnd(x: float, digits: int = 4) -> float:
    """Round to ``digits`` significant digits (JSON stays readable)."""
    return float(f"{x:.{digits}g}")


# ------------------------------------------------------------------------------------------ data
def lognormal_lengths(
    n: int, median_len: float = 256.0, sigma: float = 1.0, lo: int = 32, hi: int = 2048, seed: int = 0
) -> list[int]:
    """``n`` document lengths from a lognormal (median ``median_len``), clipped to [lo, hi] (web-text-like
    mix: many short documents, a long tail)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    lens = torch.exp(torch.log(torch.tensor(median_len, dtype=torch.float64)) + sigma * z)
    return [int(x) for x in lens.round().clamp(lo, hi).tolist()]


def random_docs(lengths: list[int], vocab: int, seed: int = 0) -> list[torch.Tensor]:
    """Random token documents (ids >= 4 so no id collides with a pad/special token)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g) for n in lengths]


def packed_batch(docs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Documents -> one flat packed batch: input_ids (T,), cu_seqlens (S+1,), shifted labels (T,)
    (the last token of each document predicts nothing: -100)."""
    ids = torch.cat(docs)
    labels = torch.cat([torch.cat([d[1:], d.new_full((1,), -100)]) for d in docs])
    lens = torch.tensor([0] + [len(d) for d in docs])
    return {"input_ids": ids, "labels": labels, "cu_seqlens": torch.cumsum(lens, 0)}


def padded_batch(docs: list[torch.Tensor], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Documents -> (B, L_max) right-padded input_ids, attention_mask and UNshifted labels (-100 at pads,
    the HF convention: the model shifts)."""
    lmax = max(len(d) for d in docs)
    ids = torch.full((len(docs), lmax), pad_id, dtype=torch.long)
    mask = torch.zeros(len(docs), lmax, dtype=torch.long)
    labels = torch.full((len(docs), lmax), -100, dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d)] = d
        mask[i, : len(d)] = 1
        labels[i, : len(d)] = d
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def group_docs(docs: list[torch.Tensor], per_step: int) -> list[list[torch.Tensor]]:
    """Consecutive groups of ``per_step`` documents (the last partial group dropped)."""
    return [docs[i : i + per_step] for i in range(0, len(docs) - per_step + 1, per_step)]


def torchrun_module(module: str, nproc: int, args: list[str], timeout: float = 3600) -> None:
    """``python -m torch.distributed.run --standalone --nproc_per_node NPROC -m MODULE ARGS`` from the repo
    root (gloo on CPU, one thread per rank); raises with the ranks' output tails if it fails."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(root))
    done = subprocess.run(
        [*cmd, "-m", module, *args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"{module} {args[:2]}: ranks failed\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
