"""The README's main job (for now): the tiny VLM trains with Muon and the loss falls."""

import json

from tasks.train.smoke import SmokeConfig, run_smoke


def test_smoke_run_loss_falls_and_writes_outputs(tmp_path):
    s = run_smoke(SmokeConfig(steps=25, seed=0), out_dir=tmp_path, log=lambda *_: None)
    assert s["loss_last"] < 0.8 * s["loss_first"], (s["loss_first"], s["loss_last"])
    assert s["optimizer"]["muon_params"] > 0
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["steps"] == 25
    assert (tmp_path / "checkpoint" / "model.safetensors").is_file()
