"""The S3 side of ``tasks.io.storage``: settings from the environment, cached boto3 clients, and the
translation of botocore/boto3/s3transfer failures into ``StorageError`` messages that name the operation,
the URI and the number of attempts, never a credential (see ``tasks.io.storage`` for the semantics)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
T = TypeVar("T")


class StorageError(RuntimeError):
    """A storage operation failed; the message names the operation and the URI (never credentials)."""


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class S3Settings:
    """S3 client settings. Credentials are NOT stored here: boto3 reads them from the environment."""

    endpoint_url: str | None = None  # None = AWS
    region: str | None = None
    retry_mode: str = "standard"  # botocore: "standard" | "adaptive"
    max_attempts: int = 5  # total attempts per request, first one included
    connect_timeout: float = 5.0  # seconds
    read_timeout: float = 60.0  # seconds
    multipart_threshold: int = 64 << 20  # bytes; files at least this big go multipart
    multipart_chunksize: int = 16 << 20  # bytes per part (s3transfer raises it to S3's 5 MiB minimum)
    max_concurrency: int = 8  # parallel parts / files

    def __post_init__(self) -> None:
        if self.retry_mode not in ("standard", "adaptive"):
            raise ValueError(f"retry_mode must be 'standard' or 'adaptive', got {self.retry_mode!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.multipart_threshold < 1 or self.multipart_chunksize < 1 or self.max_concurrency < 1:
            raise ValueError("multipart_threshold, multipart_chunksize and max_concurrency must be >= 1")

    @classmethod
    def from_env(cls, **overrides: Any) -> S3Settings:
        """``KIMIVL_S3_ENDPOINT_URL``/``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, ``KIMIVL_S3_RETRY_MODE``,
        ``KIMIVL_S3_MAX_ATTEMPTS``, ``KIMIVL_S3_CONNECT_TIMEOUT``, ``KIMIVL_S3_READ_TIMEOUT``,
        ``KIMIVL_S3_MULTIPART_THRESHOLD``, ``KIMIVL_S3_MULTIPART_CHUNKSIZE``, ``KIMIVL_S3_MAX_CONCURRENCY``;
        keyword ``overrides`` win."""
        env = os.environ
        vals: dict[str, Any] = {
            "endpoint_url": env.get("KIMIVL_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL") or None,
            "region": env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or None,
        }
        typed = {
            "retry_mode": str, "max_attempts": int, "connect_timeout": float, "read_timeout": float,
            "multipart_threshold": int, "multipart_chunksize": int, "max_concurrency": int,
        }  # fmt: skip
        for name, conv in typed.items():
            raw = env.get(f"KIMIVL_S3_{name.upper()}")
            if raw:
                try:
                    vals[name] = conv(raw)
                except ValueError:
                    raise ValueError(
                        f"KIMIVL_S3_{name.upper()} must be {conv.__name__}, got {raw!r}"
                    ) from None
        vals.update(overrides)
        return cls(**vals)


_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def _credential_fingerprint() -> tuple:
    """Identifies the env credentials without holding them (cache key for clients)."""
    ids = tuple(os.environ.get(k, "") for k in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_DEFAULT_REGION"))
    secret = hashlib.sha256("\0".join(os.environ.get(k, "") for k in _SECRET_ENV).encode()).hexdigest()
    return (*ids, secret)


def s3_client(settings: S3Settings | None = None) -> Any:
    """A boto3 S3 client for ``settings`` (default: from the environment), cached per settings+credentials."""
    settings = settings or S3Settings.from_env()
    key = (settings, _credential_fingerprint())
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"mode": settings.retry_mode, "total_max_attempts": settings.max_attempts},
                connect_timeout=settings.connect_timeout,
                read_timeout=settings.read_timeout,
                max_pool_connections=max(10, settings.max_concurrency * 2),
                s3={"addressing_style": "path" if settings.endpoint_url else "auto"},
            )
            session = boto3.session.Session(region_name=settings.region)
            client = session.client("s3", endpoint_url=settings.endpoint_url, config=config)
            _clients[key] = client
    return client


def transfer_config(settings: S3Settings) -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=settings.multipart_threshold,
        multipart_chunksize=settings.multipart_chunksize,
        max_concurrency=settings.max_concurrency,
        use_threads=settings.max_concurrency > 1,
    )


# ---------------------------------------------------------------------------------------------- errors
def scrub_secrets(text: str) -> str:
    for var in _SECRET_ENV:
        secret = os.environ.get(var)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def _describe(exc: BaseException) -> str:
    """One line on why an S3 call failed, with the number of attempts when botocore reports it."""
    from botocore.exceptions import ClientError

    seen, cur = set(), exc  # walk the chain: S3UploadFailedError etc. wrap the ClientError
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ClientError):
            err = cur.response.get("Error", {})
            meta = cur.response.get("ResponseMetadata", {})
            attempts = int(meta.get("RetryAttempts", 0)) + 1
            status = meta.get("HTTPStatusCode", "?")
            return f"{err.get('Code', '?')} (HTTP {status}) after {attempts} attempt(s): {err.get('Message', '')}"
        cur = cur.__cause__ or cur.__context__
    return f"{type(exc).__name__}: {exc}"


def s3_call(op: str, uri: str, fn: Callable[[], T], settings: S3Settings) -> T:
    """Run ``fn``; turn any botocore/boto3/s3transfer failure into a StorageError naming ``op`` and ``uri``."""
    try:
        return fn()
    except StorageError:
        raise
    except Exception as e:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        hint = ""
        if isinstance(e, BotoConnectionError | HTTPClientError):
            hint = f" after {settings.max_attempts} attempt(s) (is the endpoint {settings.endpoint_url} up?)"
        msg = scrub_secrets(f"S3 {op} failed for {uri}{hint}: {_describe(e)}")
        raise StorageError(msg) from None


def is_not_found(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")
