"""The README's main job, `kimivl run`, end to end on a shortened tiny recipe: data, every phase, summary.

It runs as a user runs it, in its own process with no Prefect server configured (a fresh PREFECT_HOME):
Prefect's local mode with the temporary server that `kimivl run` starts first (flows/local_api.py), which
must be gone once the command has exited. (In-process, it would export that server's URL into this test
process before Prefect is imported here, and the session's Prefect test harness would then talk to two
servers.)
"""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.integration.conftest import short_recipe, subprocess_env

ROOT = Path(__file__).resolve().parents[2]


def _kimivl_run(recipe: Path, out: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**subprocess_env(), "PREFECT_HOME": str(home), "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "flows.cli", "run", "--recipe", str(recipe), "--out", str(out)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


def test_kimivl_run_writes_summary_with_every_phase(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(short_recipe().model_dump(mode="json", by_alias=True)))
    out = tmp_path / "run"
    res = _kimivl_run(recipe, out, tmp_path / "prefect")
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    names = [p["name"] for p in yaml.safe_load(recipe.read_text())["phases"]]
    assert summary["phase_order"] == names and set(summary["phases"]) == set(names)
    for name, p in summary["phases"].items():
        assert p["tokens"]["total"] == sum(p["tokens"][k] for k in ("text", "image", "video")), name
        assert (out / "phases" / name / "final" / "model.safetensors").is_file(), name
        assert p["checkpoint"].endswith(f"phases/{name}/final")
    assert summary["data_tokens"]["total"] > 0
    # every MLflow record was delivered: none refused (e.g. a metric name MLflow does not accept), none spooled
    assert summary["mlflow"]["rejected"] == 0 and summary["mlflow"]["undelivered"] == 0, summary["mlflow"]
    # a second run finds everything complete and redoes nothing
    res2 = _kimivl_run(recipe, out, tmp_path / "prefect")
    assert res2.returncode == 0 and "already complete" in res2.stdout + res2.stderr, res2.stdout[-2000:]
    # the temporary Prefect servers of both runs stopped with them: no process left with their PREFECT_HOME
    assert _with_env(f"PREFECT_HOME={tmp_path / 'prefect'}") == []


def _with_env(entry: str) -> list[int]:
    pids = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if entry.encode() in env.read_bytes().split(b"\0"):
                pids.append(int(env.parent.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids
