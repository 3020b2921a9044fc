"""Bytes at rest: one module for local paths, ``file://`` URIs and ``s3://bucket/key`` objects.

Semantics (DESIGN.md, "bytes at rest"):

- Writes are atomic. Locally: write a temp file beside the target, fsync, ``os.replace``. On S3: one PUT,
  or a multipart upload that becomes visible only on CompleteMultipartUpload (s3transfer aborts it on error).
- Directories: ``put_dir`` writes every file, then a ``_COMPLETE`` marker LAST (a JSON list of the files
  with their sizes and sha256). ``get_dir`` refuses a prefix without the marker, downloads exactly the
  files it lists and checks their hashes, so a half-uploaded dataset or checkpoint is never taken as
  complete. A re-upload deletes the old marker first. A local ``get_dir``/``put_dir`` stages into a
  hidden directory beside the target and renames it into place.
- S3 configuration comes from the standard environment: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``
  (``AWS_SESSION_TOKEN``), ``AWS_DEFAULT_REGION``; endpoint from ``KIMIVL_S3_ENDPOINT_URL`` or
  ``AWS_ENDPOINT_URL``; tuning from ``KIMIVL_S3_*`` (see ``S3Settings.from_env``).
- S3 settings, clients and error translation: ``tasks.io.s3``.
- Retries: botocore's ``standard`` (or ``adaptive``) retry mode, i.e. exponential backoff with jitter on
  5xx, throttling and connection errors, up to ``max_attempts`` in total, plus connect/read timeouts.
  Past the limit a ``StorageError`` names the operation, the URI and the number of attempts; messages
  never contain credentials (the secret key is also scrubbed from any text we relay).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from tasks.io.faults import crash_point
from tasks.io.files import atomic_path, sha256_file, staged_dir
from tasks.io.s3 import (
    S3Settings,
    StorageError,
    is_not_found,
    s3_call,
    s3_client,
    scrub_secrets,
    transfer_config,
)

COMPLETE_MARKER = "_COMPLETE"
MARKER_FORMAT = 1
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
__all__ = [  # settings, clients and errors live in tasks.io.s3; importable from here as before
    "COMPLETE_MARKER", "S3Settings", "StorageError", "delete", "dir_matches", "exists", "get_dir",
    "get_file", "is_complete", "list_uris", "put_dir", "put_file", "read_bytes", "s3_client",
    "scrub_secrets", "write_bytes",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------- URIs
@dataclass(frozen=True)
class _Loc:
    scheme: str  # "s3" | "file"
    bucket: str = ""
    key: str = ""
    path: Path | None = None
    style: str = "plain"  # how to print local results: "plain" paths or "file" URIs


def _parse(uri: str | os.PathLike) -> _Loc:
    text = os.fspath(uri)
    if text.startswith("s3://"):
        parts = urlparse(text)
        if not parts.netloc:
            raise StorageError(f"invalid S3 URI {text!r}: expected s3://bucket/key")
        return _Loc("s3", bucket=parts.netloc, key=parts.path.lstrip("/"))
    if text.startswith("file://"):
        parts = urlparse(text)
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"invalid file URI {text!r}: expected file:///absolute/path")
        return _Loc("file", path=Path(unquote(parts.path)), style="file")
    if _SCHEME.match(text):
        raise StorageError(f"unsupported URI scheme in {text!r}: expected s3://, file:// or a local path")
    return _Loc("file", path=Path(text))


def _s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def _local_uri(path: Path, style: str) -> str:
    return path.resolve().as_uri() if style == "file" else str(path)


def _dir_key(key: str) -> str:
    """Key prefix of a directory: '' for the bucket root, else ending in '/'."""
    key = key.strip("/")
    return f"{key}/" if key else ""


@contextmanager
def _local_errors(op: str, uri: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        raise StorageError(f"local {op} failed for {uri}: {type(e).__name__}: {e.strerror or e}") from e


# ---------------------------------------------------------------------------------------------- local helpers
def _dir_files(local_dir: Path) -> dict[str, Path]:
    """Relative POSIX path -> file, for every regular file under ``local_dir`` (sorted)."""
    files = {p.relative_to(local_dir).as_posix(): p for p in sorted(local_dir.rglob("*")) if p.is_file()}
    return files


# ---------------------------------------------------------------------------------------------- objects
def put_file(local_path: str | os.PathLike, uri: str, *, settings: S3Settings | None = None) -> str:
    """Copy one local file to ``uri`` atomically; returns ``uri``."""
    src, loc = Path(local_path), _parse(uri)
    if not src.is_file():
        raise StorageError(f"put_file to {uri}: source {src} is not a file")
    if loc.scheme == "file":
        with _local_errors("put_file", uri), atomic_path(loc.path) as tmp:
            shutil.copyfile(src, tmp)
        return uri
    st = settings or S3Settings.from_env()
    client = s3_client(st)
    s3_call(
        "put_file",
        uri,
        lambda: client.upload_file(str(src), loc.bucket, loc.key, Config=transfer_config(st)),
        st,
    )
    return uri


def get_file(uri: str, local_path: str | os.PathLike, *, settings: S3Settings | None = None) -> Path:
    """Copy ``uri`` to a local file atomically (temp beside it + rename); returns the local path."""
    dst, loc = Path(local_path), _parse(uri)
    if loc.scheme == "file":
        if not loc.path.is_file():
            raise StorageError(f"get_file failed for {uri}: no such file")
        with _local_errors("get_file", uri), atomic_path(dst) as tmp:
            shutil.copyfile(loc.path, tmp)
        return dst
    st = settings or S3Settings.from_env()
    client = s3_client(st)
    with _local_errors("get_file", uri), atomic_path(dst) as tmp:
        s3_call(
            "get_file",
            uri,
            lambda: client.download_file(loc.bucket, loc.key, str(tmp), Config=transfer_config(st)),
            st,
        )
    return dst


def read_bytes(uri: str, *, settings: S3Settings | None = None) -> bytes:
    """The whole content of one object/file."""
    loc = _parse(uri)
    if loc.scheme == "file":
        with _local_errors("read_bytes", uri):
            return loc.path.read_bytes()
    st = settings or S3Settings.from_env()
    client = s3_client(st)
    return s3_call(
        "read_bytes", uri, lambda: client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read(), st
    )


def write_bytes(data: bytes, uri: str, *, settings: S3Settings | None = None) -> str:
    """Write ``data`` to ``uri`` atomically (one PUT on S3, temp + rename locally); returns ``uri``."""
    loc = _parse(uri)
    if loc.scheme == "file":
        with _local_errors("write_bytes", uri), atomic_path(loc.path) as tmp:
            tmp.write_bytes(data)
        return uri
    st = settings or S3Settings.from_env()
    client = s3_client(st)
    s3_call("write_bytes", uri, lambda: client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data), st)
    return uri


def exists(uri: str, *, settings: S3Settings | None = None) -> bool:
    """Whether the object (S3) or file/directory (local) at ``uri`` exists."""
    loc = _parse(uri)
    if loc.scheme == "file":
        return loc.path.exists()
    st = settings or S3Settings.from_env()
    client = s3_client(st)

    def head() -> bool:
        try:
            client.head_object(Bucket=loc.bucket, Key=loc.key)
            return True
        except Exception as e:
            if is_not_found(e):
                return False
            raise

    return s3_call("exists", uri, head, st)


def list_uris(prefix: str, *, settings: S3Settings | None = None) -> list[str]:
    """Sorted URIs of every object under ``prefix``: S3 key-prefix match; locally the files under a
    directory (recursively), or the files in the parent directory whose path starts with ``prefix``."""
    loc = _parse(prefix)
    if loc.scheme == "file":
        p = loc.path
        with _local_errors("list_uris", prefix):
            if p.is_dir():
                found = [f for f in p.rglob("*") if f.is_file()]
            elif p.parent.is_dir():
                found = [f for f in p.parent.rglob("*") if f.is_file() and str(f).startswith(str(p))]
            else:
                found = []
        return sorted(_local_uri(f, loc.style) for f in found)
    st = settings or S3Settings.from_env()
    client = s3_client(st)

    def listing() -> list[str]:
        keys = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.key):
            keys += [obj["Key"] for obj in page.get("Contents", [])]
        return sorted(_s3_uri(loc.bucket, k) for k in keys)

    return s3_call("list_uris", prefix, listing, st)


def delete(uri: str, *, recursive: bool = False, settings: S3Settings | None = None) -> None:
    """Delete one object/file (missing is fine). ``recursive=True`` deletes a whole directory prefix,
    its ``_COMPLETE`` marker first so the prefix stops counting as complete before anything else goes."""
    loc = _parse(uri)
    if loc.scheme == "file":
        with _local_errors("delete", uri):
            if loc.path.is_dir() and recursive:
                (loc.path / COMPLETE_MARKER).unlink(missing_ok=True)
                shutil.rmtree(loc.path)
            elif loc.path.is_dir():
                raise StorageError(f"delete failed for {uri}: a directory (pass recursive=True)")
            else:
                loc.path.unlink(missing_ok=True)
        return
    st = settings or S3Settings.from_env()
    client = s3_client(st)
    if not recursive:
        s3_call("delete", uri, lambda: client.delete_object(Bucket=loc.bucket, Key=loc.key), st)
        return
    base = _dir_key(loc.key)
    marker = _s3_uri(loc.bucket, base + COMPLETE_MARKER)
    s3_call("delete", marker, lambda: client.delete_object(Bucket=loc.bucket, Key=base + COMPLETE_MARKER), st)
    for u in list_uris(_s3_uri(loc.bucket, base), settings=st):
        key = _parse(u).key
        s3_call("delete", u, lambda key=key: client.delete_object(Bucket=loc.bucket, Key=key), st)


# ---------------------------------------------------------------------------------------------- directories
def _marker_bytes(files: dict[str, Path]) -> bytes:
    entries = {rel: {"size": p.stat().st_size, "sha256": sha256_file(p)} for rel, p in files.items()}
    return (json.dumps({"format": MARKER_FORMAT, "files": entries}, indent=1, sort_keys=True) + "\n").encode()


def put_dir(local_dir: str | os.PathLike, uri_prefix: str, *, settings: S3Settings | None = None) -> str:
    """Upload every file under ``local_dir`` to ``uri_prefix``, then the ``_COMPLETE`` marker last.

    On S3 an old marker is deleted first and objects of a previous upload that are not part of this one
    are removed before the new marker is written. Returns ``uri_prefix``."""
    src, loc = Path(local_dir), _parse(uri_prefix)
    if not src.is_dir():
        raise StorageError(f"put_dir to {uri_prefix}: source {src} is not a directory")
    files = _dir_files(src)
    if COMPLETE_MARKER in files:
        raise StorageError(
            f"put_dir to {uri_prefix}: {src} contains the reserved file name {COMPLETE_MARKER!r}"
        )
    marker = _marker_bytes(files)
    if loc.scheme == "file":
        with _local_errors("put_dir", uri_prefix), staged_dir(loc.path) as stage:
            for rel, p in files.items():
                (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, stage / rel)
            (stage / COMPLETE_MARKER).write_bytes(marker)  # last
        return uri_prefix
    st = settings or S3Settings.from_env()
    client, base = s3_client(st), _dir_key(loc.key)
    marker_uri = _s3_uri(loc.bucket, base + COMPLETE_MARKER)
    s3_call(
        "put_dir", marker_uri, lambda: client.delete_object(Bucket=loc.bucket, Key=base + COMPLETE_MARKER), st
    )
    previous = set(list_uris(_s3_uri(loc.bucket, base), settings=st))
    tconf = transfer_config(st)

    def upload(item: tuple[str, Path]) -> str:
        rel, p = item
        uri = _s3_uri(loc.bucket, base + rel)
        s3_call("put_dir", uri, lambda: client.upload_file(str(p), loc.bucket, base + rel, Config=tconf), st)
        return uri

    with ThreadPoolExecutor(max_workers=min(st.max_concurrency, max(1, len(files)))) as pool:
        written = set(pool.map(upload, files.items()))
    for stale in sorted(previous - written - {marker_uri}):
        key = _parse(stale).key
        s3_call("put_dir", stale, lambda key=key: client.delete_object(Bucket=loc.bucket, Key=key), st)
    crash_point("storage:put_dir:before_marker")
    write_bytes(marker, marker_uri, settings=st)  # last: the prefix is complete from now on
    return uri_prefix


def _read_marker(uri_prefix: str, settings: S3Settings | None) -> dict[str, dict]:
    loc = _parse(uri_prefix)
    marker_uri = (
        _local_uri(loc.path / COMPLETE_MARKER, loc.style)
        if loc.scheme == "file"
        else _s3_uri(loc.bucket, _dir_key(loc.key) + COMPLETE_MARKER)
    )
    if not exists(marker_uri, settings=settings):
        raise StorageError(
            f"get_dir refused {uri_prefix}: no {COMPLETE_MARKER} marker (upload incomplete or not a put_dir prefix)"
        )
    try:
        files = json.loads(read_bytes(marker_uri, settings=settings))["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise StorageError(
            f"get_dir refused {uri_prefix}: unreadable {COMPLETE_MARKER} marker ({e})"
        ) from None
    return files


def is_complete(uri_prefix: str, *, settings: S3Settings | None = None) -> bool:
    """Whether ``uri_prefix`` holds a finished ``put_dir`` upload (its ``_COMPLETE`` marker exists)."""
    loc = _parse(uri_prefix)
    if loc.scheme == "file":
        return (loc.path / COMPLETE_MARKER).is_file()
    return exists(_s3_uri(loc.bucket, _dir_key(loc.key) + COMPLETE_MARKER), settings=settings)


def dir_matches(local_dir: str | os.PathLike, uri_prefix: str, *, settings: S3Settings | None = None) -> bool:
    """True when ``uri_prefix`` holds a complete ``put_dir`` upload of exactly ``local_dir``'s files (same
    relative paths, sizes and sha256): re-uploading would change nothing. Unreachable stores raise."""
    loc = _parse(uri_prefix)
    st = None if loc.scheme == "file" else (settings or S3Settings.from_env())
    if not is_complete(uri_prefix, settings=st):
        return False
    try:
        remote = _read_marker(uri_prefix, st)
    except StorageError:
        return False
    local = json.loads(_marker_bytes(_dir_files(Path(local_dir))))["files"]
    return remote == local


def get_dir(uri_prefix: str, local_dir: str | os.PathLike, *, settings: S3Settings | None = None) -> Path:
    """Download a complete ``put_dir`` prefix into ``local_dir`` (replaced atomically); refuses a prefix
    without ``_COMPLETE`` and checks every file's size and sha256 against the marker. The marker itself is
    not copied. Returns ``local_dir``."""
    dst, loc = Path(local_dir), _parse(uri_prefix)
    st = None if loc.scheme == "file" else (settings or S3Settings.from_env())
    files = _read_marker(uri_prefix, st)
    with _local_errors("get_dir", uri_prefix), staged_dir(dst) as stage:

        def fetch(rel: str) -> None:
            if loc.scheme == "file":
                src_uri = _local_uri(loc.path / rel, loc.style)
            else:
                src_uri = _s3_uri(loc.bucket, _dir_key(loc.key) + rel)
            target = stage / rel
            get_file(src_uri, target, settings=st)
            want = files[rel]
            if target.stat().st_size != want["size"] or sha256_file(target) != want["sha256"]:
                raise StorageError(f"get_dir: {src_uri} does not match the size/sha256 in {COMPLETE_MARKER}")

        workers = 1 if st is None else min(st.max_concurrency, max(1, len(files)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(fetch, sorted(files)))
    return dst
