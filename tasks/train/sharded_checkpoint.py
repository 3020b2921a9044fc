"""Sharded training checkpoints (``train.checkpoint_format: sharded``) with ``torch.distributed.checkpoint``.

Layout of one checkpoint directory (same staging, checksums and publishing as ``checkpoint.py``):

    state/__R_0.distcp       DCP data file of rank R: the tensors it was chosen to write
    state/.metadata          DCP index (written by rank 0 once every rank's data is written)
    rng/rank-NNNNN.pt        each rank's RNG states (as in the gathered format)
    trainer_state.json       counters, engine config, extra_state; ``"checkpoint_format": "sharded"``
    checksums.json           sha256 of every file; written last

What each rank hands to DCP (``engine_state``; only tensors, so DCP stores no pickled objects):
- ``model.<name>``: a replicated weight or buffer (every rank offers it; DCP's planner keeps one copy and
  spreads the writing over the ranks); a weight held in bf16 with an fp32 master (``working_weights: bf16``)
  is offered by its Muon owner only, as the master; a frozen bf16 weight by one rank (``i % world``), read
  from the phase's starting checkpoint (fp32, exact);
- ``model.<name>@ep<j>of<N>``: slice j of N of an expert stack under ``expert_parallel: N`` (the ranks
  holding those experts offer it, DCP keeps one copy), so no rank ever holds a whole expert stack;
- ``optim.<name>.<key>`` (and ``...@ep<j>of<N>`` for expert slices): the optimizer state of the params this
  rank owns (Muon momentum, AdamW moments and step), offered by the owner only. The fp32 master is the
  ``model.`` entry. Torch AdamW under ZeRO 0 (state on every rank) is offered by every rank.

So every rank writes about 1/world of the checkpoint, in parallel, and hashes its own data file; nothing is
gathered. Loading is resharding by construction: each rank asks DCP for exactly what it holds in this run
(its weights, its expert slice, the state of the params it owns now), whatever the world size or expert-
parallel degree of the run that saved; an expert slice is cut from the saved slices that overlap it. The
checksums are verified once, spread over the ranks (rank r checks files r, r + world, ...).

DCP's ``.metadata`` is a pickle (``FileSystemReader.read_metadata`` unpickles it unrestricted): ``SafeReader``
reads it with an unpickler that admits only DCP's metadata classes, ``torch.Size``, dtypes and paths.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from tasks.io.weights import CheckpointError

STATE_DIR = "state"
_SLICE = re.compile(r"^(?P<key>.+)@ep(?P<j>\d+)of(?P<n>\d+)$")


# ------------------------------------------------------------------------------------- safe metadata
class _MetadataUnpickler(pickle.Unpickler):
    """Only what DCP's ``Metadata`` is made of; anything else (code) is refused."""

    _MODULES: ClassVar[dict[str, set[str]]] = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        },
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
        "collections": {"OrderedDict"},
    }

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if name in self._MODULES.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name} in a checkpoint's DCP metadata")


class SafeReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` is read with ``_MetadataUnpickler`` (no code runs)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            raw = f.read()
        try:
            metadata = _MetadataUnpickler(io.BytesIO(raw)).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
            raise CheckpointError(f"{path}: DCP metadata refused: {e}") from e
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not DCP metadata ({type(metadata).__name__})")
        if any(isinstance(m, BytesStorageMetadata) for m in metadata.state_dict_metadata.values()):
            raise CheckpointError(f"{path}: holds pickled objects; a training checkpoint holds tensors only")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_metadata(state_dir: Path) -> Metadata:
    return SafeReader(str(state_dir)).read_metadata()


# -------------------------------------------------------------------------------------- naming
def slice_key(key: str, j: int, n: int) -> str:
    return f"{key}@ep{j}of{n}"


def _ep_position(engine: Any) -> tuple[int, int]:
    """(this rank's position in its EP group, the EP degree)."""
    from kimivl_model.moe_ep import expert_shards

    shards = expert_shards(engine.model)
    if not shards:
        return 0, 1
    m = next(iter(shards.values()))
    return m.rank, m.ep


def _param_names(engine: Any) -> dict[int, str]:
    """id(param) -> its first state-dict name."""
    names: dict[int, str] = {}
    for n, p in engine.model.named_parameters():
        names.setdefault(id(p), n)
    return names


def _owned(engine: Any) -> Iterator[tuple[str, torch.Tensor, dict[str, Any]]]:
    """(name, param, optimizer state) of every param whose state this rank keeps."""
    names = _param_names(engine)
    muon = engine._muon
    opt = _torch_optimizer(engine)
    for g, group in enumerate(opt.param_groups):
        for i, p in enumerate(group["params"]):
            if muon is not None and muon.owners[g][i] != muon.rank:
                continue
            yield names[id(p)], p, opt.state.get(p, {})


def _torch_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The optimizer holding the per-parameter state: DistributedMuon, or the torch AdamW DeepSpeed runs."""
    if engine._muon is not None:
        return engine._muon
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt) if not isinstance(opt, torch.optim.Optimizer) else opt


# -------------------------------------------------------------------------------------------- save
def engine_state(engine: Any) -> dict[str, torch.Tensor]:
    """The tensors this rank offers DCP (module docstring), all on CPU-or-device as they are held."""
    experts = set(engine._expert_params())
    j, n = _ep_position(engine)
    masters = {}  # id(param) -> fp32 master, on the owner
    low: set[int] = set()
    muon = engine._muon
    if muon is not None and muon.low_precision:
        for g, i in muon.low_precision:
            p = muon.param_groups[g]["params"][i]
            low.add(id(p))
            if muon.owners[g][i] == muon.rank:
                masters[id(p)] = muon.state[p]["master"]
    out: dict[str, torch.Tensor] = {}
    frozen = {name: i for i, name in enumerate(sorted(engine.frozen_low))}  # read by rank i % world
    for name, t in engine.model.state_dict(keep_vars=True).items():
        key = f"model.{name}"
        if name in frozen:
            if frozen[name] % engine.world_size == engine.rank:
                out[key] = engine._frozen_file[name]  # whole, fp32, from the phase's starting file
            continue
        if id(t) in low and id(t) not in masters:
            continue  # its owner offers the fp32 master
        value = masters.get(id(t), t).detach()
        out[slice_key(key, j, n) if name in experts else key] = value
    for name, _p, state in _owned(engine):
        for k, v in state.items():
            if k == "master":
                continue
            key = f"optim.{name}.{k}"
            out[slice_key(key, j, n) if name in experts else key] = (
                v if torch.is_tensor(v) else torch.tensor(v)
            )
    return out


def save_state(engine: Any, state_dir: Path) -> list[str]:
    """Collective: write this rank's share into ``state_dir``; returns the files this rank wrote (relative
    to the checkpoint directory) for the checksums."""
    writer = FileSystemWriter(str(state_dir), single_file_per_rank=True, sync_files=True, thread_count=1)
    dcp.save(engine_state(engine), storage_writer=writer)
    mine = sorted(f"{STATE_DIR}/{p.name}" for p in Path(state_dir).glob(f"__{engine.rank}_*.distcp"))
    if engine.rank == 0:
        mine.append(f"{STATE_DIR}/.metadata")
    return mine


# -------------------------------------------------------------------------------------------- load
class _Request:
    """What one rank asks DCP for: destination tensors by saved key. A whole saved tensor of the live
    tensor's shape and dtype is read straight into it (no copy); anything else (an expert slice, an fp32
    master of a bf16 weight, optimizer state not created yet) into a tensor allocated from the metadata."""

    def __init__(self, metadata: Metadata, where: Path) -> None:
        self.md = metadata.state_dict_metadata
        self.where = where
        self.tensors: dict[str, torch.Tensor] = {}

    def _dest(self, key: str, into: torch.Tensor | None) -> None:
        m = self.md[key]
        size, dtype = tuple(m.size), m.properties.dtype
        if into is not None and tuple(into.shape) == size and into.dtype == dtype and into.is_contiguous():
            self.tensors[key] = into.detach()
        else:
            self.tensors[key] = torch.empty(size, dtype=dtype)

    def ask(
        self, key: str, first: int = 0, count: int | None = None, into: torch.Tensor | None = None
    ) -> list[tuple[str, int, int]]:
        """Plan the read of ``key`` (whole, or experts [first, first+count) of it when saved as slices):
        [(saved key, offset of its first expert, experts)] of the saved pieces that overlap. ``into``: the
        live tensor, read into directly when the saved one is whole and matches it."""
        if key in self.md:
            self._dest(key, into if count is None else None)
            return [(key, 0, int(self.md[key].size[0]) if self.md[key].size else 0)]
        pieces = []
        for saved in self.md:
            m = _SLICE.match(saved)
            if m is None or m["key"] != key:
                continue
            rows = int(self.md[saved].size[0])
            lo = int(m["j"]) * rows
            if count is None or (lo < first + count and first < lo + rows):
                pieces.append((saved, lo, rows))
                self._dest(saved, None)
        if not pieces:
            raise CheckpointError(f"{self.where}: no '{key}' in the checkpoint (model or optimizer changed?)")
        return sorted(pieces, key=lambda x: x[1])

    def assemble(self, pieces: list[tuple[str, int, int]], first: int = 0, count: int | None = None):
        whole = [self.tensors[k] for k, _, _ in pieces]
        t = whole[0] if len(whole) == 1 else torch.cat(whole)
        if count is None:
            return t
        lo = pieces[0][1]
        return t[first - lo : first - lo + count]


def _plan(engine: Any, req: _Request, owned: list, optim_keys: dict[str, list[str]]) -> dict[str, tuple]:
    """{"model:<name>" | "optim:<name>:<key>": (pieces, first expert, experts or None, live tensor)}."""
    from kimivl_model.moe_ep import expert_param_names

    experts = expert_param_names(engine.model)

    def span(name: str) -> tuple[int, int | None]:
        return (experts[name].first, experts[name].num_local) if name in experts else (0, None)

    plans: dict[str, tuple] = {}
    live = engine.model.state_dict(keep_vars=True)
    saved = {(_SLICE.match(k)["key"] if _SLICE.match(k) else k) for k in req.md}
    extra = sorted(k for k in saved if k.startswith("model.") and k[len("model.") :] not in live)
    if extra:
        raise CheckpointError(f"{req.where}: tensors the model lacks: {extra[:5]} (model changed?)")
    for name, t in live.items():
        first, count = span(name)
        plans[f"model:{name}"] = (req.ask(f"model.{name}", first, count, t), first, count, t)
    for name, p, state in owned:
        first, count = span(name)
        for k in optim_keys.get(name, ()):
            cur = state.get(k)
            cur = cur if torch.is_tensor(cur) and cur.device.type == "cpu" else None
            plans[f"optim:{name}:{k}"] = (req.ask(f"optim.{name}.{k}", first, count, cur), first, count, p)
    return plans


def load_state(engine: Any, directory: Path, weights_only: bool) -> None:
    """Collective: restore this rank's weights (and, unless ``weights_only``, the optimizer state of the
    params it owns) from a sharded checkpoint saved at any world size / expert-parallel degree."""
    from tasks.train.checkpoint import check_all_ranks

    state_dir = Path(directory) / STATE_DIR
    owned = list(_owned(engine)) if not weights_only else []
    error: CheckpointError | None = None
    try:  # plan on every rank first: a rank that cannot must not leave the others in dcp.load
        metadata = read_metadata(state_dir)
        req = _Request(metadata, state_dir)
        optim_keys = _saved_optimizer_keys(metadata)
        plans = _plan(engine, req, owned, optim_keys)
    except (CheckpointError, OSError) as e:
        error = e if isinstance(e, CheckpointError) else CheckpointError(f"{state_dir}: {e}")
    check_all_ranks(engine, error)
    dcp.load(req.tensors, storage_reader=SafeReader(str(state_dir)))

    weights: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, (pieces, first, count, t) in plans.items():
            if not key.startswith("model:"):
                continue
            value = req.assemble(pieces, first, count)
            weights[key[len("model:") :]] = value
            if value.data_ptr() != t.data_ptr():  # not read in place: an expert slice, an fp32 master
                t.copy_(value)
    _restore_masters(engine, weights)
    opt = _torch_optimizer(engine)
    for name, p, _ in owned:
        state = opt.state[p]
        for k in optim_keys.get(name, ()):
            pieces, first, count, _p = plans[f"optim:{name}:{k}"]
            v = req.assemble(pieces, first, count)
            if v.dim() == 0 and k == "step" and not v.is_floating_point():
                state[k] = int(v)  # Muon's AdamW part counts steps in a python int
            elif not (torch.is_tensor(state.get(k)) and state[k].data_ptr() == v.data_ptr()):
                state[k] = v.to(p.device) if v.dim() else v


def _saved_optimizer_keys(metadata: Metadata) -> dict[str, list[str]]:
    """param name -> the optimizer-state keys saved for it."""
    found: dict[str, set[str]] = {}
    for saved in metadata.state_dict_metadata:
        m = _SLICE.match(saved)
        key = m["key"] if m else saved
        if key.startswith("optim."):
            name, k = key[len("optim.") :].rsplit(".", 1)
            found.setdefault(name, set()).add(k)
    return {n: sorted(ks) for n, ks in found.items()}


def _restore_masters(engine: Any, weights: dict[str, torch.Tensor]) -> None:
    """bf16 working weights: the owners' fp32 masters are the loaded fp32 values."""
    muon = engine._muon
    if muon is None or not muon.low_precision:
        return
    sd = engine.model.state_dict(keep_vars=True)
    by_id = {id(sd[k]): v for k, v in weights.items()}
    for g, i in muon.low_precision:
        if muon.owners[g][i] == muon.rank:
            p = muon.param_groups[g]["params"][i]
            v = by_id[id(p)]  # read into its own fp32 tensor (the param is bf16): it becomes the master
            muon.state[p]["master"] = v.to(device=p.device, dtype=torch.float32).contiguous()


def read_model_tensors(state_dir: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """One process, no process group: the whole fp32 model tensors ``names`` (default: all) of a sharded
    checkpoint's ``state/``, expert slices concatenated (for tools and tests; a training rank uses
    ``load_state``)."""
    md = read_metadata(state_dir)
    req = _Request(md, Path(state_dir))
    wanted = names
    if wanted is None:
        wanted = sorted(
            {
                (_SLICE.match(k)["key"] if _SLICE.match(k) else k)[len("model.") :]
                for k in md.state_dict_metadata
                if k.startswith("model.")
            }
        )
    plans = {n: req.ask(f"model.{n}") for n in wanted}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(req.tensors, storage_reader=SafeReader(str(state_dir)), no_dist=True)
    return {n: req.assemble(pieces) for n, pieces in plans.items()}


def files_to_verify(directory: Path, rank: int, world: int) -> list[str]:
    """This rank's share of a sharded checkpoint's files (every file checked once over the ranks)."""
    from tasks.train.checkpoint import read_checksums

    listed = sorted(read_checksums(directory))
    return listed[rank::world]


def barrier(engine: Any) -> None:
    if engine.world_size > 1:
        dist.barrier()
