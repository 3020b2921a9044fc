"""Training checkpoints on disk: no pickle, staged writes, checksums (the engine's save/load format).

Layout of one checkpoint directory ``DIR`` (``checkpoint_path(root, step)`` names it ``root/step-NNNNNNNN``):

    model.safetensors          full fp32 ``model.state_dict()`` incl. buffers (router bias), whole expert stacks
                               whatever the expert-parallel degree; rank 0 writes
    optimizer/rank-NNNNN.pt    each rank's optimizer state: plain tensors / lists / numbers (torch.save)
    rng/rank-NNNNN.pt          torch CPU (+ CUDA) RNG, python ``random`` and numpy states as tensors / lists
    trainer_state.json         step, skipped_steps, consecutive_nonfinite, world_size, engine config, extra_state
    checksums.json             sha256 of every other file; written last

Every ``.pt`` file is read with ``torch.load(..., weights_only=True)``: nothing in a checkpoint can run code.
A save writes into ``.DIR.staging`` and renames it onto ``DIR`` only when all ranks' files and the
checksums are in place, so a killed save never leaves a complete-looking checkpoint; ``latest_checkpoint``
ignores staging directories and directories without ``checksums.json``. A corrupted or missing file makes
``verify_checksums`` raise ``CheckpointError`` naming the file.

With ``train.checkpoint_format: sharded`` the weights and optimizer state are written instead by every rank
in parallel through ``torch.distributed.checkpoint`` into ``state/`` (``tasks/train/sharded_checkpoint.py``:
nothing gathered, loadable at any world size / expert-parallel degree); staging, RNG files, trainer state,
checksums and publishing are the same. A checkpoint is loaded in the format it was saved in.

Multi-node runs need ``root`` on a filesystem shared by all nodes (each rank writes its own files).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.io.faults import crash_point
from tasks.io.files import atomic_path, fsync_dir, replace_dir, sha256_file, write_json_atomic
from tasks.io.weights import CheckpointError

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.json"
CHECKSUM_FILE = "checksums.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


class DivergenceError(RuntimeError):
    """Training produced non-finite losses/gradients for too many consecutive steps."""


# ------------------------------------------------------------------------------------------- naming
def checkpoint_path(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def rank_file(kind: str, rank: int) -> str:
    """Relative path of a per-rank file: ``optimizer/rank-00003.pt``."""
    return f"{kind}/rank-{rank:05d}.pt"


def staging_path(final: Path) -> Path:
    final = Path(final)
    return final.parent / f".{final.name}.staging"


def is_complete_checkpoint(directory: Path) -> bool:
    d = Path(directory)
    return (d / CHECKSUM_FILE).is_file() and (d / STATE_FILE).is_file()


def latest_checkpoint(root: Path) -> Path | None:
    """The complete ``root/step-N`` directory with the highest N (staged or partial ones are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and is_complete_checkpoint(child):
            found.append((int(m.group(1)), child))
    return max(found)[1] if found else None


# ------------------------------------------------------------------------------------------ files
def torch_save_atomic(obj: Any, path: Path) -> None:
    with atomic_path(Path(path)) as tmp:
        torch.save(obj, tmp)


def torch_load_plain(path: Path, mmap: bool = False) -> Any:
    """Load a checkpoint ``.pt`` file; only tensors and plain containers are accepted (no pickle code).
    ``mmap``: tensors stay on disk until touched (a rank that keeps a few of a file's tensors)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be loaded with weights_only=True: {e}") from e


def checksums(directory: Path, relative: list[str]) -> dict[str, str]:
    return {rel: sha256_file(Path(directory) / rel) for rel in relative}


def write_checksums(directory: Path, sums: dict[str, str]) -> None:
    write_json_atomic(
        {"algorithm": "sha256", "files": dict(sorted(sums.items()))}, Path(directory) / CHECKSUM_FILE
    )


def read_checksums(directory: Path) -> dict[str, str]:
    path = Path(directory) / CHECKSUM_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {directory} is not a complete checkpoint")
    try:
        return dict(json.loads(path.read_text())["files"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: unreadable checksum file: {e}") from e


def verify_checksums(directory: Path, files: list[str] | None = None) -> None:
    """Check ``files`` (default: all listed) against ``checksums.json``; raise ``CheckpointError`` naming
    the first missing or mismatching file."""
    directory = Path(directory)
    sums = read_checksums(directory)
    for rel in sums if files is None else files:
        if rel not in sums:
            raise CheckpointError(f"{directory / rel}: not listed in {CHECKSUM_FILE}")
        path = directory / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the checkpoint")
        if sha256_file(path) != sums[rel]:
            raise CheckpointError(f"{path}: sha256 mismatch (file corrupted or modified after saving)")


def _phase_of(ckpt: Path) -> str:
    """The phase a checkpoint belongs to (``.../phases/<phase>/checkpoints/step-N``), for crash-point names."""
    return Path(ckpt).parent.parent.name


def commit_checkpoint(staging: Path, final: Path) -> None:
    """Rename a fully written staging directory onto ``final`` (replacing an older one)."""
    replace_dir(staging, final, crash_name=f"checkpoint:publish_old_moved:{_phase_of(final)}")


def read_trainer_state(directory: Path) -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {directory} is not a complete checkpoint")
    state = json.loads(path.read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {state.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    return state


# -------------------------------------------------------------------------------------------- rng
def rng_state() -> dict[str, Any]:
    """All RNG states of this process as tensors / lists / numbers (weights_only-loadable)."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    out: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
    }
    if torch.cuda.is_available():
        out["torch_cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"])
    )
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])


# ---------------------------------------------------------------------------- engine save / load
def _optimizer_state(engine: Any) -> dict[str, Any]:
    """This rank's optimizer state as plain tensors/containers (no DeepSpeed objects)."""
    opt = engine.optimizer
    meta = {"world_size": engine.world_size, "rank": engine.rank, "zero_stage": engine.cfg.zero_stage}
    if engine.cfg.zero_stage == 0:  # DistributedMuon (sharded by owner) or torch AdamW: plain state dicts
        return {**meta, "kind": "torch", "state_dict": opt.state_dict()}
    # ZeRO 1/2: this rank's fp32 master partition per group + the base torch AdamW state over it
    return {
        **meta,
        "kind": "zero",
        "fp32_partitions": [t.detach().to("cpu", copy=True) for t in opt.single_partition_of_fp32_groups],
        "base": opt.optimizer.state_dict(),
    }


def _saved_expert_parallel(state: dict[str, Any]) -> int:
    return int(state.get("engine_config", {}).get("expert_parallel", 1))


def _load_resharded(engine: Any, directory: Path, saved_world: int) -> None:
    """Resume on another world size or expert-parallel degree (ZeRO 0): muon takes each param's state from
    the rank that owned it (expert shards: reassembled from the old EP ranks and cut for this one);
    torch AdamW (the same full state on every rank) takes rank 0's. Every old rank's file is opened with
    ``mmap``, so a rank pages in only the tensors it keeps. Ranks below the saved world size restore their
    RNG state; the others keep the engine's seeding (rank r: seed + r)."""
    paths = [directory / rank_file("optimizer", r) for r in range(saved_world)]
    states = [torch_load_plain(path, mmap=True) for path in paths]
    muon = getattr(engine, "_muon", None)
    try:
        if muon is not None:
            muon.load_resharded([st["state_dict"] for st in states])
        else:
            engine.optimizer.load_state_dict(states[0]["state_dict"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{paths[0].parent}: optimizer state cannot be resharded: {e}") from e
    if engine.rank < saved_world:
        set_rng_state(torch_load_plain(directory / rank_file("rng", engine.rank)))


def _load_optimizer_state(engine: Any, state: dict[str, Any], path: Path) -> None:
    opt = engine.optimizer
    if state.get("kind") == "torch" and engine.cfg.zero_stage == 0:
        try:
            opt.load_state_dict(state["state_dict"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: optimizer state does not fit this optimizer: {e}") from e
        return
    if state.get("kind") != "zero" or engine.cfg.zero_stage == 0:
        raise CheckpointError(
            f"{path}: optimizer state kind {state.get('kind')!r} does not fit ZeRO {engine.cfg.zero_stage}"
        )
    saved = state["fp32_partitions"]
    current = opt.single_partition_of_fp32_groups
    if [tuple(t.shape) for t in saved] != [tuple(t.shape) for t in current]:
        raise CheckpointError(
            f"{path}: ZeRO partitions {[tuple(t.shape) for t in saved]} != this run's "
            f"{[tuple(t.shape) for t in current]} (model, trainable set or world size changed)"
        )
    with torch.no_grad():
        for dst, src in zip(current, saved, strict=True):
            dst.copy_(src)
    opt.optimizer.load_state_dict(state["base"])


def save_engine_checkpoint(engine: Any, final: Path, extra_state: dict[str, Any]) -> Path:
    """Collective: every rank calls it. Writes the layout of the module docstring via a staging dir.

    A write that fails (disk full, read-only or vanished directory) is a ``CheckpointError`` naming the
    checkpoint and the cause; nothing is published, so the previous complete checkpoint stays the latest,
    and (single process) the partial staging directory is removed to give the space back."""
    try:
        return _save_engine_checkpoint(engine, Path(final), extra_state)
    except OSError as e:
        if engine.world_size == 1:
            shutil.rmtree(staging_path(final), ignore_errors=True)
        where = f" ({e.filename})" if e.filename else ""
        raise CheckpointError(
            f"{final}: checkpoint not saved: {e.strerror or e}{where}; nothing was published, the previous "
            f"complete checkpoint ({latest_checkpoint(Path(final).parent)}) is kept"
        ) from e


def _save_engine_checkpoint(engine: Any, final: Path, extra_state: dict[str, Any]) -> Path:
    import torch.distributed as dist

    from tasks.io.weights import save_safetensors_atomic
    from tasks.train import sharded_checkpoint as sharded_ckpt

    final = Path(final)
    staging = staging_path(final)
    multi = engine.world_size > 1
    sharded = engine.cfg.checkpoint_format == "sharded"
    if engine.rank == 0:
        if staging.exists():
            shutil.rmtree(staging)  # left over from a killed save
        (staging / ("state" if sharded else "optimizer")).mkdir(parents=True)
        (staging / "rng").mkdir()
    if multi:
        dist.barrier()
    mine = [rank_file("rng", engine.rank)]
    if sharded:  # every rank writes its share of weights and optimizer state (a collective)
        mine += sharded_ckpt.save_state(engine, staging / sharded_ckpt.STATE_DIR)
    else:
        mine.append(rank_file("optimizer", engine.rank))
        torch_save_atomic(_optimizer_state(engine), staging / mine[-1])
    crash_point(f"checkpoint:optimizer_written:{_phase_of(final)}")
    torch_save_atomic(rng_state(), staging / mine[0])
    weights = {} if sharded else engine.full_state_dict()  # gathered: a collective ({} off rank 0)
    if engine.rank == 0:
        if not sharded:
            save_safetensors_atomic(
                weights,
                staging / MODEL_FILE,
                metadata={"format": "pt", "step": str(engine.step)},
            )
            mine.append(MODEL_FILE)
        state = {
            "format_version": FORMAT_VERSION,
            "step": engine.step,
            "skipped_steps": engine.skipped_steps,
            "consecutive_nonfinite": engine.consecutive_nonfinite,
            "world_size": engine.world_size,
            "optimizer": engine.cfg.optimizer,
            "zero_stage": engine.cfg.zero_stage,
            "engine_config": engine.cfg.model_dump(mode="json"),
            "checkpoint_format": engine.cfg.checkpoint_format,
            "extra_state": extra_state,
        }
        write_json_atomic(state, staging / STATE_FILE)
        mine.append(STATE_FILE)
    sums = checksums(staging, mine)
    if multi:
        gathered: list[Any] = [None] * engine.world_size
        dist.all_gather_object(gathered, sums)  # all ranks' files are written once this returns
        sums = {k: v for part in gathered for k, v in part.items()}
    if engine.rank == 0:
        crash_point(f"checkpoint:before_checksums:{_phase_of(final)}")
        write_checksums(staging, sums)
        fsync_dir(staging)
        crash_point(f"checkpoint:before_publish:{_phase_of(final)}")
        commit_checkpoint(staging, final)
    if multi:
        dist.barrier()
    return final


def check_all_ranks(engine: Any, error: CheckpointError | None) -> None:
    """Raise on every rank if any rank failed (a lone failing rank would leave the others hanging)."""
    import torch.distributed as dist

    bad = torch.tensor([0.0 if error is None else 1.0], device=engine.device)
    if engine.world_size > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if bad.item():
        raise CheckpointError("another rank reported a missing or corrupted checkpoint file (see its error)")


def load_engine_checkpoint(
    engine: Any, directory: Path, *, weights_only_resume: bool = False
) -> dict[str, Any]:
    from tasks.io.weights import load_safetensors

    directory = Path(directory)
    error: CheckpointError | None = None
    state: dict[str, Any] = {}
    try:
        verify_checksums(directory, [STATE_FILE])
        state = read_trainer_state(directory)
        if state.get("checkpoint_format", "gathered") == "sharded":
            return _load_sharded(engine, directory, state, weights_only_resume)
        verify_checksums(directory, [MODEL_FILE])
        if not weights_only_resume:
            saved_world = int(state["world_size"])
            if saved_world != engine.world_size and engine.cfg.zero_stage > 0:
                raise CheckpointError(
                    f"{directory / STATE_FILE}: saved with world_size={saved_world}, this run has "
                    f"world_size={engine.world_size}; DeepSpeed's ZeRO {engine.cfg.zero_stage} partitions cannot be "
                    "resharded here (muon's and ZeRO 0's optimizer state can): set train.resume_weights_only: true in "
                    "the recipe (TrainEngine.load_checkpoint(weights_only_resume=True)) to keep the weights and "
                    "counters with a fresh optimizer state"
                )
            same_ep = _saved_expert_parallel(state) == engine.cfg.expert_parallel
            if saved_world == engine.world_size and same_ep:
                files = [rank_file("optimizer", engine.rank), rank_file("rng", engine.rank)]
            else:  # resharding reads every old rank's optimizer file, and this rank's RNG if it had one
                files = [rank_file("optimizer", r) for r in range(saved_world)]
                files += [rank_file("rng", engine.rank)] if engine.rank < saved_world else []
            verify_checksums(directory, files)
            _check_same_optimizer(engine, directory, state)
    except CheckpointError as e:
        error = e
    check_all_ranks(engine, error)

    weights = load_safetensors(directory / MODEL_FILE)
    try:
        engine.load_full_weights(weights)
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{directory / MODEL_FILE}: does not match the model: {e}") from e
    if weights_only_resume:
        engine.reset_master_weights(weights)  # bf16 working weights: fp32 masters from the fp32 file
        if engine.cfg.zero_stage > 0:
            engine.optimizer.refresh_fp32_params()  # fp32 masters <- (fp32) module weights
    elif (int(state["world_size"]), _saved_expert_parallel(state)) != (
        engine.world_size,
        engine.cfg.expert_parallel,
    ):
        _load_resharded(engine, directory, int(state["world_size"]))
    else:
        opt_path = directory / rank_file("optimizer", engine.rank)
        _load_optimizer_state(engine, torch_load_plain(opt_path), opt_path)
        set_rng_state(torch_load_plain(directory / rank_file("rng", engine.rank)))
    return _restore_counters(engine, state)


def _check_same_optimizer(engine: Any, directory: Path, state: dict[str, Any]) -> None:
    saved_opt = (state["optimizer"], state["zero_stage"])
    if saved_opt != (engine.cfg.optimizer, engine.cfg.zero_stage):
        raise CheckpointError(
            f"{directory / STATE_FILE}: saved with optimizer/zero_stage {saved_opt}, this run uses "
            f"{(engine.cfg.optimizer, engine.cfg.zero_stage)}; set train.resume_weights_only: true in the recipe "
            "to continue with a fresh optimizer state"
        )


def _restore_counters(engine: Any, state: dict[str, Any]) -> dict[str, Any]:
    engine.step = int(state["step"])
    engine.skipped_steps = int(state["skipped_steps"])
    engine.consecutive_nonfinite = int(state["consecutive_nonfinite"])
    return dict(state.get("extra_state", {}))


def _load_sharded(engine: Any, directory: Path, state: dict[str, Any], weights_only_resume: bool) -> dict:
    """A ``checkpoint_format: sharded`` checkpoint (``sharded_checkpoint.py``): every rank verifies its share
    of the files, then reads what it holds in this run; any world size / expert-parallel degree."""
    from tasks.train import sharded_checkpoint as sharded_ckpt

    error: CheckpointError | None = None
    saved_world = int(state["world_size"])
    try:
        verify_checksums(directory, sharded_ckpt.files_to_verify(directory, engine.rank, engine.world_size))
        if not weights_only_resume:
            _check_same_optimizer(engine, directory, state)
    except CheckpointError as e:
        error = e
    check_all_ranks(engine, error)
    sharded_ckpt.load_state(engine, directory, weights_only=weights_only_resume)
    if not weights_only_resume and engine.rank < saved_world:
        set_rng_state(torch_load_plain(directory / rank_file("rng", engine.rank)))
    return _restore_counters(engine, state)
