"""tasks.io.storage against local disk and a real S3 server (SeaweedFS), plus a DVC remote round trip."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import pytest

from tasks.io import storage
from tasks.io.dvc_remote import configure_dvc_remote, dvc_env, run_dvc
from tasks.io.storage import COMPLETE_MARKER, S3Settings, StorageError
from tests.integration.s3_proxy import Proxy
from tests.integration.s3_server import S3Server, free_ports

BUCKET = "kimivl-test"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): sha(p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()
    }


def make_tree(root: Path, seed: int = 0) -> dict[str, str]:
    rng = __import__("random").Random(seed)
    files = {"a.bin": 3000, "sub/b.txt": 17, "sub/deeper/c.json": 0, "d e.bin": 70_000}
    for rel, size in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rng.randbytes(size))
    return tree_hashes(root)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch) -> S3Settings:
    """The server's credentials/endpoint in the environment; returns fast-retry settings from it."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return S3Settings.from_env(max_attempts=3, connect_timeout=2, read_timeout=10)


def uniq(name: str) -> str:
    return f"s3://{BUCKET}/{name}-{os.urandom(4).hex()}"


# ------------------------------------------------------------------------------------------------ local
@pytest.mark.parametrize("style", ["plain", "file"])
def test_local_round_trips(tmp_path: Path, style: str):
    def u(p: Path) -> str:
        return p.resolve().as_uri() if style == "file" else str(p)

    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(5000))
    storage.put_file(src, u(tmp_path / "store/x/obj.bin"))
    assert storage.exists(u(tmp_path / "store/x/obj.bin"))
    storage.get_file(u(tmp_path / "store/x/obj.bin"), tmp_path / "back.bin")
    assert sha((tmp_path / "back.bin").read_bytes()) == sha(src.read_bytes())
    storage.write_bytes(b"hello", u(tmp_path / "store/y"))
    assert storage.read_bytes(u(tmp_path / "store/y")) == b"hello"
    assert not list(tmp_path.glob("store/**/.*.tmp"))  # no temp files left behind

    want = make_tree(tmp_path / "tree")
    storage.put_dir(tmp_path / "tree", u(tmp_path / "store/ds"))
    assert (tmp_path / "store/ds" / COMPLETE_MARKER).is_file()
    assert storage.get_dir(u(tmp_path / "store/ds"), tmp_path / "copy") == tmp_path / "copy"
    assert tree_hashes(tmp_path / "copy") == want
    listed = storage.list_uris(u(tmp_path / "store/ds"))
    assert len(listed) == len(want) + 1 and all(x.startswith(u(tmp_path)) for x in listed)

    storage.delete(u(tmp_path / "store/y"))
    assert not storage.exists(u(tmp_path / "store/y"))
    with pytest.raises(StorageError, match="recursive"):
        storage.delete(u(tmp_path / "store/ds"))
    storage.delete(u(tmp_path / "store/ds"), recursive=True)
    assert not (tmp_path / "store/ds").exists()


def test_local_get_dir_refuses_incomplete(tmp_path: Path):
    make_tree(tmp_path / "half")  # files but no marker: an interrupted copy
    with pytest.raises(StorageError, match=COMPLETE_MARKER):
        storage.get_dir(str(tmp_path / "half"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_uris(tmp_path: Path):
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        storage.read_bytes("gs://bucket/key")
    with pytest.raises(StorageError, match="no such file"):
        storage.get_file(str(tmp_path / "missing"), tmp_path / "x")


# ------------------------------------------------------------------------------------------------ S3
def test_s3_round_trips(s3_env: S3Settings, tmp_path: Path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(300_000))
    uri = uniq("obj")
    assert not storage.exists(uri)
    storage.put_file(src, uri)
    assert storage.exists(uri)
    storage.get_file(uri, tmp_path / "back.bin")
    assert sha((tmp_path / "back.bin").read_bytes()) == sha(src.read_bytes())
    storage.write_bytes(b"\x00bytes\xff", uri + ".raw")
    assert storage.read_bytes(uri + ".raw") == b"\x00bytes\xff"
    assert storage.list_uris(uri) == sorted([uri, uri + ".raw"])
    storage.delete(uri + ".raw")
    assert not storage.exists(uri + ".raw")
    with pytest.raises(StorageError, match=r"read_bytes failed for s3://.*NoSuchKey"):
        storage.read_bytes(uri + ".raw")


def test_s3_multipart_upload(s3_env: S3Settings, tmp_path: Path):
    from dataclasses import replace

    settings = replace(s3_env, multipart_threshold=1 << 20, multipart_chunksize=5 << 20)
    calls: list[str] = []
    client = storage.s3_client(settings)
    for op in ("CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload", "PutObject"):
        client.meta.events.register(f"before-call.s3.{op}", lambda model, op=op, **_: calls.append(op))
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 << 20))  # 11 MiB -> parts of 5 + 5 + 1 MiB
    uri = uniq("big")
    storage.put_file(src, uri, settings=settings)
    assert calls.count("CreateMultipartUpload") == 1 and calls.count("CompleteMultipartUpload") == 1
    assert calls.count("UploadPart") == 3 and "PutObject" not in calls
    etag = client.head_object(Bucket=BUCKET, Key=uri.split("/", 3)[3])["ETag"].strip('"')
    assert etag.endswith("-3")  # S3's multipart ETag: <md5 of part md5s>-<parts>
    storage.get_file(uri, tmp_path / "big.back", settings=settings)
    assert sha((tmp_path / "big.back").read_bytes()) == sha(src.read_bytes())


def test_s3_dir_round_trip_and_complete_marker(s3_env: S3Settings, tmp_path: Path):
    want = make_tree(tmp_path / "tree")
    prefix = uniq("ds")
    storage.put_dir(tmp_path / "tree", prefix)
    assert storage.is_complete(prefix)
    assert f"{prefix}/{COMPLETE_MARKER}" in storage.list_uris(prefix + "/")
    storage.get_dir(prefix, tmp_path / "copy")
    assert tree_hashes(tmp_path / "copy") == want

    # a re-upload replaces the content: files gone from the source are removed from the prefix
    (tmp_path / "tree/a.bin").unlink()
    (tmp_path / "tree/new.bin").write_bytes(b"new")
    storage.put_dir(tmp_path / "tree", prefix + "/")
    storage.get_dir(prefix, tmp_path / "copy")
    assert tree_hashes(tmp_path / "copy") == tree_hashes(tmp_path / "tree")
    assert f"{prefix}/a.bin" not in storage.list_uris(prefix)

    # the marker is the commit point: without it, get_dir refuses and leaves the local dir alone
    storage.delete(f"{prefix}/{COMPLETE_MARKER}")
    assert not storage.is_complete(prefix)
    with pytest.raises(StorageError, match=rf"refused {prefix}.*{COMPLETE_MARKER}"):
        storage.get_dir(prefix, tmp_path / "copy")
    assert tree_hashes(tmp_path / "copy") == tree_hashes(tmp_path / "tree")

    # a corrupted object is caught by the marker's sha256
    storage.put_dir(tmp_path / "tree", prefix)
    storage.write_bytes(b"tampered", f"{prefix}/new.bin")
    with pytest.raises(StorageError, match="sha256"):
        storage.get_dir(prefix, tmp_path / "copy2")
    storage.delete(prefix, recursive=True)
    assert storage.list_uris(prefix + "/") == []


def test_s3_half_uploaded_dir_is_refused(s3_env: S3Settings, tmp_path: Path):
    """A put_dir that dies before its marker (simulated: upload fails midway) is never complete."""
    make_tree(tmp_path / "tree")
    prefix = uniq("half")
    client = storage.s3_client(s3_env)
    n = {"puts": 0}

    def fail_third(**_):
        n["puts"] += 1
        if n["puts"] == 3:
            raise RuntimeError("simulated crash mid-upload")

    client.meta.events.register("before-call.s3.PutObject", fail_third)
    try:
        with pytest.raises(StorageError, match="put_dir"):
            storage.put_dir(tmp_path / "tree", prefix, settings=s3_env)
    finally:
        client.meta.events.unregister("before-call.s3.PutObject", fail_third)
    assert storage.list_uris(prefix + "/")  # some files made it
    assert not storage.is_complete(prefix)
    with pytest.raises(StorageError, match=COMPLETE_MARKER):
        storage.get_dir(prefix, tmp_path / "out")


# ------------------------------------------------------------------------------------------------ faults
def fault_proxy(upstream: str, fail_first: int | None) -> Proxy:
    """A proxy in front of ``upstream`` that answers 500 to the first ``fail_first`` requests (all of them
    if None) and forwards the rest unchanged (Host header kept, so SigV4 still verifies)."""
    count = {"n": 0}

    def rule(method: str, path: str, seen: int) -> str:
        count["n"] += 1
        return "500" if fail_first is None or count["n"] <= fail_first else "forward"

    return Proxy(upstream, rule)


def test_retries_then_succeeds(s3_env: S3Settings, s3_server: S3Server, tmp_path: Path):
    from dataclasses import replace

    with fault_proxy(s3_server.endpoint_url, fail_first=2).running() as proxy:
        settings = replace(s3_env, endpoint_url=proxy.url, max_attempts=4)
        uri = uniq("retry")
        storage.write_bytes(b"survived", uri, settings=settings)
        assert len(proxy.log) == 3  # 2 injected 500s, then the real PUT
    assert storage.read_bytes(uri) == b"survived"


def test_retry_limit_gives_clear_error(s3_env: S3Settings, s3_server: S3Server):
    from dataclasses import replace

    with fault_proxy(s3_server.endpoint_url, fail_first=None).running() as proxy:
        settings = replace(s3_env, endpoint_url=proxy.url, max_attempts=3)
        uri = uniq("doomed")
        with pytest.raises(StorageError) as info:
            storage.write_bytes(b"never", uri, settings=settings)
        assert len(proxy.log) == 3
    msg = str(info.value)
    assert "write_bytes" in msg and uri in msg and "3 attempt" in msg and "HTTP 500" in msg
    full = "".join(traceback.format_exception(info.value))
    assert s3_server.secret_key not in full and s3_server.secret_key[:12] not in full


def test_server_down_gives_clear_error(s3_env: S3Settings, s3_server: S3Server):
    from dataclasses import replace

    (port,) = free_ports(1)  # nothing listens there
    settings = replace(s3_env, endpoint_url=f"http://127.0.0.1:{port}", max_attempts=2, connect_timeout=1)
    uri = uniq("nowhere")
    t0 = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.exists(uri, settings=settings)
    assert time.monotonic() - t0 < 15
    msg = str(info.value)
    assert "exists" in msg and uri in msg and f"127.0.0.1:{port}" in msg and "attempt" in msg
    assert s3_server.secret_key not in "".join(traceback.format_exception(info.value))


# ------------------------------------------------------------------------------------------------ DVC
def test_dvc_remote_push_pull(s3_env: S3Settings, s3_server: S3Server, tmp_path: Path):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = dvc_env()
    run_dvc(repo, "init", "--no-scm", env=env)
    (repo / "seed.txt").write_text("kimi-vl\n")
    script = "import hashlib,pathlib; s=pathlib.Path('seed.txt').read_bytes(); pathlib.Path('out.bin').write_bytes(hashlib.sha512(s).digest()*1000)"
    (repo / "make.py").write_text(script + "\n")
    (repo / "dvc.yaml").write_text(
        f"stages:\n  make:\n    cmd: {sys.executable} make.py\n    deps: [seed.txt, make.py]\n    outs: [out.bin]\n"
    )
    run_dvc(repo, "repro", env=env)
    want = sha((repo / "out.bin").read_bytes())

    remote = f"s3://kimivl-dvc/cache-{os.urandom(4).hex()}"
    configure_dvc_remote(repo, remote, s3_server.endpoint_url)
    committed = (repo / ".dvc/config").read_text()
    local = (repo / ".dvc/config.local").read_text()
    assert s3_server.endpoint_url not in committed and "storage" not in committed
    assert s3_server.endpoint_url in local and "kimivl-dvc" in local
    assert s3_server.secret_key not in committed + local and s3_server.access_key not in committed + local

    run_dvc(repo, "push", env=env)
    assert storage.list_uris(remote + "/")  # the objects are on the S3 server
    shutil.rmtree(repo / ".dvc/cache")
    (repo / "out.bin").unlink()
    run_dvc(repo, "pull", env=env)
    assert sha((repo / "out.bin").read_bytes()) == want
