"""Local files, the one owner of how bytes reach a disk: atomic writes (temp file beside the target,
fsync, rename), staged directories that replace their target only once complete, and sha256 hashing.

A crash (``tasks.io.faults.crash_point``) at any moment leaves either the old complete file/directory or
the new one under the final name, never a half-written one; temp files and staging directories are
hidden (``.name.*``) and cleaned up on errors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.io.faults import crash_point


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_path(final: Path, crash_name: str | None = "atomic_write") -> Iterator[Path]:
    """Yield a temp path beside ``final``; on success fsync + rename onto ``final``, else delete it.
    ``crash_name``: the fault-injection point between the fsync and the rename (None: none)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        if crash_name is not None:
            crash_point(crash_name)
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json_atomic(obj: Any, path: Path, crash_name: str | None = "atomic_write") -> None:
    """``obj`` as indented, key-sorted JSON (non-JSON values as ``str``), written atomically."""
    with atomic_path(Path(path), crash_name) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_bytes_atomic(data: bytes, path: Path) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(data)


def copy_file_atomic(src: Path, dst: Path) -> None:
    with atomic_path(Path(dst)) as tmp:
        shutil.copyfile(src, tmp)


def fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(stage: Path, final: Path, crash_name: str | None = None) -> None:
    """Rename a complete ``stage`` directory onto ``final``, replacing an older ``final``: it is moved
    aside first (``.NAME.old``; one a crash left behind is removed), then deleted. ``crash_name``: the
    fault-injection point between the two renames, where ``final`` is briefly absent."""
    stage, final = Path(stage), Path(final)
    old = final.parent / f".{final.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
        if crash_name is not None:
            crash_point(crash_name)
    os.replace(stage, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh hidden staging directory beside ``final``; on success it replaces ``final``
    (``replace_dir``), on an error it is deleted and ``final`` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = final.parent / f".{final.name}.staging-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    replace_dir(stage, final)
