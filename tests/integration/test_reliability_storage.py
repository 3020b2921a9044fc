"""Object-store faults against a real S3 server (SeaweedFS) behind a fault-injecting proxy.

``tests/integration/test_storage.py`` covers 500s on a single PUT (retried, then a clear error) and a
server that is down for ``exists``. Here: the server down at start for every operation, responses that are
slow (still succeed) or stall (read timeout, retried, then a clear error), and 500s or stalls in the middle
of a multipart upload. In every failure the error names the operation, endpoint or URI and the attempts,
never the secret key, and nothing partial becomes visible: no object, no ``_COMPLETE`` marker, no
unfinished multipart upload left on the server.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import replace
from pathlib import Path

import pytest

from tasks.io import storage
from tasks.io.storage import COMPLETE_MARKER, S3Settings, StorageError
from tests.integration.s3_proxy import Proxy
from tests.integration.s3_server import S3Server, free_ports

BUCKET = "kimivl-test"
MiB = 1 << 20


def is_part(method: str, path: str) -> bool:
    return method == "PUT" and "partNumber=" in path


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch) -> S3Settings:
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return S3Settings.from_env(max_attempts=3, connect_timeout=1, read_timeout=1.5, max_concurrency=2)


def uniq(name: str) -> str:
    return f"s3://{BUCKET}/reliability/{name}-{os.urandom(4).hex()}"


def key_of(uri: str) -> str:
    return uri.split("/", 3)[3]


def assert_secret_free(exc: BaseException, server: S3Server) -> None:
    text = "".join(traceback.format_exception(exc))
    assert server.secret_key not in text and server.secret_key[:12] not in text


def assert_no_open_uploads(server: S3Server, settings: S3Settings, key: str) -> None:
    direct = storage.s3_client(replace(settings, endpoint_url=server.endpoint_url))
    ups = direct.list_multipart_uploads(Bucket=BUCKET, Prefix=key).get("Uploads", [])
    assert ups == [], ups


def big_file(tmp_path: Path, mib: int = 11) -> Path:
    p = tmp_path / "big.bin"
    p.write_bytes(os.urandom(mib * MiB))  # 11 MiB -> parts of 5 + 5 + 1 MiB
    return p


def multipart(settings: S3Settings, endpoint: str) -> S3Settings:
    return replace(settings, endpoint_url=endpoint, multipart_threshold=MiB, multipart_chunksize=5 * MiB)


# ------------------------------------------------------------------------------------------------ down
OPS = {
    "write_bytes": lambda uri, st, tmp: storage.write_bytes(b"x", uri, settings=st),
    "read_bytes": lambda uri, st, tmp: storage.read_bytes(uri, settings=st),
    "put_file": lambda uri, st, tmp: storage.put_file(tmp / "f.bin", uri, settings=st),
    "get_file": lambda uri, st, tmp: storage.get_file(uri, tmp / "got.bin", settings=st),
    "put_dir": lambda uri, st, tmp: storage.put_dir(tmp / "d", uri, settings=st),
    "get_dir": lambda uri, st, tmp: storage.get_dir(uri, tmp / "gotdir", settings=st),
    "list_uris": lambda uri, st, tmp: storage.list_uris(uri, settings=st),
    "delete": lambda uri, st, tmp: storage.delete(uri, recursive=True, settings=st),
}


@pytest.mark.parametrize("op", list(OPS))
def test_server_down_at_start_every_operation_fails_clearly(s3_env, s3_server, tmp_path, op):
    (tmp_path / "f.bin").write_bytes(b"payload")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("a")
    (port,) = free_ports(1)  # nothing listens there: connection refused
    st = replace(s3_env, endpoint_url=f"http://127.0.0.1:{port}", max_attempts=3)
    sends = []
    storage.s3_client(st).meta.events.register("before-send.s3", lambda **kw: sends.append(1))
    uri = uniq(f"down-{op}")
    t0 = time.monotonic()
    with pytest.raises(StorageError) as info:
        OPS[op](uri, st, tmp_path)
    assert time.monotonic() - t0 < 20
    msg = str(info.value)
    assert f"127.0.0.1:{port}" in msg and "3 attempt" in msg and BUCKET in msg, msg
    assert len(sends) == 3  # retried, with backoff, up to max_attempts; then the error
    assert_secret_free(info.value, s3_server)
    assert not (tmp_path / "got.bin").exists() and not (tmp_path / "gotdir").exists()


# ------------------------------------------------------------------------------------------------ slow / stalled
def test_slow_responses_still_succeed(s3_env, s3_server, tmp_path):
    with Proxy(s3_server.endpoint_url, lambda m, p, n: 0.5).running() as proxy:
        st = replace(s3_env, endpoint_url=proxy.url)
        uri = uniq("slow")
        storage.write_bytes(b"slowly but surely", uri, settings=st)
        assert storage.read_bytes(uri, settings=st) == b"slowly but surely"
        assert proxy.count("PUT") == 1  # slow (0.5 s) is not a timeout (1.5 s): no retry


def test_stalled_put_is_retried_after_the_read_timeout(s3_env, s3_server):
    rule = lambda m, p, n: "stall" if m == "PUT" and n == 0 else "forward"  # noqa: E731
    with Proxy(s3_server.endpoint_url, rule).running() as proxy:
        st = replace(s3_env, endpoint_url=proxy.url)
        uri = uniq("stall-once")
        storage.write_bytes(b"second try", uri, settings=st)
        assert proxy.count("PUT", action="stall") == 1 and proxy.count("PUT", action="forward") == 1
    assert storage.read_bytes(uri, settings=s3_env) == b"second try"


def test_server_that_always_stalls_gives_a_clear_timeout_error(s3_env, s3_server):
    rule = lambda m, p, n: "stall" if m == "PUT" else "forward"  # noqa: E731
    with Proxy(s3_server.endpoint_url, rule).running() as proxy:
        st = replace(s3_env, endpoint_url=proxy.url)
        uri = uniq("stall-always")
        t0 = time.monotonic()
        with pytest.raises(StorageError) as info:
            storage.write_bytes(b"never", uri, settings=st)
        assert time.monotonic() - t0 < 30
        assert proxy.count("PUT") == 3
    msg = str(info.value)
    assert "write_bytes" in msg and uri in msg and "3 attempt" in msg and "timeout" in msg.lower(), msg
    assert_secret_free(info.value, s3_server)
    assert not storage.exists(uri, settings=s3_env)


# ------------------------------------------------------------------------------------------------ multipart
@pytest.mark.parametrize("fault", ["500", "stall"])
def test_fault_mid_multipart_upload_is_retried(s3_env, s3_server, tmp_path, fault):
    src = big_file(tmp_path)

    def rule(m, p, n):  # the second part fails twice (500) or stalls once, then goes through
        if is_part(m, p) and "partNumber=2" in p and n < (2 if fault == "500" else 1):
            return fault
        return "forward"

    with Proxy(s3_server.endpoint_url, rule).running() as proxy:
        st = multipart(s3_env, proxy.url)
        uri = uniq(f"mp-{fault}")
        storage.put_file(src, uri, settings=st)
        assert proxy.count("PUT", "partNumber=2") == (3 if fault == "500" else 2)
        assert proxy.count("POST", "uploads") == 1  # one multipart upload, completed once
    storage.get_file(uri, tmp_path / "back.bin", settings=s3_env)
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


def test_multipart_past_the_retry_limit_leaves_nothing(s3_env, s3_server, tmp_path):
    src = big_file(tmp_path)
    rule = lambda m, p, n: "500" if is_part(m, p) and "partNumber=2" in p else "forward"  # noqa: E731
    with Proxy(s3_server.endpoint_url, rule).running() as proxy:
        st = multipart(s3_env, proxy.url)
        uri = uniq("mp-doomed")
        with pytest.raises(StorageError) as info:
            storage.put_file(src, uri, settings=st)
        assert proxy.count("PUT", "partNumber=2") == 3
        assert proxy.count("DELETE", "uploadId=") >= 1  # s3transfer aborted the upload
    msg = str(info.value)
    assert "put_file" in msg and uri in msg and "HTTP 500" in msg and "3 attempt" in msg, msg
    assert_secret_free(info.value, s3_server)
    assert not storage.exists(uri, settings=s3_env)  # never CompleteMultipartUpload: no object
    assert_no_open_uploads(s3_server, s3_env, key_of(uri))


def test_put_dir_with_a_failing_multipart_part_is_never_complete(s3_env, s3_server, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    big_file(tmp_path).rename(d / "model.safetensors")
    (d / "trainer_state.json").write_text('{"step": 3}')
    rule = lambda m, p, n: "500" if is_part(m, p) and "partNumber=3" in p else "forward"  # noqa: E731
    with Proxy(s3_server.endpoint_url, rule).running() as proxy:
        prefix = uniq("dir-doomed")
        with pytest.raises(StorageError, match=r"put_dir failed for .*model\.safetensors"):
            storage.put_dir(d, prefix, settings=multipart(s3_env, proxy.url))
    assert not storage.is_complete(prefix, settings=s3_env)
    assert f"{prefix}/{COMPLETE_MARKER}" not in storage.list_uris(prefix + "/", settings=s3_env)
    assert f"{prefix}/model.safetensors" not in storage.list_uris(prefix + "/", settings=s3_env)
    with pytest.raises(StorageError, match=COMPLETE_MARKER):
        storage.get_dir(prefix, tmp_path / "out", settings=s3_env)
    assert not (tmp_path / "out").exists()
    assert_no_open_uploads(s3_server, s3_env, key_of(prefix))
