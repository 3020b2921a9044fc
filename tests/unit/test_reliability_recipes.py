"""Bad recipes stop every training command before any work: exit code 2, a message naming the recipe file and
the field, and no output directory created.

Each invalid recipe below is run through ``kimivl run``, ``kimivl train`` and ``kimivl stage`` (typer's
CliRunner on ``flows.cli.app``). ``tests/unit/test_recipe.py`` checks the same kind of errors at the
``recipe_from_dict`` level; here the point is the command's behaviour.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app

ROOT = Path(__file__).resolve().parents[2]
GOOD = yaml.safe_load((ROOT / "params.yaml").read_text())
NAMES = [p["name"] for p in GOOD["phases"]]


def i(name: str) -> int:
    return NAMES.index(name)


def ph(d: dict, name: str) -> dict:
    return d["phases"][i(name)]


def _all_weights(d, name, w):
    for s in ph(d, name)["sources"]:
        s["weight"] = w


def _group_weights(d, name, group, w):
    for s in ph(d, name)["sources"]:
        if s["group"] == group:
            s["weight"] = w


def _sources(d, path, fmt="jsonl"):
    d["data"]["sources"] = [{"name": "mine", "path": str(path), "ingest": {"format": fmt}}]


VIT, ALIGN, JOINT, LC1, SFT2 = i("vit"), i("align"), i("joint_pretrain"), i("long_context.1"), i("sft.2")

# case -> (mutation of a copy of params.yaml, pieces the error must contain besides the file name)
BAD = {
    "negative lr": (lambda d: ph(d, "vit")["lr"].update(peak_lr=-1e-3), [f"phases.{VIT}.lr.peak_lr"]),
    "nan lr": (lambda d: ph(d, "vit")["lr"].update(peak_lr=math.nan), [f"phases.{VIT}.lr.peak_lr", "finite"]),
    "min_lr above peak": (lambda d: ph(d, "vit")["lr"].update(min_lr=1.0), [f"phases.{VIT}.lr", "min_lr"]),
    "unknown stage": (lambda d: ph(d, "vit").update(stage="warmup"), [f"phases.{VIT}.stage"]),
    "zero budget": (lambda d: ph(d, "align").update(token_budget=0), [f"phases.{ALIGN}.token_budget"]),
    "budget not a number": (
        lambda d: ph(d, "align").update(token_budget="lots"),
        [f"phases.{ALIGN}.token_budget", "integer"],
    ),
    "budget below seq_len": (
        lambda d: ph(d, "sft.2").update(token_budget=100),
        [f"phases.{SFT2}", "token_budget", "seq_len"],
    ),
    "seq_len below the packer minimum": (
        lambda d: ph(d, "align").update(seq_len=4),
        [f"phases.{ALIGN}.seq_len"],
    ),
    "seq_len beyond any context": (
        lambda d: ph(d, "sft.2").update(seq_len=10**9, token_budget=10**9),
        [f"phases.{SFT2}.seq_len"],
    ),
    "unknown preset": (lambda d: d["model"].update(preset="huge"), ["model", "preset", "huge"]),
    "token weights on the coca phase": (
        lambda d: ph(d, "vit").update(weight_unit="tokens"),
        [f"phases.{VIT}", "weight_unit", "coca"],
    ),
    "unknown weight unit": (
        lambda d: ph(d, "long_context.1").update(weight_unit="bytes"),
        [f"phases.{LC1}.weight_unit", "documents", "tokens"],
    ),
    "unknown attention backend": (lambda d: d["model"].update(attn_backend="magic"), ["model.attn_backend"]),
    "unknown optimizer": (lambda d: d["train"].update(optimizer="sgd"), ["train.optimizer"]),
    "zero_stage 3 with muon": (lambda d: d["train"].update(zero_stage=3), ["train.zero_stage"]),
    "muon with zero_stage 1": (lambda d: d["train"].update(zero_stage=1), ["train", "zero_stage", "muon"]),
    "typo in a train field": (
        lambda d: d["train"].update(checkpoint_evry_steps=5),
        ["train.checkpoint_evry_steps"],
    ),
    "unknown top-level field": (lambda d: d.update(bogus=1), ["bogus"]),
    "recipe without a name": (lambda d: d.pop("name"), ["field name"]),
    "negative mixture weight": (
        lambda d: ph(d, "vit")["sources"][0].update(weight=-1),
        [f"phases.{VIT}.sources.0.weight"],
    ),
    "infinite mixture weight": (
        lambda d: ph(d, "vit")["sources"][0].update(weight=math.inf),
        [f"phases.{VIT}.sources.0.weight", "finite"],
    ),
    "every mixture weight zero": (lambda d: _all_weights(d, "vit", 0), [f"phases.{VIT}", "sources", "> 0"]),
    "dataset listed twice in a mixture": (
        lambda d: ph(d, "vit")["sources"].append(dict(ph(d, "vit")["sources"][0])),
        [f"phases.{VIT}", "sources", "twice"],
    ),
    "unknown dataset in a mixture": (
        lambda d: ph(d, "cooldown")["sources"].append({"name": "nope", "weight": 1}),
        [f"phases.{i('cooldown')}.sources", "nope"],
    ),
    "scheduled group has no weight": (
        lambda d: _group_weights(d, "joint_pretrain", "multimodal", 0),
        [f"phases.{JOINT}", "share_schedule", "multimodal"],
    ),
    "scheduled group unknown": (
        lambda d: ph(d, "joint_pretrain")["share_schedule"].update(group="audio"),
        [f"phases.{JOINT}", "share_schedule", "audio"],
    ),
    "share above 1": (
        lambda d: ph(d, "joint_pretrain")["share_schedule"].update(end=1.5),
        [f"phases.{JOINT}.share_schedule.end"],
    ),
    "phase name that is a path": (lambda d: ph(d, "sft.2").update(name="../sft"), [f"phases.{SFT2}.name"]),
    "recipe name with a colon": (lambda d: d.update(name="tiny:v2"), ["name", "pattern"]),
    "duplicate phase names": (lambda d: d["phases"].append(copy.deepcopy(d["phases"][-1])), ["phases", "duplicate"]),
    "stages out of order": (lambda d: d["phases"].reverse(), ["phases", "order"]),
    "first phase continues a schedule": (
        lambda d: d["phases"][0]["lr"].update(mode="continue", peak_lr=None, min_lr=None, warmup_steps=0),
        ["phases.0.lr.mode"],
    ),
    "continue_from a later phase": (
        lambda d: ph(d, "joint_pretrain")["lr"].update(continue_from="sft.1"),
        [f"phases.{JOINT}.lr.continue_from", "sft.1"],
    ),
    "coca objective without the coca head": (
        lambda d: ph(d, "vit").update(trainable=["vit"]),
        [f"phases.{VIT}", "coca"],
    ),
    "sft stage with the lm objective": (
        lambda d: ph(d, "sft.2").update(objective="lm"),
        [f"phases.{SFT2}.objective"],
    ),
    "nothing trainable": (lambda d: ph(d, "align").update(trainable=[]), [f"phases.{ALIGN}.trainable"]),
    "progressive resolution not ending at 1": (
        lambda d: ph(d, "vit")["progressive_resolution"][-1].update(until_fraction=0.9),
        [f"phases.{VIT}", "progressive_resolution"],
    ),
    "infinite rope theta": (
        lambda d: ph(d, "long_context.1").update(rope_theta=math.inf),
        [f"phases.{LC1}.rope_theta"],
    ),
    "dedup threshold above 1": (lambda d: d["data"]["dedup"].update(threshold=1.5), ["data.dedup.threshold"]),
    "vocabulary too small": (lambda d: d["data"]["tokenizer"].update(vocab_size=10), ["data.tokenizer.vocab_size"]),
    "user data source missing": (
        lambda d: _sources(d, "/nonexistent/kimivl/data.jsonl"),
        ["data.sources.0", "path", "/nonexistent/kimivl/data.jsonl"],
    ),
    "relative user data path": (  # resolved from the working directory, not the recipe's folder: say so
        lambda d: _sources(d, "no/such/mine.jsonl"),
        ["data.sources.0", "no/such/mine.jsonl", "relative paths are resolved from the working directory"],
    ),
    "llava source is a directory": (
        lambda d: _sources(d, ROOT / "configs", "llava"),
        ["data.sources.0", "path", "JSON file"],
    ),
    "init checkpoint that does not exist": (
        lambda d: d["model"].update(init_checkpoint="/nonexistent/kimivl/ckpt"),
        ["model.init_checkpoint", "/nonexistent/kimivl/ckpt"],
    ),
    "relative init checkpoint that does not exist": (
        lambda d: d["model"].update(init_checkpoint="no/such/ckpt"),
        ["model.init_checkpoint", "no/such/ckpt", "relative paths are resolved from the working directory"],
    ),
}  # fmt: skip

COMMANDS = {
    "run": lambda recipe, out: ["run", "--recipe", str(recipe), "--out", str(out)],
    "train": lambda recipe, out: ["train", "--recipe", str(recipe), "--data", str(out / "data"), "--out", str(out)],
    "stage": lambda recipe, out: ["stage", "vit", "--recipe", str(recipe), "--data", str(out / "d"), "--out", str(out)],
}  # fmt: skip


def invoke(args: list[str]):
    # a wide console: rich would otherwise wrap the message at 80 columns in the middle of a field path
    res = CliRunner().invoke(app, args, env={"COLUMNS": "500", "NO_COLOR": "1"})
    return res, " ".join(res.output.split())


def test_there_are_at_least_twenty_cases_and_the_good_recipe_passes(tmp_path):
    from tasks.recipe import recipe_from_dict

    assert len(BAD) >= 20
    recipe_from_dict(copy.deepcopy(GOOD), "params.yaml")


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("case", list(BAD))
def test_bad_recipe_exits_2_naming_the_field_before_any_work(tmp_path, case, command):
    mutate, pieces = BAD[case]
    d = copy.deepcopy(GOOD)
    mutate(d)
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(d))
    out = tmp_path / "out"
    res, text = invoke(COMMANDS[command](recipe, out))
    assert res.exit_code == 2, (res.exit_code, text[-2000:], res.exception)
    assert f"{recipe}: " in text and "error:" in text, text
    for piece in pieces:
        assert piece in text, (piece, text)
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    assert "Traceback" not in text


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "recipe file not found"),
        ("name: [unclosed\n", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping at the top level"),
        ("", "expected a mapping at the top level"),
    ],
    ids=["missing", "invalid-yaml", "a-list", "empty"],
)
def test_unreadable_recipe_file_exits_2(tmp_path, command, content, expected):
    recipe = tmp_path / "r.yaml"
    if content is not None:
        recipe.write_text(content)
    out = tmp_path / "out"
    res, text = invoke(COMMANDS[command](recipe, out))
    assert res.exit_code == 2, text
    assert re.search(re.escape(str(recipe)) + r": .*" + re.escape(expected), text), text
    assert not out.exists()


def test_unknown_stage_or_phase_name_exits_2(tmp_path):
    recipe = tmp_path / "ok.yaml"
    recipe.write_text(yaml.safe_dump(GOOD))
    (tmp_path / "data" / "tokenized").mkdir(parents=True)
    res, text = invoke(
        [
            "stage",
            "warmup",
            "--recipe",
            str(recipe),
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert res.exit_code == 2 and "unknown stage 'warmup'" in text, text
    assert not (tmp_path / "o").exists()
