"""Recipes validate completely before any work: both shipped recipes load; bad ones name the field."""

import copy
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from tasks.recipe import RecipeError, load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parents[2]
TINY = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_shipped_recipes_validate_and_tiny_is_params_yaml():
    tiny = load_recipe(ROOT / "configs" / "tiny.yaml")
    assert tiny == load_recipe(ROOT / "params.yaml")
    a3b = load_recipe(ROOT / "configs" / "a3b.yaml")
    assert a3b.model.preset == "a3b"
    budgets = {p.name: p.token_budget for p in a3b.phases}
    assert budgets["vit"] == 2 * 10**12 and budgets["joint_pretrain"] == 14 * 10**11
    assert budgets["long_context.1"] + budgets["long_context.2"] == 3 * 10**11
    lc = [p for p in a3b.phases if p.stage == "long_context"]
    assert [p.seq_len for p in lc] == [32768, 131072] and lc[0].rope_theta == 800_000.0


def test_tiny_budgets_keep_the_papers_stage_ratios():
    r = load_recipe(ROOT / "params.yaml")
    b = {p.name: p.token_budget for p in r.phases}
    long = b["long_context.1"] + b["long_context.2"]
    paper = {"vit": 2.0, "align": 0.1, "joint_pretrain": 1.4, "cooldown": 0.6}
    unit = b["joint_pretrain"] / 1.4
    for name, t in paper.items():
        assert b[name] == pytest.approx(t * unit, rel=0.01), name
    assert long == pytest.approx(0.3 * unit, rel=0.03)


def _bad(mutate):
    d = copy.deepcopy(TINY)
    mutate(d)
    return d


def _phase(d, name):
    return next(p for p in d["phases"] if p["name"] == name)


BAD = {
    "negative lr": (lambda d: _phase(d, "vit")["lr"].update(peak_lr=-1.0), "phases.1.lr.peak_lr"),
    "unknown stage": (lambda d: _phase(d, "vit").update(stage="warmup"), "phases.1.stage"),
    "zero budget": (lambda d: _phase(d, "align").update(token_budget=0), "phases.2.token_budget"),
    "unknown preset": (lambda d: d["model"].update(preset="huge"), "model"),
    "unknown dataset": (
        lambda d: _phase(d, "cooldown")["sources"].append({"name": "nope", "weight": 1}),
        "phases.4.sources",
    ),
    "muon with zero 2": (lambda d: d["train"].update(zero_stage=2), "train"),
    "duplicate phase": (lambda d: d["phases"].append(copy.deepcopy(d["phases"][-1])), "phases"),
    "stages out of order": (lambda d: d["phases"].reverse(), "phases"),
    "unknown field": (lambda d: d.update(bogus=1), "bogus"),
    "coca without head": (lambda d: _phase(d, "vit").update(trainable=["vit"]), "phases.1"),
    "schedule group missing": (
        lambda d: _phase(d, "joint_pretrain")["share_schedule"].update(group="audio"),
        "phases.3",
    ),
    "continue_from later phase": (
        lambda d: _phase(d, "joint_pretrain")["lr"].update(continue_from="sft.1"),
        "continue_from",
    ),
    "budget below seq_len": (lambda d: _phase(d, "sft.2").update(token_budget=100), "phases.8"),
    "negative weight": (
        lambda d: _phase(d, "vit")["sources"][0].update(weight=-1),
        "phases.1.sources.0.weight",
    ),
    "min_lr above peak": (lambda d: _phase(d, "vit")["lr"].update(min_lr=1.0), "phases.1.lr"),
    "expert_parallel without sharded gradients": (
        lambda d: d["train"].update(expert_parallel=2, shard_gradients=False),
        "expert_parallel",
    ),
    "expert_parallel not dividing the experts": (
        lambda d: d["train"].update(expert_parallel=3, shard_gradients=True),
        "train.expert_parallel: 3 does not divide the model's 8 routed experts",
    ),
    "sequence_parallel not dividing the heads": (
        lambda d: _phase(d, "sft.2").update(sequence_parallel=3),
        "phases.8.sequence_parallel: 3 does not divide the LM's 4 attention heads",
    ),
    "sequence_parallel on the coca phase": (
        lambda d: _phase(d, "vit").update(sequence_parallel=2),
        "phases.1",
    ),
    "sequence_parallel zero": (lambda d: _phase(d, "sft.2").update(sequence_parallel=0), "phases.8"),
}


def test_world_splits_for_sequence_parallel_phases():
    """``batch_split_error`` (checked before a launch) and the engine's own check agree on what a world with
    sequence-parallel phases must satisfy: SP divides the world, the data-parallel degree the global batch."""
    from tasks.train.engine_config import EngineConfig
    from tasks.train.launch import batch_split_error

    raw = yaml.safe_load(Path("configs/tiny.yaml").read_text())
    _phase(raw, "sft.2").update(sequence_parallel=2, micro_batches_per_step=2)
    recipe = recipe_from_dict(raw, "sp.yaml")
    sft2 = recipe.phase("sft.2")
    assert batch_split_error(recipe, [sft2], 2) is None  # one data-parallel group of 2 SP ranks
    assert batch_split_error(recipe, [sft2], 4) is None  # 2 groups, one micro-batch each
    assert "sequence_parallel" in batch_split_error(recipe, [sft2], 3)
    err = batch_split_error(recipe, [sft2], 8)  # 4 groups for 2 micro-batches
    assert "micro_batches_per_step" in err and "4 data-parallel groups" in err
    cfg = EngineConfig(micro_batches_per_step=2, sequence_parallel=2)
    assert [cfg.check_world_size(w) for w in (2, 4)] == [2, 1]  # micro-batches per rank (each a slice)
    for w in (3, 8):
        with pytest.raises(ValueError):
            cfg.check_world_size(w)


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_recipes_name_the_field(case):
    mutate, field = BAD[case]
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(_bad(mutate), "bad.yaml")
    assert "bad.yaml: field" in str(e.value) and field in str(e.value), str(e.value)


def test_cli_bad_recipe_exits_2_before_any_work(tmp_path):
    d = _bad(lambda d: _phase(d, "vit")["lr"].update(peak_lr=-1.0))
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d))
    for args in (
        ["train", "--recipe", str(p), "--out", str(tmp_path / "o")],
        ["data", "all", "--recipe", str(p), "--out", str(tmp_path / "d")],
    ):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, res.output
        assert "peak_lr" in res.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


def test_token_mix_ranks_groups_by_share_and_shows_in_the_tokens_table():
    from flows.prefect_common import tokens_table
    from tasks.train.stages import token_mix

    assert token_mix({"long": 1024, "replay": 3072}) == "replay 75% · long 25%"
    assert token_mix({"b": 1, "a": 1}) == "a 50% · b 50%"  # ties by name
    assert token_mix(None) == token_mix({}) == token_mix({"x": 0}) == "-"
    row = {"phase": "long_context.1", "tokens": {"text": 4096, "total": 4096}, "steps": 2, "final_loss": 2.0}
    table = tokens_table([{**row, "tokens_by_group": {"long": 1024, "replay": 3072}}, row])
    lines = table.splitlines()
    assert "mix (tokens)" in lines[0] and lines[0].count("|") == lines[1].count("|") == lines[-1].count("|")
    assert "| replay 75% · long 25% |" in lines[2] and "| - |" in lines[3]
