"""End to end: credentials in the environment never reach anything a run writes or prints.

``kimivl run`` (data, one training phase, export, MLflow in its embedded SQLite store under OUT) with S3
keys, an HF token and an MLflow password set in the environment; afterwards no byte of any file under OUT
(metrics.jsonl, params/tags JSON, manifests, summary.json, the MLflow database and artifacts, Prefect
logs) and no line of the command's output contains one of those values, while token counts and
tokenizer settings are logged unredacted.
"""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from flows.cli import app
from tests.integration.conftest import short_recipe

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "e2e-aws-secret-5b1f0c9d8e7a",
    "AWS_ACCESS_KEY_ID": "AKIAE2EEXAMPLE7788",
    "AWS_SESSION_TOKEN": "e2e-session-token-3c2b1a",
    "HF_TOKEN": "hf_e2eTokenValue0042",
    "MLFLOW_TRACKING_PASSWORD": "e2e-mlflow-pw-6655",
    "OPENAI_API_KEY": "sk-e2e-openai-998877",
}


def test_a_run_never_writes_or_prints_env_secrets(tmp_path):
    raw = short_recipe().model_dump(mode="json", by_alias=True)
    raw["phases"] = raw["phases"][:1]  # text_pretrain only: the point is what gets written, not training
    raw["eval"] = {"points": []}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    env = {**SECRETS, "COLUMNS": "200", "MLFLOW_TRACKING_URI": None, "KIMIVL_S3_ENDPOINT_URL": None}
    res = CliRunner().invoke(app, ["run", "--recipe", str(recipe), "--out", str(out)], env=env)
    assert res.exit_code == 0, res.output[-3000:]

    leaks = [(name, "output") for name, v in SECRETS.items() if v in res.output]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 20
    for p in files:
        data = p.read_bytes()
        leaks += [(name, str(p.relative_to(out))) for name, v in SECRETS.items() if v.encode() in data]
    assert leaks == []

    summary = json.loads((out / "summary.json").read_text())
    assert summary["phases"]["text_pretrain"]["tokens"]["total"] > 0
    params = json.loads((out / "phases" / "text_pretrain" / "params.json").read_text())
    assert params["phase.token_budget"] == raw["phases"][0]["token_budget"]  # "token" in a key is no secret
