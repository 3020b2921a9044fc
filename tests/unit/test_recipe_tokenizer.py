"""The recipe's tokenizer is checked against the model it trains before any work: the a3b recipe against
an imported checkpoint's tokenizer with the published id layout (special tokens at 163584+, <|media_pad|> =
163605), a freshly trained BPE against the a3b model (ids 0..13: refused, naming both values), and
``data.tokenizer: from_checkpoint`` without a usable checkpoint tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from kimivl_model.config import preset
from tasks.data.text_tokenizer import load_tokenizer
from tasks.recipe import RecipeError, load_recipe, recipe_from_dict
from tests.public_fixture import script

ROOT = Path(__file__).resolve().parents[2]
A3B = yaml.safe_load((ROOT / "configs/a3b.yaml").read_text())
N_BASE = 163584  # the published tokenizer's BPE ranks


@pytest.fixture(scope="module")
def a3b_import(tmp_path_factory) -> Path:
    """An imported a3b checkpoint as the recipe check sees it: its config + its tokenizer (no weights)."""
    d = tmp_path_factory.mktemp("a3b-import")
    (d / "kimivl_config.json").write_text(json.dumps(preset("a3b").to_dict()))
    script().write_tokenizer(d / "tokenizer", script().synthetic_ranks(N_BASE))
    return d


def _a3b(init: Path | None, **data) -> dict:
    raw = json.loads(json.dumps(A3B))
    raw["model"]["init_checkpoint"] = None if init is None else str(init)
    raw["data"].update(data)
    return raw


def test_a3b_recipe_validates_against_the_imported_tokenizer(a3b_import):
    r = recipe_from_dict(_a3b(a3b_import), "a3b")
    assert r.data.tokenizer.source == "checkpoint" and r.data.tokenizer.path == a3b_import / "tokenizer"
    tok = load_tokenizer(r.data.tokenizer.path)
    assert tok.special.media_pad == 163605 == r.model.architecture().media_pad_token_id
    assert tok.special.bos == 163584 and tok.max_used_id() < 163840


def test_a_trained_bpe_for_the_a3b_model_is_refused_naming_both_ids(a3b_import):
    with pytest.raises(
        RecipeError, match=r"<\|media_pad\|> at id 5, but the model config says media_pad_token_id = 163605"
    ):
        recipe_from_dict(_a3b(a3b_import, tokenizer={"vocab_size": 163840}), "a3b")


def test_from_checkpoint_needs_a_checkpoint_with_a_tokenizer(tmp_path):
    with pytest.raises(RecipeError, match="'from_checkpoint' needs model.init_checkpoint"):
        recipe_from_dict(_a3b(None), "a3b")
    (tmp_path / "kimivl_config.json").write_text(json.dumps(preset("a3b").to_dict()))
    with pytest.raises(RecipeError, match="carries no tokenizer .*kimivl model import"):
        recipe_from_dict(_a3b(tmp_path), "a3b")
    # a checkpoint that is not there yet (the shipped a3b.yaml in CI): checked by the commands that need it
    assert load_recipe(ROOT / "configs/a3b.yaml").data.tokenizer.source == "checkpoint"


def test_a_checkpoint_tokenizer_of_another_model_stops_the_cli_with_exit_2(tmp_path, a3b_import):
    """A tiny-preset checkpoint next to the a3b tokenizer: the command exits 2 naming both values."""
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt/kimivl_config.json").write_text(json.dumps(preset("tiny").to_dict()))
    (tmp_path / "ckpt/tokenizer").symlink_to(a3b_import / "tokenizer")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_a3b(tmp_path / "ckpt")))
    res = CliRunner().invoke(
        app, ["data", "tokenizer", "--recipe", str(recipe), "--out", str(tmp_path / "t")]
    )
    assert res.exit_code == 2, res.output
    assert "163605" in res.output and "media_pad_token_id = 5" in res.output
