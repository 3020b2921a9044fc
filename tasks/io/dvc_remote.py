"""Point a DVC repository at an S3 remote taken from the environment, without committing where it is.

``configure_dvc_remote`` writes the remote (URL, endpoint, default flag) into ``.dvc/config.local``
(``dvc remote ... --local``), which DVC git-ignores, so neither the endpoint nor anything secret ever lands
in the committed ``.dvc/config``. Credentials are never written at all: DVC's S3 backend reads the same
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_DEFAULT_REGION`` variables as ``tasks.io.storage``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tasks.io.storage import S3Settings, StorageError, scrub_secrets


def dvc_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a ``dvc`` subprocess: analytics off, plus ``extra``."""
    return {**os.environ, "DVC_NO_ANALYTICS": "1", **(extra or {})}


def run_dvc(repo_dir: str | os.PathLike, *args: str, env: dict[str, str] | None = None, timeout: float = 300):
    """Run ``python -m dvc ARGS`` in ``repo_dir`` (the DVC of this interpreter, no PATH needed); raises
    StorageError with DVC's output (secrets scrubbed) on a non-zero exit."""
    cmd = [sys.executable, "-m", "dvc", *args]
    try:
        proc = subprocess.run(
            cmd, cwd=repo_dir, env=env or dvc_env(), capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise StorageError(f"`dvc {' '.join(args)}` in {repo_dir} failed: {type(e).__name__}") from None
    if proc.returncode != 0:
        out = scrub_secrets((proc.stdout + proc.stderr).strip()[-2000:])
        raise StorageError(f"`dvc {' '.join(args)}` in {repo_dir} exited {proc.returncode}:\n{out}")
    return proc


def configure_dvc_remote(
    repo_dir: str | os.PathLike,
    url: str,
    endpoint_url: str | None = None,
    *,
    name: str = "storage",
    env: dict[str, str] | None = None,
) -> None:
    """Make ``url`` (``s3://bucket/prefix``) the default DVC remote ``name`` of ``repo_dir``, in the
    git-ignored local config. ``endpoint_url`` defaults to ``KIMIVL_S3_ENDPOINT_URL``/``AWS_ENDPOINT_URL``
    (None: AWS itself)."""
    if not url.startswith("s3://") or len(url) <= len("s3://"):
        raise StorageError(f"configure_dvc_remote: url must be s3://bucket[/prefix], got {url!r}")
    repo = Path(repo_dir)
    if not (repo / ".dvc").is_dir():
        raise StorageError(f"configure_dvc_remote: {repo} is not a DVC repository (no .dvc/; run `dvc init`)")
    if endpoint_url is None:
        endpoint_url = S3Settings.from_env().endpoint_url
    env = env or dvc_env()
    run_dvc(repo, "remote", "add", "--local", "--default", "--force", name, url, env=env)
    if endpoint_url:
        run_dvc(repo, "remote", "modify", "--local", name, "endpointurl", endpoint_url, env=env)
