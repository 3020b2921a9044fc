"""Secrets never reach a tracker, and settings that merely mention "token" are not hidden.

One rule (``tasks.tracking.secrets.is_secret_key``) decides what a credential-like key is, for the JSONL/memory
trackers and for MLflow (``tasks.tracking.mlflow_names``); ``scrub`` masks ``user:password@`` in URIs and the
values of credential-like environment variables wherever they appear. The end-to-end check (a whole
``kimivl run`` with credentials in the environment) is
``tests/integration/test_reliability_secrets_run.py``; MLflow's own store is checked in
``tests/integration/test_mlflow_tracking.py::test_secrets_never_reach_the_store``.
"""

from __future__ import annotations

import json

import pytest

from tasks.tracking import mlflow_names, secrets
from tasks.tracking.local import JsonlTracker, MemoryTracker
from tasks.tracking.secrets import is_secret_key, redact, scrub

SECRET_KEYS = [
    "token", "TOKEN", "hf_token", "HF_TOKEN", "api_token", "access_token", "AWS_SESSION_TOKEN", "apiToken",
    "auth.token", "password", "db_password", "MLFLOW_TRACKING_PASSWORD", "passwd", "secret", "client_secret",
    "AWS_SECRET_ACCESS_KEY", "aws_access_key_id", "api_key", "OPENAI_API_KEY", "apiKey", "private_key",
    "credentials", "Authorization",
]  # fmt: skip
SETTINGS = [
    "token_budget", "tokenizer", "tokenizer.vocab_size", "max_tokens_per_doc", "tokens", "tokens_total",
    "tokens_text", "num_tokens", "max_new_tokens", "micro_batch_tokens", "needle_tokens", "media_pad_token_id",
    "eos_token", "pad_token", "tokenize", "seq_len", "peak_lr", "keep_checkpoints", "name",
]  # fmt: skip


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_credential_keys_are_secret(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", SETTINGS)
def test_token_counts_and_tokenizer_settings_are_not_secret(key):
    assert not is_secret_key(key)


def test_mlflow_uses_the_same_rule():
    assert mlflow_names.redact is secrets.redact
    assert mlflow_names.scrub is secrets.scrub


def test_redact_is_recursive_through_dicts_and_lists():
    params = {
        "data": {"tokenizer": {"vocab_size": 4096}, "tokenize": {"max_tokens_per_doc": 8192}},
        "phases": [{"name": "vit", "token_budget": 80000, "hf_token": "hf_abc"}],
        "s3": {"aws_secret_access_key": "xyz", "endpoint": "http://localhost:9000"},
    }
    out = redact(params)
    assert out["data"] == params["data"]
    assert out["phases"] == [{"name": "vit", "token_budget": 80000, "hf_token": "***"}]
    assert out["s3"] == {"aws_secret_access_key": "***", "endpoint": "http://localhost:9000"}
    assert params["phases"][0]["hf_token"] == "hf_abc"  # the input is not modified


ENV = {
    "AWS_SECRET_ACCESS_KEY": "aws-secret-0a9b8c7d6e",
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE12345",
    "HF_TOKEN": "hf_token_value_5f4e3d",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-pw-778899",
}


@pytest.fixture
def secret_env(monkeypatch) -> dict[str, str]:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    return ENV


def _leaked(text: str) -> list[str]:
    return [v for v in [*ENV.values(), "hunter2-pw", "sk-live-123456"] if v in text]


def test_scrub_masks_env_secrets_and_uri_passwords(secret_env):
    s = scrub(
        f"s3://b/k?sig={ENV['AWS_SECRET_ACCESS_KEY']} https://bob:hunter2-pw@mlflow.local/ {ENV['HF_TOKEN']}"
    )
    assert _leaked(s) == [] and "https://***@mlflow.local/" in s


@pytest.mark.parametrize("kind", ["jsonl", "memory"])
def test_tracker_files_hold_no_secret_but_keep_token_settings(secret_env, tmp_path, kind):
    tr = JsonlTracker(tmp_path / "t") if kind == "jsonl" else MemoryTracker()
    tr.log_params(
        {
            "api_key": "sk-live-123456",
            "db": {"password": "hunter2-pw", "host": "db.local"},
            "endpoint": "https://bob:hunter2-pw@s3.local/bucket",
            "note": f"launched with {ENV['HF_TOKEN']} and {ENV['AWS_SECRET_ACCESS_KEY']}",
            "phase": {"token_budget": 40000, "seq_len": 512},
            "data": {"tokenizer": {"vocab_size": 4096}, "tokenize": {"max_tokens_per_doc": 8192}},
            "env": dict(ENV),  # somebody logging the environment: every value is masked
        }
    )
    tr.set_tags(
        {"HF_TOKEN": ENV["HF_TOKEN"], "uri": f"s3://b/x?key={ENV['AWS_ACCESS_KEY_ID']}", "stage": "vit"}
    )
    tr.log_metrics({"loss": 1.5, "tokens_total": 1024}, step=1)
    if kind == "jsonl":
        text = "".join(p.read_text() for p in sorted((tmp_path / "t").iterdir()))
        params = json.loads((tmp_path / "t" / "params.json").read_text())
        tags = json.loads((tmp_path / "t" / "tags.json").read_text())
    else:
        params, tags = tr.params, tr.tags
        text = json.dumps([params, tags, tr.metrics])
    assert _leaked(text) == [], _leaked(text)
    assert params["phase.token_budget"] == 40000 and params["phase.seq_len"] == 512
    assert params["data.tokenizer.vocab_size"] == 4096 and params["data.tokenize.max_tokens_per_doc"] == 8192
    assert params["api_key"] == "***" and params["db.password"] == "***" and params["db.host"] == "db.local"
    assert params["endpoint"] == "https://***@s3.local/bucket" and tags["stage"] == "vit"
    assert tags["HF_TOKEN"] == "***"
