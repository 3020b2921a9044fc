"""Crash anywhere: `kimivl run` (data -> phases -> evaluation -> export, Prefect + MLflow) is killed with
SIGKILL at >= 20 points spread over every step and stage, and resumed each time; then everything must equal
an uninterrupted run: bit-identical weights and dataset manifests, the same tokens per phase (none counted
twice), one MLflow parent run and one run per phase (resumed, not duplicated), and after every kill no
partial dataset or checkpoint is marked complete.

The kill points are the ``tasks.io.faults.crash_point`` calls (between checkpoint files, before manifests,
markers and renames, after optimizer steps, before MLflow deliveries); the uninterrupted run counts them,
and each process of the chain is killed at a random point of its own about total/(N+1) points in, so the
chain crosses the whole pipeline. ``KIMIVL_CRASH_POINTS`` (default 20)
sets how many kills; ``KIMIVL_SLOW=1`` raises the default to 60. ``KIMIVL_CRASH_SEED`` picks them.
The chain runs once per checkpoint format (``train.checkpoint_format``: gathered, sharded), half the kills
each.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.io.manifest import MANIFEST_NAME, ManifestError, read_manifest, verify_files
from tasks.train.checkpoint import CheckpointError, verify_checksums
from tests.integration.conftest import ROOT, SMALL_DATA, short_recipe

PHASES = {"text_pretrain": 2048, "vit": 2048, "align": 1024}
N_KILLS = int(os.environ.get("KIMIVL_CRASH_POINTS", "60" if os.environ.get("KIMIVL_SLOW") else "20"))


def _recipe(path: Path, fmt: str) -> None:
    raw = short_recipe(checkpoint_every_steps=2, checkpoint_format=fmt).model_dump(mode="json", by_alias=True)
    raw["data"] = SMALL_DATA.model_dump(mode="json", by_alias=True)
    raw["data"]["synth"].update({"caption": 24, "text": 24, "sft": 8, "cot": 8, "long_doc": 1, "video_qa": 6})
    raw["phases"] = [p for p in raw["phases"] if p["name"] in PHASES]
    for p in raw["phases"]:
        p["token_budget"] = PHASES[p["name"]]
    raw["eval"]["points"] = [{"after": "align", "tasks": ["text_loss"]}]
    raw["eval"]["config"]["sizes"]["text_loss"] = 4
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def _checkpoint_identity(final: Path) -> dict:
    """A final checkpoint's content hash, files, parents (by content) and config: all location-free."""
    m = read_manifest(final)
    return {
        "content_hash": m.content_hash,
        "files": {f["path"]: f["sha256"] for f in m.files},
        "parents": sorted(p.content_hash for p in m.parents),
        "config_hash": m.config_hash,
    }


def _run(recipe: Path, out: Path, env: dict[str, str], **crash: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flows.cli", "run", "--recipe", str(recipe), "--out", str(out)]
    return subprocess.run(cmd, cwd=ROOT, env={**env, **crash}, capture_output=True, text=True, timeout=600)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _assert_nothing_partial_marked_complete(out: Path) -> None:
    """Every output with a manifest verifies; every checkpoint with checksums verifies."""
    for m in out.rglob(MANIFEST_NAME):
        if any(part.endswith(".staging") or part.startswith(".") for part in m.relative_to(out).parts[:-1]):
            continue  # staging directories are never read as outputs
        try:
            verify_files(m.parent)
        except ManifestError as e:
            raise AssertionError(f"a partial output is marked complete: {e}") from None
    for c in out.glob("phases/*/checkpoints/step-*/checksums.json"):  # either format
        try:
            verify_checksums(c.parent)
        except CheckpointError as e:
            raise AssertionError(f"a partial checkpoint is marked complete: {e}") from None


def _mlflow_runs(out: Path) -> tuple[list, dict[str, list]]:
    from mlflow import MlflowClient

    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("kimivl")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parents = [r for r in runs if r.data.tags.get("kimivl.role") == "pipeline"]
    phases: dict[str, list] = {}
    for r in runs:
        if r.data.tags.get("kimivl.role") == "phase":
            phases.setdefault(r.data.tags["kimivl.phase"], []).append(r)
    return parents, phases, client


@pytest.mark.integration
@pytest.mark.timeout(3600)  # ~22 fresh `kimivl run` processes: ~6 min on an idle 2-core box, 15+ under load
@pytest.mark.parametrize("fmt", ["gathered", "sharded"])
def test_sigkill_anywhere_then_resume_equals_uninterrupted(tmp_path, prefect_api_env, fmt):
    recipe = tmp_path / "recipe.yaml"
    _recipe(recipe, fmt)
    n_kills = max(6, N_KILLS // 2)
    env = {**prefect_api_env, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)

    ref, ref_log = tmp_path / "ref", tmp_path / "ref.log"
    done = _run(recipe, ref, env, KIMIVL_CRASH_LOG=str(ref_log))
    assert done.returncode == 0, done.stderr[-4000:]
    total = len(ref_log.read_text().splitlines())
    assert total > 3 * n_kills, f"only {total} crash points in a whole run"

    # kill i targets the crash point at about (i + 1/2) / N of the reference run (random jitter): process i
    # dies at the first point of that name it reaches. A resumed process skips finished work, so it reaches
    # the name at or after the target: the kills walk through data, every phase, evaluation and export.
    ref_names = [line.split()[1] for line in ref_log.read_text().splitlines()]
    rng = random.Random(int(os.environ.get("KIMIVL_CRASH_SEED", "0")))
    step = total / n_kills
    picks = [min(total - 1, int((i + rng.uniform(0.2, 0.8)) * step)) for i in range(n_kills)]
    for phase in PHASES:  # at least one kill inside each phase's own training points
        if not any(ref_names[i].endswith(f":{phase}") for i in picks):
            own = [i for i, n in enumerate(ref_names) if n.endswith(f":{phase}")]
            j = rng.choice(own)
            picks[min(range(n_kills), key=lambda k: abs(picks[k] - j))] = j
    targets = [ref_names[i] for i in sorted(picks)]
    out, log = tmp_path / "crashed", tmp_path / "chain.log"
    kills = 0
    for name in targets:
        p = _run(recipe, out, env, KIMIVL_CRASH_AT="1", KIMIVL_CRASH_NAME=name, KIMIVL_CRASH_LOG=str(log))
        if p.returncode == 0:
            break  # no point of that name was left: the run finished
        assert p.returncode == -9, f"kill at {name}: exited {p.returncode}\n{p.stderr[-4000:]}"
        kills += 1
        _assert_nothing_partial_marked_complete(out)
    else:
        final = _run(recipe, out, env, KIMIVL_CRASH_LOG=str(log))
        assert final.returncode == 0, final.stderr[-4000:]
    landed = [line.split()[1] for line in log.read_text().splitlines() if line.endswith("KILL")]
    assert len(landed) == kills >= n_kills - 2, (kills, landed)
    kinds = {name.split(":")[0] for name in landed}
    # data steps (manifests), training (checkpoint writes/renames), tracking and atomic renames
    assert {"manifest", "checkpoint", "mlflow"} <= kinds, landed
    for phase in PHASES:  # every phase was interrupted at least once
        assert any(name.endswith(f":{phase}") for name in landed), (phase, landed)

    # bit-identical results; no token counted twice
    want, got = json.loads((ref / "summary.json").read_text()), json.loads((out / "summary.json").read_text())
    for layer in ("raw", "filtered", "dedup", "validated", "tokenized"):
        for d in sorted((ref / "data" / layer).iterdir()):
            if d.is_dir():
                assert (
                    read_manifest(out / "data" / layer / d.name).content_hash == read_manifest(d).content_hash
                ), d
    assert (
        read_manifest(out / "data" / "tokenizer").content_hash
        == read_manifest(ref / "data" / "tokenizer").content_hash
    )
    for name in PHASES:
        a, b = ref / "phases" / name / "final", out / "phases" / name / "final"
        assert _sha(a / "model.safetensors") == _sha(b / "model.safetensors"), name
        assert _checkpoint_identity(a) == _checkpoint_identity(b), name
        assert got["phases"][name]["tokens"] == want["phases"][name]["tokens"], name
        assert got["phases"][name]["steps"] == want["phases"][name]["steps"], name
    for d in sorted((ref / "data" / "tokenized").iterdir()):
        assert (
            read_manifest(out / "data" / "tokenized" / d.name).content_hash == read_manifest(d).content_hash
        )
    assert (
        read_manifest(out / "export" / "hf").content_hash == read_manifest(ref / "export" / "hf").content_hash
    )
    assert got["eval"]["align"]["summary"] == want["eval"]["align"]["summary"]

    # MLflow: one parent run, one run per phase (found again after every kill), complete loss curves
    parents, phases, client = _mlflow_runs(out)
    assert len(parents) == 1 and {k: len(v) for k, v in phases.items()} == dict.fromkeys(PHASES, 1)
    _, ref_phases, ref_client = _mlflow_runs(ref)
    for name in PHASES:
        hist = client.get_metric_history(phases[name][0].info.run_id, "loss")
        ref_hist = ref_client.get_metric_history(ref_phases[name][0].info.run_id, "loss")
        by_step: dict[int, set] = {}
        for m in hist:
            by_step.setdefault(m.step, set()).add(m.value)
        ref_curve = {m.step: m.value for m in ref_hist}
        assert set(by_step) == set(ref_curve), (
            f"{name}: steps logged {sorted(by_step)} != {sorted(ref_curve)}"
        )
        # A step computed by a process that was then killed before its checkpoint was published is computed
        # again after the resume, and both values are on record. They must be equal, with one observed
        # exception (session 11, 1 run of ~10): the killed process's forward gave align step 2 a loss
        # 1 fp32 ulp off (7.599874293550532 vs 7.599875159297429; grad norm and aux loss bit-identical), the
        # same rare cross-process ulp difference docs/PERFORMANCE.md records for the aux loss. The weights
        # that went on are bit-identical (asserted above); a resume that restored the wrong state (data
        # position, optimizer, RNG) would move the loss by far more than 1e-6 relative.
        for step, values in by_step.items():
            want = ref_curve[step]
            assert all(abs(v - want) <= 1e-6 * abs(want) for v in values), (name, step, sorted(values), want)
