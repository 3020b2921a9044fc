"""MLflow's rules for what may be recorded, applied before anything is sent: valid names (``mlflow_key``),
length limits, secrets masked (``tasks.tracking.secrets``: the same rule as every other tracker); the run
tags that identify a pipeline's runs; where the embedded store lives.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from tasks.tracking.secrets import flatten, redact, scrub

ROLE_TAG = "kimivl.role"  # "pipeline" | "phase"
PHASE_TAG = "kimivl.phase"
RUN_KEY_TAG = "kimivl.run_key"
PARENT_TAG = "mlflow.parentRunId"
MAX_KEY, MAX_PARAM, MAX_TAG, MAX_DIGEST = 250, 6000, 8000, 36
TRUNC = "...[truncated]"
# MLflow error codes that retrying cannot fix: the record is rejected, not spooled for retry
PERMANENT_ERRORS = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST",
    "BAD_REQUEST",
}
SERIES_KEYS = ("loss", "tokens_total", "tokens_text", "tokens_image", "tokens_video")


def _clip(s: str, limit: int) -> str:
    return s if len(s) <= limit else s[: limit - len(TRUNC)] + TRUNC


# MLflow's rule for metric, param and tag names (mlflow.utils.validation), minus the colon that a Windows
# tracking server refuses: letters, digits, "_", "-", ".", " " and "/"; no empty, "." or ".." path segment
# and no leading "/" or ".." (names double as file paths in the file store).
_BAD_KEY_CHARS = re.compile(r"[^\w.\- /]")


def mlflow_key(name: str) -> str:
    """``name`` as a valid MLflow metric/param/tag name: every other character becomes "_" (so a data
    contract's ``expect_column_values_to_be_in_set(answer_verified)`` becomes ``..._in_set_answer_verified_``),
    empty path segments are dropped, "." / ".." segments become "_" / "__", a leading ".." gets a "_", and a
    name over 250 characters is cut, with a digest of the original appended. Names that every MLflow server
    accepts come back unchanged."""
    parts = [seg for seg in _BAD_KEY_CHARS.sub("_", str(name)).split("/") if seg]
    parts = ["_" * len(seg) if seg in (".", "..") else seg for seg in parts]
    key = "/".join(parts) or "_"
    return _clip_key("_" + key if key.startswith("..") else key, str(name))  # MLflow refuses a leading ".."


def _with_digest(key: str, original: str) -> str:
    """``key`` cut to leave room for "_" + an 8-hex digest of ``original``, plus that digest (valid and
    unique, unlike the "...[truncated]" marker of values, whose brackets MLflow refuses in names)."""
    return key[: MAX_KEY - 9] + "_" + hashlib.sha1(original.encode()).hexdigest()[:8]


def _clip_key(key: str, original: str) -> str:
    return key if len(key) <= MAX_KEY else _with_digest(key, original)


def clean_keys(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every key through ``mlflow_key``. A changed key whose clean name another key of
    ``values`` also has (cleaned or as is) gets an 8-hex digest of its original appended, so nothing is
    silently overwritten and the result does not depend on the keys' order."""
    cleaned = {k: mlflow_key(k) for k in values}
    uses: dict[str, int] = {}
    for c in cleaned.values():
        uses[c] = uses.get(c, 0) + 1
    out: dict[str, Any] = {}
    for k, v in values.items():
        c = cleaned[k]
        if c != k and uses[c] > 1:
            c = _with_digest(c, str(k))
        out[c] = v
    return out


def clean_params(params: dict[str, Any]) -> dict[str, str]:
    """Flattened, redacted, scrubbed string params with valid names, within MLflow's length limits."""
    return {k: _clip(scrub(str(v)), MAX_PARAM) for k, v in clean_keys(flatten(redact(params))).items()}


def clean_tags(tags: dict[str, Any]) -> dict[str, str]:
    return {k: _clip(scrub(str(v)), MAX_TAG) for k, v in clean_keys(redact(tags)).items()}


def q(v: str) -> str:
    return v.replace("\\", "\\\\").replace("'", "\\'")


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def default_tracking_uri(out_dir: Path) -> str:
    """The embedded default: a SQLite store inside the run directory (no server)."""
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(out_dir: Path, tracking_uri: str | None = None) -> str:
    """An explicit URI, else ``$MLFLOW_TRACKING_URI``, else the embedded ``sqlite:///OUT/mlflow.db``."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(Path(out_dir))
