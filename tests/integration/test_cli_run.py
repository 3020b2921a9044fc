"""The README's main job, `kimivl run`, end to end on a shortened tiny recipe: data, every phase, summary."""

import json

import yaml
from typer.testing import CliRunner

from flows.cli import app
from tests.integration.conftest import short_recipe


def test_kimivl_run_writes_summary_with_every_phase(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(short_recipe().model_dump(mode="json", by_alias=True)))
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", "--recipe", str(recipe), "--out", str(out)])
    assert res.exit_code == 0, res.output[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    names = [p["name"] for p in yaml.safe_load(recipe.read_text())["phases"]]
    assert summary["phase_order"] == names and set(summary["phases"]) == set(names)
    for name, p in summary["phases"].items():
        assert p["tokens"]["total"] == sum(p["tokens"][k] for k in ("text", "image", "video")), name
        assert (out / "phases" / name / "final" / "model.safetensors").is_file(), name
        assert p["checkpoint"].endswith(f"phases/{name}/final")
    assert summary["data_tokens"]["total"] > 0
    # a second run finds everything complete and redoes nothing
    res2 = CliRunner().invoke(app, ["run", "--recipe", str(recipe), "--out", str(out)])
    assert res2.exit_code == 0 and "already complete" in res2.output
