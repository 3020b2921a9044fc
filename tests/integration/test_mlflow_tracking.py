"""MLflow tracking of a pipeline run: run tree, metrics, dataset inputs, lineage, model registry, plots,
resume without duplicates, a tracking server that is down, secrets, ``kimivl compare``, a real server."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.cli import app as kimivl_app
from flows.cli.compare import compare_cmd
from tasks.io.manifest import code_version, read_manifest
from tasks.recipe import recipe_from_dict
from tasks.tracking.mlflow_after import replay_spool
from tasks.tracking.mlflow_names import clean_params, default_tracking_uri
from tasks.tracking.mlflow_pipeline import PipelineTracking
from tasks.train.runner import read_result
from tests.integration.conftest import short_recipe, stop_process_group

ENV_SECRET = "kimivl-test-env-secret-9f8e7d6c"
PHASES = {"text_pretrain": 1024, "align": 512}


def _raw_recipe(**train) -> dict:
    raw = short_recipe(**train).model_dump(mode="json", by_alias=True)
    raw["phases"] = [p for p in raw["phases"] if p["name"] in PHASES]
    raw["eval"]["points"] = []
    for p in raw["phases"]:
        p["token_budget"] = PHASES[p["name"]]
    return raw


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tracked(prefect_harness, tiny_data, tmp_path_factory):
    """One tracked pipeline (``kimivl run``: data + 2 short phases + one evaluation point) into the
    embedded default store."""
    root = tmp_path_factory.mktemp("mlflow-run")
    raw = _raw_recipe()
    raw["eval"]["points"] = [{"after": "align", "tasks": ["text_loss"]}]
    recipe_yaml = root / "recipe.yaml"
    recipe_yaml.write_text(yaml.safe_dump(raw))
    out = root / "run"
    shutil.copytree(tiny_data[0], out / "data")  # every data step finds its output up to date
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        res = CliRunner().invoke(
            kimivl_app, ["run", "--recipe", str(recipe_yaml), "--out", str(out), "--no-export"]
        )
    assert res.exit_code == 0, res.output[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    uri = default_tracking_uri(out)
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name("kimivl")
    return SimpleNamespace(
        summary=summary, out=out, uri=uri, client=client, exp=exp, recipe=recipe_from_dict(raw),
        logs=res.output.splitlines(),
    )  # fmt: skip


def _runs(t, experiment: str = "kimivl"):
    exp = t.client.get_experiment_by_name(experiment)
    runs = t.client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("kimivl.role") == "pipeline"]
    phases = {r.data.tags["kimivl.phase"]: r for r in runs if r.data.tags.get("kimivl.role") == "phase"}
    return runs, parents, phases


def test_parent_run_with_one_nested_run_per_phase(tracked):
    s = tracked.summary
    runs, parents, phases = _runs(tracked)
    assert len(runs) == 3 and len(parents) == 1 and set(phases) == set(PHASES)
    parent = parents[0]
    assert parent.info.run_id == s["mlflow"]["parent_run_id"] and parent.info.status == "FINISHED"
    assert s["mlflow"]["undelivered"] == 0 and s["mlflow"]["rejected"] == 0
    assert Path(tracked.exp.artifact_location.removeprefix("file://")) == tracked.out / "mlartifacts"
    for name, r in phases.items():
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.info.status == "FINISHED" and s["phases"][name]["mlflow_run_id"] == r.info.run_id
        assert (tracked.out / "phases" / name / "metrics.jsonl").is_file()  # the local record is kept too
        # the phase's planned model states per rank, comparable across runs in the MLflow UI
        assert int(r.data.params["memory.weights"]) == 4 * int(r.data.params["memory.params"]) > 0
        assert r.data.params["memory.world"] == "1" and r.data.params["memory.phase"] == name
    # the resolved recipe as params, data step counts as parent metrics, phase summaries on the parent
    assert parent.data.params["phases.text_pretrain.token_budget"] == "1024"
    assert parent.data.params["data.tokenizer.vocab_size"] == "4096"
    assert parent.data.metrics["data.tokens.total"] == s["data_tokens"]["total"] > 0
    assert parent.data.metrics["align.final_loss"] == pytest.approx(s["phases"]["align"]["final_loss"])


def test_per_step_metric_series(tracked):
    _, _, phases = _runs(tracked)
    for name, r in phases.items():
        res = tracked.summary["phases"][name]
        loss = tracked.client.get_metric_history(r.info.run_id, "loss")
        assert [m.step for m in loss] == list(range(1, res["steps"] + 1))
        text = [m.value for m in tracked.client.get_metric_history(r.info.run_id, "tokens_text")]
        assert text == sorted(text) and text[-1] == res["tokens"]["text"]
        for k in ("lr", "grad_norm", "tokens_image", "tokens_per_s", "expert_load_max_over_mean"):
            assert len(tracked.client.get_metric_history(r.info.run_id, k)) == res["steps"], (name, k)
        # the MFU estimate needs one step of timing first
        assert len(tracked.client.get_metric_history(r.info.run_id, "mfu_est")) >= res["steps"] - 1
        assert r.data.metrics["tokens_final_total"] == res["tokens"]["total"]


def test_phase_runs_have_system_metrics_and_say_what_their_metrics_mean(tracked):
    """MLflow's own system metrics on each phase run (a phase shorter than the sampling interval still
    gets its one averaged point), and a description (the UI's Description box) telling ``loss`` from
    ``final_loss``; the parent run has one too."""
    _, parents, phases = _runs(tracked)
    for name, r in phases.items():
        cpu = tracked.client.get_metric_history(r.info.run_id, "system/cpu_utilization_percentage")
        mem = tracked.client.get_metric_history(r.info.run_id, "system/system_memory_usage_megabytes")
        assert len(cpu) >= 1 and all(0 < m.value <= 100 for m in cpu), (name, cpu)  # it trained: busy
        assert len(mem) >= 1 and all(m.value > 0 for m in mem), (name, mem)
        note = r.data.tags["mlflow.note.content"]
        assert f"Phase `{name}`" in note and "k = max(1, min(5, steps // 4))" in note
        assert "`final_loss` / `first_loss`" in note and "`loss`: that step's training loss" in note
    assert "Each phase is a nested run" in parents[0].data.tags["mlflow.note.content"]


def test_dataset_inputs_and_lineage_tags(tracked):
    _, _, phases = _runs(tracked)
    for phase in tracked.recipe.phases:
        r = phases[phase.name]
        want = {
            s.name: read_manifest(tracked.out / "data" / "tokenized" / s.name).content_hash
            for s in phase.sources
        }
        inputs = {d.dataset.name: d for d in r.inputs.dataset_inputs}
        assert set(inputs) == set(want)
        for n, h in want.items():
            assert inputs[n].dataset.digest == h[:36]  # MLflow caps digests at 36 chars
            assert {t.key: t.value for t in inputs[n].tags}["kimivl.content_hash"] == h
            assert json.loads(inputs[n].dataset.profile)["content_hash"] == h
            assert r.data.tags[f"kimivl.dataset.{n}"] == h
        assert json.loads(r.data.tags["kimivl.datasets"]) == want
        assert r.data.tags["kimivl.code_version"] == code_version()
        assert r.data.tags["kimivl.recipe"] == "tiny"
        final = tracked.out / "phases" / phase.name / "final"
        assert r.data.tags["kimivl.checkpoint.hash"] == read_manifest(final).content_hash
    prev = tracked.out / "phases" / "text_pretrain" / "final"
    assert phases["align"].data.tags["kimivl.parent_checkpoint.uri"] == str(prev.resolve())
    assert phases["align"].data.tags["kimivl.parent_checkpoint.hash"] == read_manifest(prev).content_hash
    assert phases["text_pretrain"].data.tags["kimivl.parent_checkpoint.uri"] == "scratch"


def test_final_checkpoints_registered_as_model_versions(tracked, tmp_path):
    _, _, phases = _runs(tracked)
    versions = tracked.client.search_model_versions("name = 'kimivl-tiny'")
    assert len(versions) == len(PHASES)
    for mv in versions:
        name = mv.tags["kimivl.phase"]
        r = phases[name]
        assert mv.run_id == r.info.run_id and mv.source == f"runs:/{r.info.run_id}/{name}-final"
        assert mv.tags["kimivl.checkpoint.hash"] == r.data.tags["kimivl.checkpoint.hash"]
        assert mv.tags["kimivl.parent_checkpoint.hash"] == r.data.tags["kimivl.parent_checkpoint.hash"]
        assert mv.tags["kimivl.code_version"] == code_version()
        listed = {Path(a.path).name for a in tracked.client.list_artifacts(r.info.run_id, f"{name}-final")}
        assert {"model.safetensors", "kimivl_config.json", "manifest.json"} <= listed
    mv = next(v for v in versions if v.tags["kimivl.phase"] == "align")
    got = tracked.client.download_artifacts(mv.run_id, "align-final/model.safetensors", str(tmp_path))
    local = tracked.out / "phases" / "align" / "final" / "model.safetensors"
    assert hashlib.sha256(Path(got).read_bytes()).digest() == hashlib.sha256(local.read_bytes()).digest()


def test_plots_and_full_recipe_are_artifacts(tracked, tmp_path):
    pid = tracked.summary["mlflow"]["parent_run_id"]
    assert {a.path for a in tracked.client.list_artifacts(pid, "plots")} == {
        "plots/loss_curve.png",
        "plots/tokens_by_phase.png",
    }
    for p in ("plots/loss_curve.png", "plots/tokens_by_phase.png"):
        data = Path(tracked.client.download_artifacts(pid, p, str(tmp_path))).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, p
    recipe = json.loads(
        Path(tracked.client.download_artifacts(pid, "recipe.json", str(tmp_path))).read_text()
    )
    assert [p["token_budget"] for p in recipe["phases"]] == list(PHASES.values())


def test_rerun_reuses_runs_and_versions(tracked):
    """A second process on the same run directory finds the parent and phase runs again: no duplicates."""
    s = tracked.summary
    pt = PipelineTracking(
        tracked.uri,
        local_dir=tracked.out / "tracking",
        data_root=tracked.out / "data",
        out_root=tracked.out,
        log=lambda m: None,
    )
    assert pt.start_pipeline(tracked.recipe) == s["mlflow"]["parent_run_id"]
    tr = pt.phase_tracker("align")
    assert pt.phase_tracker("align") is tr and tr.resumed
    assert tr.run_id == s["phases"]["align"]["mlflow_run_id"]
    pt.finish_phase("align", read_result(tracked.out, tracked.recipe.phase("align")))
    report = pt.end_pipeline("FINISHED")
    assert report["undelivered"] == 0 and report["rejected"] == 0
    runs, parents, phases = _runs(tracked)
    assert len(runs) == 3 and len(parents) == 1 and len(phases) == 2
    assert len(tracked.client.search_model_versions("name = 'kimivl-tiny'")) == len(PHASES)
    assert len(tracked.client.get_metric_history(tr.run_id, "loss")) == s["phases"]["align"]["steps"]


def test_server_down_never_raises_spools_and_replays_later(tracked, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    logs: list[str] = []
    pt = PipelineTracking(
        f"http://127.0.0.1:{_free_port()}",
        experiment="down-test",
        local_dir=tmp_path / "trk",
        flush_interval_s=0.0,
        backoff_s=(60.0, 60.0),
        log=logs.append,
    )
    t0 = time.perf_counter()
    assert pt.start_pipeline(tracked.recipe, "down") is None
    tr = pt.phase_tracker("text_pretrain")
    tr.log_params({"engine": {"optimizer": "muon"}})
    for step in range(1, 6):
        tr.log_metrics({"loss": 1.0 / step, "tokens_total": 100.0 * step}, step=step)
    note = tmp_path / "note.txt"
    note.write_text("hello")
    tr.log_artifact(note)
    tr.set_tags({"k": "v"})
    report = pt.end_pipeline("FINISHED")
    assert time.perf_counter() - t0 < 15
    assert report["parent_run_id"] is None and report["undelivered"] > 0
    spool = Path(report["spool_dir"])
    assert len((spool / "phase-text_pretrain" / "metrics.jsonl").read_text().splitlines()) == 5
    assert any("unreachable" in m for m in logs) and any("NOT delivered" in m for m in logs)
    # later, against a working store
    assert replay_spool(spool, tracked.uri, log=lambda m: None)["remaining"] == 0
    _, parents, phases = _runs(tracked, "down-test")
    assert len(parents) == 1 and set(phases) == {"text_pretrain"}
    r = phases["text_pretrain"]
    assert [m.value for m in tracked.client.get_metric_history(r.info.run_id, "loss")] == [
        1.0 / s for s in range(1, 6)
    ]
    assert r.data.params["engine.optimizer"] == "muon" and r.data.tags["k"] == "v"
    # the phase never finished (no finish_phase): the pipeline's end marks it KILLED, the parent FINISHED
    assert r.info.status == "KILLED" and parents[0].info.status == "FINISHED"
    assert [a.path for a in tracked.client.list_artifacts(r.info.run_id)] == ["note.txt"]
    assert not (spool / "phase-text_pretrain" / "metrics.jsonl").exists()


def test_store_lost_mid_run_then_back_resumes_the_same_run(tracked, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    pt = PipelineTracking(
        tracked.uri,
        experiment="midrun",
        local_dir=tmp_path / "trk",
        flush_interval_s=0.0,
        backoff_s=(0.2, 0.2),
        log=lambda m: None,
    )
    pt.start_pipeline(tracked.recipe, "midrun")
    tr = pt.phase_tracker("text_pretrain")
    run_id = tr.run_id
    assert run_id is not None
    tr.log_metrics({"loss": 1.0}, step=1)
    good = pt.conn._client
    pt.conn._client = MlflowClient(f"http://127.0.0.1:{_free_port()}")  # fault injection: the store is gone
    for step in (2, 3, 4):
        tr.log_metrics({"loss": float(step)}, step=step)
    assert tr.pending() == 3 and len((tr.spool_dir / "metrics.jsonl").read_text().splitlines()) == 3
    pt.conn._client = good
    time.sleep(0.25)  # past the back-off
    tr.log_metrics({"loss": 5.0}, step=5)
    assert tr.pending() == 0 and not (tr.spool_dir / "metrics.jsonl").exists() and tr.run_id == run_id
    hist = tracked.client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in hist] == [(s, float(s)) for s in range(1, 6)]
    # a rejection (MLflow params are immutable) is reported, not retried forever
    tr.log_params({"lr": 1})
    tr.log_params({"lr": 2})
    report = pt.end_pipeline()
    assert report["rejected"] == 1 and report["undelivered"] == 0
    assert tracked.client.get_run(run_id).data.params["lr"] == "1"
    assert "lr" in (tr.spool_dir / "rejected.jsonl").read_text()


def test_long_param_values_are_truncated_not_rejected(tracked):
    assert clean_params({"a": {"b": "x" * 7000}})["a.b"].endswith("...[truncated]")
    assert len(clean_params({"a": {"b": "x" * 7000}})["a.b"]) == 6000
    pt = PipelineTracking(tracked.uri, experiment="long", local_dir=tracked.out / "tracking-long", log=print)
    pt.start_pipeline(tracked.recipe, "long")
    pt.parent.log_params({"huge": "y" * 10000, "token_budget": 5})
    report = pt.end_pipeline()
    assert report["rejected"] == 0 and report["undelivered"] == 0
    params = tracked.client.get_run(report["parent_run_id"]).data.params
    assert len(params["huge"]) == 6000 and params["token_budget"] == "5"  # "token_budget" is no secret


def test_invalid_names_are_cleaned_not_rejected(tracked):
    """A data contract's per-expectation count is named like GX's expectation, parentheses included: MLflow
    refuses such a name and, with it, the whole batch of the pipeline's data metrics (seen in a real run)."""
    gx = "data.validated.cot.by_expectation.expect_column_values_to_be_in_set(answer_verified)"
    pt = PipelineTracking(
        tracked.uri, experiment="names", local_dir=tracked.out / "tracking-names", log=print
    )
    pt.start_pipeline(tracked.recipe, "names")
    pt.parent.log_metrics({gx: 3.0, "data.raw.cot.rows": 128.0}, step=0)
    pt.parent.log_params({"contract": {"expect(x)": "ok"}})
    report = pt.end_pipeline()
    assert report["rejected"] == 0 and report["undelivered"] == 0
    data = tracked.client.get_run(report["parent_run_id"]).data
    assert (
        data.metrics[gx.replace("(", "_").replace(")", "_")] == 3.0
        and data.metrics["data.raw.cot.rows"] == 128
    )
    assert data.params["contract.expect_x_"] == "ok"


def test_secrets_never_reach_the_store(tracked, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    secrets = ["sk-live-param-123456", "hunter2-password-xyz", "tag-token-abcdef99", "userinfo-pw-778899"]
    pt = PipelineTracking(
        tracked.uri, experiment="secrets", local_dir=tracked.out / "tracking-secrets", log=print
    )
    pt.start_pipeline(tracked.recipe, "secrets", tags={"endpoint": f"https://bob:{secrets[3]}@s3.local/b"})
    tr = pt.phase_tracker("text_pretrain")
    tr.log_params({"api_key": secrets[0], "db": {"password": secrets[1]}, "note": f"key={ENV_SECRET}"})
    tr.set_tags({"HF_TOKEN": secrets[2], "uri": f"s3://b/x?sig={ENV_SECRET}"})
    pt.end_pipeline()
    _, parents, phases = _runs(tracked, "secrets")
    p = phases["text_pretrain"].data
    assert p.params["api_key"] == "***" and p.params["db.password"] == "***" and p.params["note"] == "key=***"
    assert p.tags["HF_TOKEN"] == "***" and p.tags["uri"] == "s3://b/x?sig=***"
    assert parents[0].data.tags["endpoint"] == "https://***@s3.local/b"
    # grep every byte the tracking wrote: the store, the artifacts, the local tracking dirs
    paths = [
        tracked.out / "mlflow.db",
        tracked.out / "mlartifacts",
        tracked.out / "tracking",
        tracked.out / "tracking-secrets",
    ]
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    assert len(files) > 5
    for f in files:
        data = f.read_bytes()
        for s in [ENV_SECRET, *secrets]:
            assert s.encode() not in data, (s, f)


def test_compare_prints_recipe_and_metric_diffs(tracked):
    b = recipe_from_dict(_raw_recipe(seed=7))
    pt = PipelineTracking(tracked.uri, local_dir=tracked.out / "tracking-b", log=lambda m: None)
    run_b = pt.start_pipeline(b, "seed7")
    pt.phase_tracker("text_pretrain").log_metrics({"loss": 1.5}, step=1)
    pt.end_pipeline()
    run_a = tracked.summary["mlflow"]["parent_run_id"]
    app = typer.Typer()
    app.command()(compare_cmd)
    res = CliRunner().invoke(app, [run_a, run_b, "--tracking-uri", tracked.uri])
    assert res.exit_code == 0, res.output
    out = res.output
    param_row = next(line for line in out.splitlines() if "train.seed" in line)
    assert "0" in param_row and "7" in param_row
    assert "token_budget" not in out  # equal params are not listed
    loss_a = tracked.summary["phases"]["text_pretrain"]["final_loss"]
    final_a = tracked.client.get_run(
        tracked.summary["phases"]["text_pretrain"]["mlflow_run_id"]
    ).data.metrics["loss"]
    row = next(line for line in out.splitlines() if "text_pretrain" in line and "│ loss " in line)
    assert f"{final_a - 1.5:.6g}" in row and loss_a > 0
    bad = CliRunner().invoke(app, [run_a, "0" * 32, "--tracking-uri", tracked.uri])
    assert bad.exit_code == 2


def test_real_mlflow_server_down_then_up(tracked, tmp_path, monkeypatch):
    """Against a real ``mlflow server``: records logged before it is up are spooled, then delivered."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    pt = PipelineTracking(
        uri,
        experiment="server",
        local_dir=tmp_path / "trk",
        flush_interval_s=0.0,
        backoff_s=(0.5, 1.0),
        log=lambda m: None,
    )
    assert pt.start_pipeline(tracked.recipe, "served") is None  # not up yet
    tr = pt.phase_tracker("text_pretrain")
    for step in (1, 2, 3):
        tr.log_metrics({"loss": float(step)}, step=step)
    assert tr.pending() > 0
    db = tmp_path / "server.db"
    shutil.copy(tracked.out / "mlflow.db", db)  # an already-migrated store starts faster
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", str(tmp_path / "srv-artifacts")]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(tmp_path / "server.log", "wb") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server not healthy within 90 s"
            time.sleep(0.5)
        time.sleep(1.1)  # past the back-off: the next call retries
        for step in (4, 5):
            tr.log_metrics({"loss": float(step)}, step=step)
        note = tmp_path / "served.txt"
        note.write_text("artifact through the server")
        tr.log_artifact(note)
        report = pt.end_pipeline()
        assert report["undelivered"] == 0 and report["parent_run_id"] is not None
        client = MlflowClient(uri)
        run = client.get_run(report["phase_run_ids"]["text_pretrain"])
        assert run.data.tags["mlflow.parentRunId"] == report["parent_run_id"]
        assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [
            1.0,
            2.0,
            3.0,
            4.0,
            5.0,
        ]
        (tmp_path / "dl").mkdir()
        got = client.download_artifacts(run.info.run_id, "served.txt", str(tmp_path / "dl"))
        assert Path(got).read_text() == "artifact through the server"
        assert client.get_run(report["parent_run_id"]).info.status == "FINISHED"
    finally:
        stop_process_group(proc, timeout=15)


def test_forced_rerun_tracks_a_new_phase_run_and_keeps_the_old(tracked, monkeypatch):
    """The stage flow with ``rerun``: the phase trains again into a fresh nested run of the same parent;
    the replaced run keeps its history, tagged with where the old directory went. (Last in this module:
    it changes the run tree the tests above read.)"""
    from flows.stage_flow import StageParams, stage_flow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    parent_id = tracked.summary["mlflow"]["parent_run_id"]
    runs, parents, _ = _runs(tracked)

    def align_runs(runs):
        return [r for r in runs if r.data.tags.get("kimivl.phase") == "align" and _parent(r) == parent_id]

    (old,) = align_runs(runs)
    recipe = tracked.out.parent / "recipe.yaml"
    (res,) = stage_flow(
        StageParams(recipe_path=str(recipe), stage="align", out_dir=str(tracked.out), rerun=True)
    )
    assert res["up_to_date"] is False and res["mlflow_run_id"] != old.info.run_id
    runs, parents_after, _ = _runs(tracked)
    assert sorted(r.info.run_id for r in align_runs(runs)) == sorted([old.info.run_id, res["mlflow_run_id"]])
    assert sorted(p.info.run_id for p in parents_after) == sorted(p.info.run_id for p in parents)
    new = tracked.client.get_run(res["mlflow_run_id"])
    assert _parent(new) == parent_id and new.info.status == "FINISHED"  # a new run under the same parent
    assert [m.step for m in tracked.client.get_metric_history(new.info.run_id, "loss")] == list(
        range(1, res["steps"] + 1)
    )  # its own history, not appended to the replaced one
    kept = tracked.client.get_run(old.info.run_id)
    (aside,) = (tracked.out / "phases").glob(".align.replaced-*")
    assert kept.data.tags["kimivl.replaced_dir"] == str(aside)
    assert kept.data.tags["kimivl.run_key"].endswith(f":replaced:{aside.name}")
    assert (
        len(tracked.client.get_metric_history(kept.info.run_id, "loss"))
        == len(tracked.client.get_metric_history(old.info.run_id, "loss"))
        == tracked.summary["phases"]["align"]["steps"]
    )
    assert tracked.client.get_run(parent_id).data.tags["kimivl.phase_run.align"] == new.info.run_id


def _parent(run) -> str | None:
    return run.data.tags.get("mlflow.parentRunId")
