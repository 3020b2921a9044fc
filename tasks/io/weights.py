"""Model weights on disk: safetensors only, written atomically.

Two layouts:
- native: ``DIR/model.safetensors`` (this library's key names) + ``DIR/kimivl_config.json``
  (``VLMConfig.to_dict()``); what stages hand to each other.
- hf: the public Kimi-VL layout: ``config.json`` + ``model-0000i-of-0000N.safetensors`` shards +
  ``model.safetensors.index.json`` (per-expert keys, see ``kimivl_model.hf_interop``), so a user holding
  a real checkpoint can import it and continue training here, and export back.

Nothing is unpickled: safetensors holds only raw tensors. Every file is written to a temporary name in the
target directory, fsynced and renamed, so a crash never leaves a half-written file under the final name.

Integrity: ``save_native`` writes a ``manifest.json`` (``tasks.io.manifest``: size + sha256 of every file) last;
a phase's ``final/`` has one too. ``load_native`` / ``load_hf`` check a directory's manifest when it has one,
so a flipped byte, a truncated or a missing file is a ``CheckpointIntegrityError`` naming the file, never
silently different weights. A safetensors file that cannot be parsed is the same error. (A checkpoint made
elsewhere without a manifest, e.g. a downloaded HF one, can only be checked for readability and layout.)
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kimivl_model.config import VLMConfig
from kimivl_model.hf_interop import from_hf_config, from_hf_state_dict, hf_names, to_hf_config
from tasks.io.files import atomic_path, copy_file_atomic, write_json_atomic


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or incompatible; the message names the file/field.

    (Re-exported by ``tasks.train.checkpoint``, the training checkpoints' module.)"""


class CheckpointIntegrityError(CheckpointError, ValueError):
    """Weights on disk that are corrupt, truncated or differ from their manifest; names the file.

    Also a ``ValueError``, so callers that treat bad input as a usage error (the CLI: exit 2) catch it."""


NATIVE_WEIGHTS = "model.safetensors"
NATIVE_CONFIG = "kimivl_config.json"
HF_INDEX = "model.safetensors.index.json"


def _contiguous_unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (tied weights): copy the later ones."""
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[k] = t
    return out


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    with atomic_path(path) as tmp:
        save_file(_contiguous_unshared(tensors), str(tmp), metadata=metadata)
        _canonical_metadata_order(tmp)


def _canonical_metadata_order(path: Path) -> None:
    """Sort the header's ``__metadata__`` keys in place. safetensors (Rust) writes that map in hash-map
    order, which differs between processes: the same tensors and metadata would give different file bytes
    (and checkpoint hashes) in a resumed run than in an uninterrupted one. The header keeps its length."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.get("__metadata__")
        if not meta or len(meta) < 2:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(new) > n:  # never grow the header (it would move every tensor): leave the file as written
            return
        f.seek(8)
        f.write(new + b" " * (n - len(new)))


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such safetensors file")
    out = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                out[k] = f.get_tensor(k)
    except Exception as e:  # SafetensorError, or an OSError/RuntimeError on a short read
        raise CheckpointIntegrityError(
            f"{path}: not a readable safetensors file (truncated or corrupt): {type(e).__name__}: {e}"
        ) from None
    return out


def verify_checkpoint_dir(directory: Path) -> None:
    """Check every file a directory's ``manifest.json`` lists (size + sha256); no manifest: nothing to check."""
    from tasks.io.manifest import MANIFEST_NAME, ManifestError, verify_files

    if not (Path(directory) / MANIFEST_NAME).is_file():
        return
    try:
        verify_files(directory)
    except ManifestError as e:
        raise CheckpointIntegrityError(str(e)) from None


# ------------------------------------------------------------------------------------------- native


def save_native(state_dict: dict[str, torch.Tensor], cfg: VLMConfig, out_dir: Path) -> Path:
    """Weights + config, then ``manifest.json`` (sizes and sha256 of both) last."""
    from tasks.io.manifest import write_manifest

    # an older manifest stays until the new one replaces it: an interrupted rewrite then fails verification
    # (new weights, old hashes) instead of loading unverified
    out_dir = Path(out_dir)
    save_safetensors_atomic(
        state_dict, out_dir / NATIVE_WEIGHTS, metadata={"format": "pt", "kimivl": cfg.name}
    )
    write_json_atomic(cfg.to_dict(), out_dir / NATIVE_CONFIG)
    write_manifest(out_dir, kind="checkpoint", step="save_native", config={"preset": cfg.name})
    return out_dir


def _native_config_path(src_dir: Path) -> Path:
    cfg_path = Path(src_dir) / NATIVE_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing (a native checkpoint directory holds {NATIVE_CONFIG})")
    return cfg_path


def _parse_native_config(cfg_path: Path) -> VLMConfig:
    try:
        return VLMConfig.from_dict(json.loads(cfg_path.read_text()))
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointIntegrityError(f"{cfg_path}: unreadable model config: {e}") from None


def read_native_config(src_dir: Path) -> VLMConfig:
    """The model config of a native checkpoint directory (the weights are not read)."""
    return _parse_native_config(_native_config_path(src_dir))


def load_native_lazy(src_dir: Path) -> tuple[VLMConfig, SafetensorsFile]:
    """``load_native`` without reading the weights: they are read tensor by tensor when used (exports)."""
    src_dir = Path(src_dir)
    cfg_path = _native_config_path(src_dir)
    verify_checkpoint_dir(src_dir)
    return _parse_native_config(cfg_path), SafetensorsFile(src_dir / NATIVE_WEIGHTS)


def load_native(src_dir: Path) -> tuple[VLMConfig, dict[str, torch.Tensor]]:
    """Read a native checkpoint; its manifest (when present) is verified first."""
    src_dir = Path(src_dir)
    cfg_path = _native_config_path(src_dir)
    verify_checkpoint_dir(src_dir)
    return _parse_native_config(cfg_path), load_safetensors(src_dir / NATIVE_WEIGHTS)


# ----------------------------------------------------------------------------------------------- hf


class SafetensorsFile(Mapping[str, torch.Tensor]):
    """A safetensors file as a read-only mapping that loads one tensor per access (``meta`` reads only the
    header): what streaming writers iterate over instead of a whole state dict in memory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such safetensors file")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                self._keys = list(f.keys())
                self._meta = {
                    k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in self._keys
                }
        except Exception as e:
            raise CheckpointIntegrityError(
                f"{self.path}: not a readable safetensors file (truncated or corrupt): {type(e).__name__}: {e}"
            ) from None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._meta:
            raise KeyError(key)
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key)

    def __contains__(
        self, key: object
    ) -> bool:  # the header's keys (Mapping's default would read the tensor)
        return key in self._meta

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def meta(self, key: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype name, e.g. 'F32') without reading the tensor."""
        return self._meta[key]


_ST_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


_ST_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor: the header is planned from ``entries`` (name, shape,
    dtype, in file order), then ``write`` appends each tensor's bytes in that order, so the caller holds one
    tensor at a time. Atomic (temp file renamed on ``close``); a writer left unclosed (an error) leaves
    nothing behind. The file is a valid safetensors file (offsets contiguous, header padded to 8 bytes),
    though not byte-identical to ``safetensors.torch.save_file``'s ordering."""

    def __init__(
        self,
        path: Path,
        entries: list[tuple[str, tuple[int, ...], torch.dtype]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        header: dict[str, Any] = {"__metadata__": dict(sorted((metadata or {}).items()))} if metadata else {}
        offset = 0
        self._expected: list[tuple[str, tuple[int, ...], torch.dtype]] = []
        for name, shape, dtype in entries:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": _ST_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            self._expected.append((name, tuple(shape), dtype))
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._ctx = atomic_path(Path(path))
        self._tmp = self._ctx.__enter__()
        self._f = open(self._tmp, "wb")  # noqa: SIM115  (closed in close/abort)
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want = self._expected[self._next]
        got = (name, tuple(tensor.shape), tensor.dtype)
        if got != want:
            raise ValueError(f"SafetensorsWriter: expected {want} next, got {got}")
        t = tensor.detach().to("cpu").contiguous()
        self._f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._expected):
            self.abort()
            raise ValueError(f"SafetensorsWriter: {len(self._expected) - self._next} tensors never written")
        self._f.close()
        self._ctx.__exit__(None, None, None)  # fsync + rename

    def abort(self) -> None:
        self._f.close()
        with contextlib.suppress(RuntimeError):
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)  # removes the temp file


def _tensor_meta(state: Mapping[str, torch.Tensor], key: str) -> tuple[tuple[int, ...], int, bool]:
    """(shape, bytes per element, floating?) of ``state[key]``, from the header when ``state`` is lazy."""
    if isinstance(state, SafetensorsFile):
        shape, dtype = state.meta(key)
        return shape, _ST_BYTES[dtype], dtype in ("F64", "F32", "F16", "BF16")
    t = state[key]
    return tuple(t.shape), t.element_size(), t.is_floating_point()


def save_hf(
    state_dict: Mapping[str, torch.Tensor],
    cfg: VLMConfig,
    out_dir: Path,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the public Kimi-VL layout (sharded safetensors + index + config.json), floating tensors cast to
    ``dtype`` (None: as they are). Streams: the shards are planned from shapes alone, then each is built,
    written and dropped, reading only its own tensors from ``state_dict`` (a ``SafetensorsFile`` reads
    them from disk one at a time), so at most one shard (plus the stacked expert tensors it slices) is in
    memory, never the whole model or a cast copy of it."""
    out_dir = Path(out_dir)
    entries = []  # (public name, source key, expert index or None, bytes in the export)
    for key in state_dict:
        shape, size, floating = _tensor_meta(state_dict, key)
        if floating and dtype is not None:
            size = torch.empty((), dtype=dtype).element_size()
        for name, e in hf_names(key, shape, cfg):
            numel = math.prod(shape[1:] if e is not None else shape)
            entries.append((name, key, e, numel * size))
    entries.sort()
    shards: list[list[tuple[str, str, int | None, int]]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry[3] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry[3]
    n = len(shards)
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        loaded: dict[str, torch.Tensor] = {}
        tensors = {}
        for hf_name, key, e, nbytes in shard:
            if key not in loaded:
                loaded[key] = state_dict[key]
            t = loaded[key] if e is None else loaded[key][e]
            tensors[hf_name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
            weight_map[hf_name] = name
            total += nbytes
        save_safetensors_atomic(tensors, out_dir / name, metadata={"format": "pt"})
        del loaded, tensors
    write_json_atomic({"metadata": {"total_size": total}, "weight_map": weight_map}, out_dir / HF_INDEX)
    write_json_atomic(to_hf_config(cfg), out_dir / "config.json")
    return out_dir


def load_hf(src_dir: Path, name: str = "imported") -> tuple[VLMConfig, dict[str, torch.Tensor]]:
    """Read a public-layout checkpoint directory (sharded or single-file) into this library's layout."""
    src_dir = Path(src_dir)
    cfg_path = src_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing (an HF checkpoint directory holds config.json)")
    verify_checkpoint_dir(src_dir)
    cfg = from_hf_config(json.loads(cfg_path.read_text()), name=name)
    index = src_dir / HF_INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in src_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{src_dir}: no *.safetensors weights found")
    hf: dict[str, torch.Tensor] = {}
    for fname in files:
        hf.update(load_safetensors(src_dir / fname))
    return cfg, from_hf_state_dict(hf, cfg)


def verify_loadable(cfg: VLMConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Check keys and shapes against the model the config describes (built on the meta device).

    Raises ``CheckpointLayoutError`` naming missing, unexpected and mis-shaped tensors.
    """
    from kimivl_model.hf_interop import CheckpointLayoutError
    from kimivl_model.vlm import KimiVL

    with torch.device("meta"):
        ref = KimiVL(cfg, attn_backend="sdpa").state_dict()
    missing = sorted(set(ref) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(ref))
    shapes = sorted(
        f"{k}: expected {tuple(ref[k].shape)}, got {tuple(state_dict[k].shape)}"
        for k in set(ref) & set(state_dict)
        if tuple(ref[k].shape) != tuple(state_dict[k].shape)
    )
    if missing or unexpected or shapes:
        raise CheckpointLayoutError(
            f"checkpoint does not match config {cfg.name!r}: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}), wrong shapes {shapes[:5]} ({len(shapes)})"
        )


# ------------------------------------------------------------------ public checkpoints with their files

TOKENIZER_DIR = "tokenizer"  # a native checkpoint's copy of the public checkpoint's tokenizer files
ASSETS_DIR = "hf_assets"  # ... and of its other small files (the original config.json, processor configs)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt", ".msgpack", ".h5")
_MAX_ASSET_BYTES = 64 * 2**20


def import_public(src_dir: Path, out_dir: Path) -> tuple[VLMConfig, int]:
    """A public-layout Kimi-VL checkpoint -> a native checkpoint that brings its tokenizer along.

    ``out_dir`` gets the weights (this library's layout, in the checkpoint's dtype) and config, ``tokenizer/``
    (``tiktoken.model`` / ``tokenizer.json`` + ``tokenizer_config.json`` + chat template, as shipped; the
    special ids they state must be the ones the config's model reads) and ``hf_assets/`` (every other small
    non-weight file, e.g. the original ``config.json``, so an export can write the same layout back). Weight
    files other than safetensors are never read. Returns (config, tensor count)."""
    from tasks.data.text_tokenizer import TOKENIZER_FILES, check_model_ids, load_tokenizer

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    cfg, sd = load_hf(src_dir)
    verify_loadable(cfg, sd)
    names = sorted(p.name for p in src_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    tok_files = [n for n in names if n in TOKENIZER_FILES]
    if tok_files:
        for n in tok_files:
            copy_file_atomic(src_dir / n, out_dir / TOKENIZER_DIR / n)
        check_model_ids(load_tokenizer(out_dir / TOKENIZER_DIR).describe(), cfg, f"importing {src_dir}")
    for n in names:
        p = src_dir / n
        if (
            n in tok_files
            or n == HF_INDEX
            or n.endswith(_WEIGHT_SUFFIXES)
            or p.stat().st_size > _MAX_ASSET_BYTES
        ):
            continue
        copy_file_atomic(p, out_dir / ASSETS_DIR / n)
    save_native(sd, cfg, out_dir)
    return cfg, len(sd)


def export_public(
    state_dict: Mapping[str, torch.Tensor],
    cfg: VLMConfig,
    out_dir: Path,
    *,
    tokenizer_dir: Path | None = None,
    assets_dir: Path | None = None,
    dtype: str = "auto",
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """The public Kimi-VL layout with its files: weights (``save_hf``), ``config.json`` = the original one
    from ``assets_dir`` (an import's ``hf_assets/``) with every field this library owns overwritten, the
    other assets, and the tokenizer's files from ``tokenizer_dir``. ``dtype``: "auto" = the original config's
    ``torch_dtype`` when there is one, else float32; or "float32" / "bfloat16"."""
    out_dir = Path(out_dir)
    original = {}
    if assets_dir is not None and (Path(assets_dir) / "config.json").is_file():
        original = json.loads((Path(assets_dir) / "config.json").read_text())
    if dtype == "auto":
        dtype = original.get("torch_dtype") or "float32"
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype: expected auto, float32 or bfloat16, got {dtype!r}")
    cast = torch.float32 if dtype == "float32" else torch.bfloat16
    save_hf(state_dict, cfg, out_dir, max_shard_bytes=max_shard_bytes, dtype=cast)
    config = merge_config(original, to_hf_config(cfg))
    for sub in (config, config.get("text_config")):
        if isinstance(sub, dict) and "torch_dtype" in sub:
            sub["torch_dtype"] = dtype
    write_json_atomic(config, out_dir / "config.json")
    if assets_dir is not None:
        for p in sorted(Path(assets_dir).iterdir()):
            if p.is_file() and p.name != "config.json":
                copy_file_atomic(p, out_dir / p.name)
    if tokenizer_dir is not None:
        from tasks.data.text_tokenizer import load_tokenizer

        for n in load_tokenizer(tokenizer_dir).files:
            copy_file_atomic(Path(tokenizer_dir) / n, out_dir / n)
    return out_dir


def merge_config(original: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """``original`` with ``ours`` written over it, nested objects merged key by key (keys only the original
    has, e.g. ``auto_map`` or token ids, are kept)."""
    out = dict(original)
    for k, v in ours.items():
        out[k] = merge_config(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
