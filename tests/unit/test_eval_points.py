"""The recipe's evaluation points: validation against the phases, per-point configs, the run report."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tasks.eval.points import COMPARISONS, EvalPoint, RecipeEval, pipeline_report, render_pipeline_report
from tasks.recipe import RecipeError, load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parents[2]


def _raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_tiny_recipe_points_cover_the_before_after_claims():
    r = load_recipe(ROOT / "params.yaml")
    stage_of = {p.name: p.stage for p in r.phases}
    evaluated = {stage_of[p.after]: set(p.tasks) for p in r.eval.points}
    for _, metric, before, after, _ in COMPARISONS:
        task = metric.split("/")[0]
        assert task in evaluated[before] and task in evaluated[after], (metric, before, after)


@pytest.mark.parametrize(
    ("points", "field"),
    [
        ([{"after": "nope"}], "eval.points.0.after"),
        ([{"after": "cooldown"}, {"after": "init"}], "eval.points.1.after"),  # no model.init_checkpoint
        ([{"after": "cooldown", "tasks": ["vqa", "bogus"]}], "eval.points.0.tasks"),
        ([{"after": "cooldown", "tasks": []}], "eval.points.0.tasks"),
        ([{"after": "cooldown", "extra": 1}], "eval.points.0.extra"),
    ],
)
def test_bad_points_name_the_field(points, field):
    raw = _raw()
    raw["eval"]["points"] = points
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw, "r.yaml")
    assert field in str(info.value), str(info.value)


def test_point_config_overrides_tasks_only_and_disabled_has_no_points():
    s = RecipeEval.model_validate(_raw()["eval"])
    pt = EvalPoint(after="sft.2", tasks=("math",))
    cfg = s.point_config(pt)
    assert cfg.tasks == ("math",) and cfg.niah == s.config.niah and cfg.sizes == s.config.sizes
    assert [p.after for p in s.points_after("cooldown")] == ["cooldown"]
    off = s.model_copy(update={"enabled": False})
    assert off.points_after("cooldown") == []


def test_report_compares_before_and_after(tmp_path):
    stage_of = {"text_pretrain": "text_pretrain", "cooldown": "cooldown", "long_context.2": "long_context"}
    points = {
        "text_pretrain": {"summary": {"text_loss/loss": 4.0}, "dir": "a"},
        "cooldown": {"summary": {"text_loss/loss": 3.5, "niah_text/recall": 0.25}, "dir": "b"},
        "long_context.2": {"summary": {"niah_text/recall": 0.75}, "dir": "c"},
    }
    md = render_pipeline_report("tiny", points, stage_of)
    assert (
        "| Text retention | `text_loss/loss` | 4.0000 (text_pretrain) | 3.5000 (cooldown) | -0.5000 |" in md
    )
    assert (
        "| Long context (NIAH text) | `niah_text/recall` | 0.2500 (cooldown) | 0.7500 (long_context.2) | +0.5000 |"
        in md
    )
    assert "| Reasoning (math) | `math/accuracy` | – (not evaluated) | – (not evaluated) | – |" in md
    assert "| `niah_text/recall` | – | 0.2500 | 0.7500 |" in md
    out = pipeline_report("tiny", points, stage_of, tmp_path)
    assert (tmp_path / "eval" / "report.md").read_text() == md
    assert out["json"]["points"]["cooldown"]["summary"]["niah_text/recall"] == 0.25
    # the file links its neighbours; the Prefect artifact (shown at another URL) names absolute paths
    assert "[cooldown](cooldown/report.md)" in md
    shown = out["artifact_markdown"]
    assert "](" not in shown and f"`{(tmp_path / 'eval' / 'cooldown' / 'report.md').resolve()}`" in shown
    assert "No evaluation points ran." in render_pipeline_report("tiny", {}, stage_of)
