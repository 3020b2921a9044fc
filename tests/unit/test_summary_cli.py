"""Meta-device parameter counts (a3b vs REFERENCE.md) and the `kimivl model` CLI."""

import json

import pytest
from typer.testing import CliRunner

from flows.cli import app
from kimivl_model.config import preset
from kimivl_model.summary import A3B_REFERENCE, model_summary

runner = CliRunner()


def test_a3b_counts_match_reference_within_half_percent():
    s = model_summary(preset("a3b"))
    for key, ref in A3B_REFERENCE.items():
        assert abs(s[key] / ref - 1) < 0.005, (key, s[key], ref)
    # Kimi-VL trains every parameter with Muon except embeddings/head/table/norms/biases
    opt = s["optimizer"]
    assert opt["muon_params"] + opt["adamw_params"] == s["total_params"]
    assert opt["muon_fraction"] > 0.9


def test_small_preset_is_benchmark_sized():
    s = model_summary(preset("small"))
    assert 50e6 <= s["total_params"] <= 100e6, s["total_params"]


def test_cli_summary_json():
    res = runner.invoke(app, ["model", "summary", "--preset", "a3b", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout.strip().splitlines()[-1])
    for k in (
        "total_params",
        "lm_total_params",
        "lm_activated_params_no_embed",
        "vit_params",
        "projector_params",
    ):
        assert isinstance(d[k], int) and d[k] > 0


def test_cli_unknown_preset_exits_2():
    res = runner.invoke(app, ["model", "summary", "--preset", "nope", "--json"])
    assert res.exit_code == 2
    assert "unknown preset 'nope'" in res.output


@pytest.mark.parametrize("preset_name", ["tiny"])
def test_cli_init_export_import_round_trip(tmp_path, preset_name):
    r = runner.invoke(app, ["model", "init", "--preset", preset_name, "--out", str(tmp_path / "n")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["model", "export", str(tmp_path / "n"), "--out", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "hf" / "config.json").is_file()
    r = runner.invoke(app, ["model", "import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")])
    assert r.exit_code == 0, r.output
    from tasks.io.weights import load_native

    _, a = load_native(tmp_path / "n")
    _, b = load_native(tmp_path / "back")
    assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)


def test_cli_import_of_missing_dir_exits_2(tmp_path):
    r = runner.invoke(app, ["model", "import", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2
    assert "config.json" in r.output
