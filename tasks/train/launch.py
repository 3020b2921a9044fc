"""Process-group set-up and launch commands for the training engine.

One entry point serves three ways of running (DESIGN.md, "distributed training"):
- in-process, one rank, no launcher (the embedded default, tests): ``init_distributed_if_needed`` fills in
  ``RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=<free port>`` (without them
  DeepSpeed goes looking for mpi4py, STACK.md) and opens a gloo (CPU) or nccl (CUDA) group;
- N processes on one machine or several: ``build_launch_command`` builds a ``deepspeed`` (``--hostfile``
  for multi-node) or ``torchrun`` (``--nnodes/--node_rank/--master_addr``) command line; the launcher sets
  the environment and ``init_distributed_if_needed`` only opens the group.
On CPU the ``deepspeed`` launcher passes ``--local_rank=N`` to the script (STACK.md): every entry point must
accept it (``add_local_rank_arg``).

``TORCH_EXTENSIONS_DIR`` is pointed at ``<repo>/.torch_extensions`` (gitignored) unless already set: the
first ``deepspeed.initialize`` JIT-builds a shared-memory comm op (~90 s once), then it is reused.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Literal

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_EXTENSIONS_DIR = REPO_ROOT / ".torch_extensions"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return int(s.getsockname()[1])


STALE_BUILD_LOCK_S = 900.0


def ensure_torch_extensions_dir() -> Path:
    """Set ``TORCH_EXTENSIONS_DIR`` to ``<repo>/.torch_extensions`` unless the caller already set it, and
    remove build locks left by a killed process.

    torch's JIT build (DeepSpeed's comm op) guards a build with a ``lock`` file and waits, forever, for it
    to disappear: a process killed mid-build (SIGKILL, OOM, a CI timeout) would hang every later run. A
    build takes 1-2 minutes here; a lock untouched for ``STALE_BUILD_LOCK_S`` belongs to a dead build."""
    path = Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(DEFAULT_EXTENSIONS_DIR)))
    path.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for lock in path.glob("*/lock"):
        try:
            if now - lock.stat().st_mtime > STALE_BUILD_LOCK_S:
                lock.unlink()
                print(
                    f"[launch] removed a stale extension build lock {lock} (its build was killed)", flush=True
                )
        except FileNotFoundError:
            pass
    return path


def default_backend() -> str:
    """``nccl`` when CUDA is available, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed_if_needed(backend: str | None = None, timeout_s: float = 1800.0) -> tuple[int, int]:
    """Open the default process group unless one is open; returns ``(rank, world_size)``.

    Without a launcher (no ``RANK``/``WORLD_SIZE`` in the environment) this is a single-rank run: the
    environment is filled in with a free loopback port. With a launcher its environment is used as is.
    """
    import torch.distributed as dist

    ensure_torch_extensions_dir()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    if dist.is_available() and dist.is_initialized():
        # DeepSpeed reads these from the environment on every initialize: keep them consistent with the
        # live group (a caller may have restored an environment snapshot since the group was created)
        rank, world = dist.get_rank(), dist.get_world_size()
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault(
            "LOCAL_RANK", str(rank if world == 1 else int(os.environ.get("LOCAL_RANK", rank)))
        )
        return rank, world
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
    else:
        os.environ.setdefault("LOCAL_RANK", "0")
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(
                f"init_distributed_if_needed: RANK/WORLD_SIZE are set but {missing} are not; "
                "start the script with a launcher (deepspeed/torchrun) or set them"
            )
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    import deepspeed

    deepspeed.init_distributed(
        dist_backend=backend or default_backend(),
        auto_mpi_discovery=False,
        timeout=timedelta(seconds=timeout_s),
    )
    return dist.get_rank(), dist.get_world_size()


def add_local_rank_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Accept ``--local_rank=N`` / ``--local-rank N`` (passed by the deepspeed launcher); stored as
    ``args.local_rank`` and exported as ``LOCAL_RANK`` when the environment lacks it."""
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None)
    return parser


def apply_local_rank(local_rank: int | None) -> None:
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))


def build_launch_command(
    script_args: list[str],
    nproc: int,
    launcher: Literal["deepspeed", "torchrun"] = "torchrun",
    hostfile: Path | None = None,
    master_port: int | None = None,
    *,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    python: str | None = None,
) -> list[str]:
    """Command line that runs ``script_args`` (``[script.py, *args]``) on ``nproc`` processes per node.

    - ``deepspeed``: ``python -m deepspeed.launcher.runner --num_gpus nproc`` (processes per node; on CPU
      the ranks are processes), plus ``--hostfile`` for multi-node (lines ``host slots=N``; the runner
      starts every node's ranks over ssh from this machine; ``master_addr`` defaults to the first host);
    - ``torchrun``: ``python -m torch.distributed.run --nproc_per_node nproc --nnodes --node_rank
      --master_addr --master_port``; multi-node runs the same command on every node with its own
      ``node_rank`` and node 0's address as ``master_addr`` (required when ``nnodes > 1``).
    ``master_port`` defaults to a free local port (pass the same explicit port on every node).
    """
    if not script_args:
        raise ValueError("script_args: expected [script.py, *args], got an empty list")
    if nproc < 1:
        raise ValueError(f"nproc: expected >= 1, got {nproc}")
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ValueError(
            f"nnodes/node_rank: expected nnodes >= 1 and 0 <= node_rank < nnodes, got {nnodes}/{node_rank}"
        )
    py = python or sys.executable
    port = int(master_port) if master_port is not None else free_port()
    if launcher == "deepspeed":
        return [*_deepspeed_launch(py, nproc, port, hostfile, master_addr), *script_args]
    if launcher == "torchrun":
        return [*_torchrun_launch(py, nproc, port, hostfile, nnodes, node_rank, master_addr), *script_args]
    raise ValueError(f"launcher: expected 'deepspeed' or 'torchrun', got {launcher!r}")


def _deepspeed_launch(
    py: str, nproc: int, port: int, hostfile: Path | None, master_addr: str | None
) -> list[str]:
    cmd = [py, "-m", "deepspeed.launcher.runner", "--master_port", str(port), "--num_gpus", str(nproc)]
    if hostfile is not None:
        if not Path(hostfile).is_file():
            raise FileNotFoundError(f"hostfile: {hostfile} does not exist (lines: 'host slots=N')")
        cmd += ["--hostfile", str(hostfile)]
    if master_addr is not None:
        cmd += ["--master_addr", master_addr]
    return cmd


def _torchrun_launch(
    py: str,
    nproc: int,
    port: int,
    hostfile: Path | None,
    nnodes: int,
    node_rank: int,
    master_addr: str | None,
) -> list[str]:
    if hostfile is not None:
        raise ValueError(
            "hostfile: only the deepspeed launcher reads a hostfile; torchrun takes nnodes/node_rank"
        )
    if nnodes > 1 and master_addr is None:
        raise ValueError("master_addr: required with torchrun and nnodes > 1 (node 0's address)")
    return [
        py, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", str(nnodes),
        "--node_rank", str(node_rank), "--master_addr", master_addr or "127.0.0.1", "--master_port", str(port),
    ]  # fmt: skip


def launch_world_size(nproc: int, hostfile: Path | None = None) -> int:
    """Ranks a launch starts: ``nproc`` here, or with a DeepSpeed hostfile ``nproc`` on every host of it
    (the runner's ``--num_gpus nproc`` sets each host's ranks; the file is parsed by DeepSpeed's own
    ``fetch_hostfile``, so what is refused here is what the launcher would refuse)."""
    if hostfile is None:
        return nproc
    from deepspeed.launcher.runner import fetch_hostfile

    if not Path(hostfile).is_file():
        raise FileNotFoundError(f"{hostfile} does not exist (lines: 'host slots=N')")
    try:
        hosts = fetch_hostfile(str(hostfile))
    except ValueError as e:
        raise ValueError(f"{hostfile}: {e} (lines: 'host slots=N')") from None
    return nproc * len(hosts)


def batch_split_error(recipe, phases, world: int) -> str | None:
    """Why ``world`` ranks cannot run ``phases`` of ``recipe`` (a ``sequence_parallel`` that does not divide the
    world, or a ``micro_batches_per_step`` that the data-parallel degree world / sequence_parallel does not
    divide: the global batch is part of the recipe and is never changed to fit), or None."""
    names = [q.name for q in recipe.phases]
    for p in phases:
        sp = p.sequence_parallel
        if world % sp:
            return (
                f"field phases.{names.index(p.name)}.sequence_parallel: phase {p.name!r} splits each sequence over "
                f"{sp} ranks, which does not divide {world} processes; run a multiple of {sp} processes"
            )
        dp = world // sp
        if p.micro_batches_per_step % dp:
            groups = (
                f"{world} processes"
                if sp == 1
                else f"{dp} data-parallel groups ({world} processes / sequence_parallel {sp})"
            )
            return (
                f"field phases.{names.index(p.name)}.micro_batches_per_step: phase {p.name!r} takes "
                f"{p.micro_batches_per_step} micro-batch(es) per optimizer step, which {groups} cannot "
                f"split evenly; set it to a multiple of {dp} (the global batch is part of the recipe, so it "
                "is not changed for you) or run fewer processes"
            )
    return None
