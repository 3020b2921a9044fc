"""Secrets never go through a tracker: ``redact`` masks values whose key looks like a credential
(``is_secret_key``), ``scrub`` masks ``user:password@`` in URIs and the values of credential-like environment
variables (``AWS_SECRET_ACCESS_KEY``, ``HF_TOKEN``...) wherever they appear in a param or tag. Every
tracker (JSONL, memory, MLflow) applies these two functions and no other rule.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

# A key is a credential when it contains one of these words anywhere (``AWS_SECRET_ACCESS_KEY``,
# ``db.password``, ``openai_api_key``), or when its LAST word is "token" (``token``, ``hf_token``,
# ``HF_TOKEN``, ``AWS_SESSION_TOKEN``, ``apiToken``). "token" elsewhere is a count or a setting, not a
# secret: ``token_budget``, ``tokenizer.vocab_size``, ``max_tokens_per_doc``, ``tokens_total`` are logged.
# Names of a tokenizer's special tokens (``eos_token``, ``pad_token``) are settings too.
_SECRET_WORDS = re.compile(
    r"secret|password|passwd|credential|authorization|api[_-]?key|access[_-]?key|private[_-]?key", re.I
)
_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")
_SPECIAL_TOKEN_NAMES = frozenset(
    {"bos", "eos", "pad", "unk", "sep", "cls", "mask", "image", "video", "media", "im_start", "im_end"}
)


def is_secret_key(key: Any) -> bool:
    """Whether a param/tag/env-variable name looks like it holds a credential (see the rule above)."""
    text = str(key)
    if _SECRET_WORDS.search(text):
        return True
    words = [w.lower() for w in _WORD_SPLIT.split(text) if w]
    return bool(words) and words[-1] == "token" and "_".join(words[:-1]) not in _SPECIAL_TOKEN_NAMES


def redact(d: dict[str, Any]) -> dict[str, Any]:
    """Copy of ``d`` with the values of credential-like keys (``is_secret_key``) replaced by ``"***"``,
    recursively through nested dicts and lists."""
    return {k: "***" if is_secret_key(k) else _redact_value(v) for k, v in d.items()}


def _redact_value(v: Any) -> Any:
    if isinstance(v, dict):
        return redact(v)
    if isinstance(v, (list, tuple)):
        return type(v)(_redact_value(x) for x in v)
    return v


_USERINFO = re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+@")


def _secret_env_values() -> list[str]:
    vals = {v for k, v in os.environ.items() if len(v) >= 6 and is_secret_key(k)}
    return sorted(vals, key=len, reverse=True)


def scrub(value: str) -> str:
    """``value`` with ``user:password@`` in URIs and values of credential-like env variables masked."""
    s = _USERINFO.sub("***@", value)
    for secret in _secret_env_values():
        s = s.replace(secret, "***")
    return s


def clean(d: dict[str, Any]) -> dict[str, Any]:
    """``redact`` + ``scrub`` of every string value: what a tracker may write."""
    return {k: scrub(v) if isinstance(v, str) else v for k, v in flatten(redact(d)).items()}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (lists are JSON-encoded)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v, default=str)
        else:
            out[key] = v
    return out
