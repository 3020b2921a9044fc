"""The run's exported model (step ``export``): the last phase's final checkpoint as

- ``OUT/export/native/``: a verified copy (skipped when its manifest's hash is the checkpoint's);
- ``OUT/export/hf/``: the public Kimi-VL layout (``weights.export_public``) with the data's tokenizer and, for
  a fine-tuned import, the original checkpoint's other files and dtype; its manifest's parents are the
  checkpoint, the tokenizer and those files, so an unchanged export is up to date and skipped.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tasks import Log
from tasks.io.files import replace_dir
from tasks.io.manifest import (
    ManifestError,
    dir_parent,
    is_up_to_date,
    read_manifest,
    verify_files,
    write_manifest,
)
from tasks.io.weights import ASSETS_DIR, export_public, load_native_lazy


def export_sources(recipe: Any, data: Path) -> tuple[Path | None, Path | None]:
    """(tokenizer, assets) an export ships: the data's tokenizer, and an imported init checkpoint's
    original files (``hf_assets/``: its config.json keys, processor configs)."""
    tok = Path(data) / "tokenizer"
    init = recipe.model.init_checkpoint
    assets = Path(init) / ASSETS_DIR if init is not None and (Path(init) / ASSETS_DIR).is_dir() else None
    return (tok if tok.is_dir() else None), assets


def export_run(
    final: Path,
    export_root: Path,
    max_shard_bytes: int,
    tokenizer_dir: Path | None = None,
    assets_dir: Path | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """``final`` -> ``export_root/native`` and ``export_root/hf``, each skipped when current."""
    native, hf = Path(export_root) / "native", Path(export_root) / "hf"
    up_to_date = []
    if _export_native(Path(final), native, log):
        up_to_date.append("native")
    if _export_hf(Path(final), hf, max_shard_bytes, tokenizer_dir, assets_dir, log):
        up_to_date.append("hf")
    return {"native": str(native), "hf": str(hf), "source": str(final), "up_to_date": up_to_date}


def _export_native(final: Path, native: Path, log: Log) -> bool:
    """A verified copy of ``final``; True when the existing one was already current."""
    src = read_manifest(final)
    try:
        m = read_manifest(native)
        verify_files(native, m)
        if m.content_hash == src.content_hash:
            log(f"[export] {native}: up to date (skipped)")
            return True
    except ManifestError:
        pass
    stage = native.parent / ".native.staging"
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(final, stage)
    verify_files(stage)
    replace_dir(stage, native)
    log(f"[export] native checkpoint -> {native}")
    return False


def _export_hf(
    final: Path, hf: Path, max_shard_bytes: int, tokenizer_dir: Path | None, assets_dir: Path | None, log: Log
) -> bool:
    """The public layout; True when the existing one was already current."""
    config: dict[str, Any] = {"format": "kimi-vl-hf", "max_shard_bytes": max_shard_bytes}
    parents = [read_manifest(final).parent_of(final)]
    for extra in (tokenizer_dir, assets_dir):
        if extra is not None:
            config[Path(extra).name] = str(extra)
            parents.append(dir_parent(Path(extra)))
    if is_up_to_date(hf, config=config, parents=parents):
        log(f"[export] {hf}: up to date (skipped)")
        return True
    stage = hf.parent / ".hf.staging"
    shutil.rmtree(stage, ignore_errors=True)
    cfg, sd = load_native_lazy(final)  # streamed: read tensor by tensor while the shards are written
    export_public(
        sd, cfg, stage, tokenizer_dir=tokenizer_dir, assets_dir=assets_dir, max_shard_bytes=max_shard_bytes
    )
    write_manifest(stage, kind="export", step="export:hf", config=config, parents=parents)
    replace_dir(stage, hf)
    log(f"[export] public Kimi-VL layout -> {hf}")
    return False
