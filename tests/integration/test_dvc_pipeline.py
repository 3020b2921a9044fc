"""DVC reproduces the pipeline: dvc.yaml is generated from the recipe (and the committed one is current);
`dvc repro` runs data -> phases -> evaluation points; a second repro does nothing; a changed parameter of a
late phase reruns only that phase and what depends on it; `dvc push` then `dvc pull` into an empty cache
restores identical outputs from a real S3 server (SeaweedFS on loopback)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from tasks.dvc_pipeline import render_dvc_yaml, split_recipe
from tasks.recipe import load_recipe, recipe_from_dict
from tests.integration.conftest import ROOT, SMALL_DATA, short_recipe, subprocess_env

PHASES = {"text_pretrain": 1024, "align": 1024}


def test_committed_dvc_yaml_is_current():
    res = CliRunner().invoke(
        app, ["recipe", "dvc", "--recipe", "params.yaml", "--file", str(ROOT / "dvc.yaml"), "--check"]
    )
    assert res.exit_code == 0, f"dvc.yaml is stale: run `kimivl recipe dvc --write`\n{res.output}"
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    recipe = load_recipe(ROOT / "params.yaml")
    for p in recipe.phases:
        assert stages[f"train_{p.name.replace('.', '_')}"]["outs"] == [f"runs/dvc/phases/{p.name}"]
    for pt in recipe.eval.points:
        assert f"eval_{pt.after.replace('.', '_')}" in stages


def test_split_changes_only_the_edited_phase(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    before = {p.name: p.read_bytes() for p in split_recipe(recipe_from_dict(raw), tmp_path / "a")}
    raw["phases"][-2]["token_budget"] += 1024  # sft.2
    after = {p.name: p.read_bytes() for p in split_recipe(recipe_from_dict(raw), tmp_path / "b")}
    assert sorted(n for n in before if before[n] != after[n]) == [f"phase-{raw['phases'][-2]['name']}.json"]
    raw["eval"]["points"][0]["tasks"] = ["text_loss"]
    again = {p.name: p.read_bytes() for p in split_recipe(recipe_from_dict(raw), tmp_path / "b")}
    assert sorted(n for n in after if after[n] != again[n]) == [
        f"eval-{raw['eval']['points'][0]['after']}.json"
    ]


def _recipe(path: Path, align_budget: int) -> None:
    raw = short_recipe().model_dump(mode="json", by_alias=True)
    raw["data"] = SMALL_DATA.model_dump(mode="json", by_alias=True)
    raw["data"]["synth"].update({"caption": 24, "text": 24, "sft": 8, "cot": 8, "long_doc": 1})
    raw["phases"] = [p for p in raw["phases"] if p["name"] in PHASES]
    for p in raw["phases"]:
        p["token_budget"] = PHASES[p["name"]]
    raw["phases"][1]["token_budget"] = align_budget
    raw["eval"]["points"] = [{"after": "align", "tasks": ["text_loss"]}]
    raw["eval"]["config"]["sizes"]["text_loss"] = 4
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".gitignore" not in p.name
    }


@pytest.mark.integration
def test_dvc_repro_selective_rerun_and_s3_round_trip(tmp_path, s3_server):
    work = tmp_path / "repo"
    work.mkdir()
    for d in ("tasks", "data_contracts", "kimivl_model"):
        shutil.copytree(ROOT / d, work / d, ignore=shutil.ignore_patterns("__pycache__"))
    _recipe(work / "params.yaml", 1024)
    (work / "dvc.yaml").write_text(render_dvc_yaml(load_recipe(work / "params.yaml")))
    env = {
        **subprocess_env(),
        **s3_server.env(),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)

    def run(*a: str, timeout: float = 900) -> subprocess.CompletedProcess:
        p = subprocess.run(a, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, f"{a}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        return p

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    first = run("dvc", "repro")
    ran = set(re.findall(r"Running stage '([^']+)'", first.stdout))
    assert {
        "data_sources",
        "data_tokenize",
        "recipe_split",
        "train_text_pretrain",
        "train_align",
        "eval_align",
    } <= ran
    final = work / "runs/dvc/phases/align/final"
    assert (final / "model.safetensors").is_file() and (work / "dvc.lock").is_file()
    metrics = json.loads((work / "runs/dvc/metrics/eval-align.json").read_text())
    assert metrics["text_loss/loss"] > 0
    shown = json.loads(run("dvc", "metrics", "show", "--json").stdout)
    assert "runs/dvc/metrics/eval-align.json" in json.dumps(shown)

    second = run("dvc", "repro")
    assert "Data and pipelines are up to date" in second.stdout, second.stdout
    assert "Running stage" not in second.stdout

    # a later phase's budget changes: only that phase and its evaluation rerun (plus the cheap split)
    weights_before = hashlib.sha256(
        (work / "runs/dvc/phases/text_pretrain/final/model.safetensors").read_bytes()
    ).hexdigest()
    _recipe(work / "params.yaml", 1536)
    third = run("dvc", "repro")
    ran = set(re.findall(r"Running stage '([^']+)'", third.stdout))
    assert ran == {"recipe_split", "train_align", "eval_align"}, third.stdout
    assert "train_text_pretrain" not in ran and not any(s.startswith("data_") for s in ran)
    assert (
        hashlib.sha256(
            (work / "runs/dvc/phases/text_pretrain/final/model.safetensors").read_bytes()
        ).hexdigest()
        == weights_before
    )
    assert json.loads(run("dvc", "status", "--json").stdout or "{}") == {}

    # push to S3, then pull into an empty cache and workspace: identical bytes
    want = {d: _tree_hashes(work / d) for d in ("data/tokenized", "runs/dvc/phases", "runs/dvc/eval")}
    remote = f"s3://kimivl-dvc/pipeline-{os.urandom(4).hex()}"
    res = CliRunner().invoke(
        app, ["dvc-remote", remote, "--endpoint-url", s3_server.endpoint_url, "--repo", str(work)]
    )
    assert res.exit_code == 0, res.output
    assert s3_server.secret_key not in (work / ".dvc" / "config.local").read_text()
    run("dvc", "push")
    shutil.rmtree(work / ".dvc" / "cache")
    for d in ("data", "runs/dvc/phases", "runs/dvc/eval"):
        shutil.rmtree(work / d)
    run("dvc", "pull")
    assert {d: _tree_hashes(work / d) for d in want} == want
    assert json.loads(run("dvc", "status", "--json").stdout or "{}") == {}
