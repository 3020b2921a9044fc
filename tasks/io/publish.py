"""Copies of a run's outputs in an object store (or another directory): datasets, checkpoints,
evaluations and the export, each a complete ``put_dir`` upload (``tasks/io/storage.py``: files first, the
``_COMPLETE`` marker with every file's sha256 last), so a reader never sees half an upload.

``publish_dir`` skips an upload whose marker already lists exactly the local files (a rerun or a resumed
pipeline uploads only what changed). The layout under the run's ``artifact_uri`` mirrors the run
directory: ``data/tokenizer``, ``data/tokenized/<name>``, ``phases/<phase>/final``, ``eval/<point>``,
``export/hf``. ``kimivl eval --checkpoint s3://...`` and ``fetch_dir`` read them back (verified).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks import Log
from tasks.io import storage


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def publish_dir(local_dir: Path | str, uri: str, log: Log = print) -> dict[str, Any]:
    """Upload ``local_dir`` to ``uri`` unless an identical complete copy is there; returns what happened."""
    local_dir = Path(local_dir)
    if storage.dir_matches(local_dir, uri):
        log(f"[publish] {uri}: up to date")
        return {"uri": uri, "uploaded": False}
    storage.put_dir(local_dir, uri)
    log(f"[publish] {local_dir} -> {uri}")
    return {"uri": uri, "uploaded": True}


def publish_data(data_root: Path | str, artifact_uri: str, log: Log = print) -> dict[str, str]:
    """The tokenizer and every tokenized dataset (what training reads) -> ``ARTIFACT_URI/data/...``."""
    root = Path(data_root)
    out = {"tokenizer": publish_dir(root / "tokenizer", join(artifact_uri, "data/tokenizer"), log)["uri"]}
    for d in sorted(p for p in (root / "tokenized").iterdir() if p.is_dir()):
        out[d.name] = publish_dir(d, join(artifact_uri, "data/tokenized", d.name), log)["uri"]
    return out


def fetch_dir(uri: str, cache_root: Path | str) -> Path:
    """A local, verified copy of a published directory (``file://``/plain paths are returned as they are)."""
    if not uri.startswith("s3://"):
        return Path(uri.removeprefix("file://"))
    dst = Path(cache_root) / uri.removeprefix("s3://").replace("/", "__")
    if dst.is_dir() and storage.dir_matches(dst, uri):
        return dst
    return storage.get_dir(uri, dst)
