"""The relay between a launched phase's rank 0 and the flow's tracker (``flows/launched_phase.py``): complete
metric lines only, each once, in order; params/tags/artifacts forwarded when new or changed; what was there
before the launch is not forwarded again. Settings are checked before any process starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flows.launch_settings import ENTRY, LaunchError, LaunchSettings
from flows.launched_phase import PhaseFileRelay
from tasks.recipe import recipe_from_dict
from tasks.tracking.local import JsonlTracker, MemoryTracker

ROOT = Path(__file__).resolve().parents[2]


def test_relay_forwards_complete_lines_once_and_new_or_changed_records(tmp_path):
    src = JsonlTracker(tmp_path / "rank0")
    src.log_metrics({"loss": 9.0}, step=1)  # an earlier attempt's record: relayed back then
    src.log_params({"phase": {"name": "a"}})
    sink = MemoryTracker()
    relay = PhaseFileRelay(tmp_path / "rank0", sink)
    relay.pump()
    assert sink.metrics == [] and sink.params == {}

    src.log_metrics({"loss": 2.5, "lr": 1e-3}, step=2)
    with open(tmp_path / "rank0" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 2.')  # rank 0 is mid-write
    src.log_params({"phase": {"name": "a", "seq_len": 64}})
    src.set_tags({"phase": "a"})
    relay.pump()
    assert sink.metrics == [(2, {"loss": 2.5, "lr": 1e-3})]
    assert sink.params == {"phase.seq_len": 64} and sink.tags == {"phase": "a"}

    with open(tmp_path / "rank0" / "metrics.jsonl", "a") as f:
        f.write('25, "grad_norm": "nan"}\n')
    src.log_artifact(tmp_path / "final", name="a-final")
    relay.pump()
    relay.pump()
    assert sink.metrics[1][0] == 3 and sink.metrics[1][1]["loss"] == 2.25
    assert json.dumps(sink.metrics[1][1]["grad_norm"]) == "NaN"  # non-finite values come back as floats
    assert sink.artifacts == [(tmp_path / "final", "a-final")] and relay.steps == 2


def test_launch_settings_are_checked_against_the_recipe(tmp_path):
    recipe = recipe_from_dict(yaml.safe_load((ROOT / "params.yaml").read_text()), "params.yaml")
    LaunchSettings().check(recipe, list(recipe.phases))  # in-process: nothing to check
    assert not LaunchSettings().launched and LaunchSettings(nproc=2).launched
    with pytest.raises(LaunchError, match=r"^field phases\.0\.micro_batches_per_step: .*multiple of 2") as e:
        LaunchSettings(nproc=2).check(recipe, list(recipe.phases))
    assert e.value.in_recipe and e.value.field == "phases.0.micro_batches_per_step"  # the CLI prints it so
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=1\nb slots=1\n")
    with pytest.raises(LaunchError, match="^hostfile: only the deepspeed launcher") as e:
        LaunchSettings(hostfile=str(hostfile)).check(recipe, list(recipe.phases))
    assert not e.value.in_recipe and e.value.field == "hostfile"  # the CLI prints --hostfile
    ds = LaunchSettings(launcher="deepspeed", hostfile=str(hostfile))
    assert ds.launched and ds.world_size() == 2
    with pytest.raises(ValueError, match="multiple of 2"):
        ds.check(recipe, list(recipe.phases))
    cmd = ds.command(["stage", "align"])  # every rank runs rank_main.py with the same args + --worker
    assert cmd[cmd.index("--hostfile") + 1] == str(hostfile) and cmd[-4:] == [
        str(ENTRY),
        "stage",
        "align",
        "--worker",
    ]
    hostfile.write_text("a slots=1\na slots=1\n")  # DeepSpeed's parser refuses it: named as the hostfile
    with pytest.raises(LaunchError, match="^hostfile: .*multiple entries"):
        ds.check(recipe, list(recipe.phases))
