"""Run a test body on N gloo ranks (CPU), robustly on a loaded machine.

Each rank is a fresh ``spawn`` process that joins the group through a file in the test's tmp dir (no port
to race for), runs ``body(rank, out_dir)`` with one CPU thread, meets the others at a barrier, destroys the
group and writes ``rank<N>.done``, then leaves with ``os._exit`` (no interpreter finalisation: a CI run
once lost a passing test to a SIGABRT, "terminate called without an active exception", in a rank's
teardown). What a body proves goes through files the test reads back, so the result does not depend on how
a rank's process ends once it is done.

The parent waits up to ``timeout`` seconds. The test fails, naming every rank and what happened to it, when
a rank raised (its traceback), died before writing its ``.done`` marker (its exit code) or hung (killed). A
rank that died *after* its marker only gets a warning.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

Body = Callable[[int, Path], None]


def _rank(rank: int, world: int, body: Body, init_file: str, out_dir: str) -> None:
    out = Path(out_dir)
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        body(rank, out)
        dist.barrier()  # no rank tears its transport down while a peer still talks to it
        dist.destroy_process_group()
        (out / f"rank{rank}.done").write_text("ok")
        code = 0
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        code = 1
    os._exit(code)


def run_ranks(body: Body, out_dir: Path, world: int = 2, timeout: float = 300.0) -> None:
    """``body(rank, out_dir)`` on ``world`` gloo ranks; raises AssertionError naming what went wrong."""
    ctx = multiprocessing.get_context("spawn")
    init_file = out_dir / "gloo-init"
    procs = [
        ctx.Process(target=_rank, args=(r, world, body, str(init_file), str(out_dir)), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    problems = []  # every rank's story: a dead peer makes the others raise, so name the dead one too
    for r, p in enumerate(procs):
        err = out_dir / f"rank{r}.err"
        if r in hung:
            problems.append(f"rank {r}: still running after {timeout:.0f} s (killed)")
        elif err.exists():
            problems.append(f"rank {r}: raised:\n{err.read_text()}")
        elif not (out_dir / f"rank{r}.done").exists():
            problems.append(f"rank {r}: died before finishing, exit code {p.exitcode}")
    assert not problems, "\n".join(problems)
    for r, p in enumerate(procs):
        if p.exitcode != 0:
            warnings.warn(
                f"gloo rank {r} finished its work, then exited with code {p.exitcode}", stacklevel=2
            )
