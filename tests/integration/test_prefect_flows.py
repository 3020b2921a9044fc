"""The Prefect flows: task states, "up to date" skips, the tokens artifact, tracking links, export; and one
run triggered through a real Prefect server's API against a served deployment (as the UI does).

(a) runs under ``prefect_test_harness`` (a temporary database and server, once per session);
(b) starts a real ``prefect server`` + MLflow server with ``kimivl up`` (``up_cmd``) on loopback ports,
serves the deployments with ``kimivl serve`` (``serve_cmd``) in a subprocess, triggers the data flow's
deployment through the API, waits for Completed, checks the outputs on disk, then stops serve before the
servers (``down_cmd``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from tasks.manifest import read_manifest
from tests.integration.conftest import ROOT, short_recipe, subprocess_env

PHASE = "text_pretrain"


def _one_phase_recipe(path: Path) -> Path:
    """The short recipe cut to its first phase with a one-step budget (the stage/pipeline flows' input)."""
    raw = short_recipe().model_dump(mode="json", by_alias=True)
    raw["phases"] = [p for p in raw["phases"] if p["name"] == PHASE]
    raw["eval"]["points"] = [{"after": PHASE, "tasks": ["text_loss"]}]
    p = raw["phases"][0]
    p["token_budget"] = p["seq_len"] * p["micro_batches_per_step"]
    path.write_text(yaml.safe_dump(raw))
    return path


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _task_runs(flow_run_id, expected: int, timeout: float = 60) -> list:
    """The flow run's task runs once ``expected`` of them are recorded in a final state (task run states
    reach the server through Prefect's event pipeline, a moment after the flow returns)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    while True:
        with _client() as c:
            runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        done = [r for r in runs if r.state is not None and r.state.is_final()]
        if len(done) >= expected or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def _artifact(key: str, flow_run_id) -> str:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with _client() as c:
        arts = c.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            )
        )
    assert len(arts) == 1, f"artifact {key!r} of flow run {flow_run_id}: {arts}"
    assert arts[0].type == "markdown"
    return str(arts[0].data)


class FakeMlflowTracking:
    """A tracking backend shaped like the MLflow one: a parent context, a tracker per phase (with a run id),
    hooks for the data summary and each phase's result (which returns the run's URL)."""

    def __init__(self) -> None:
        from tasks.tracking import MemoryTracker

        self.trackers: dict[str, MemoryTracker] = {}
        self.events: list[str] = []
        self._cls = MemoryTracker

    @contextlib.contextmanager
    def pipeline(self, recipe, params):
        self.events.append(f"pipeline:{recipe.name}:{Path(params['recipe_path']).name}")
        yield
        self.events.append("pipeline:end")

    def data_done(self, summary):
        self.events.append(f"data:{summary['tokens']['total']}")

    @contextlib.contextmanager
    def phase(self, phase, phase_dir):
        t = self._cls()
        t.run_id = f"run-{phase.name}"
        self.trackers[phase.name] = t
        yield t

    def phase_done(self, phase, result):
        self.events.append(f"done:{phase.name}:{result['mlflow_run_id']}")
        return {"mlflow_url": f"http://mlflow.invalid/#/runs/run-{phase.name}"}

    def eval_done(self, point, result):
        self.events.append(f"eval:{point}:{'up_to_date' if result['up_to_date'] else 'ran'}")

    def report_done(self, path):
        self.events.append(f"report:{Path(path).name}")


# ----------------------------------------------------------------------------------- (a) test harness


def test_data_flow_surfaces_up_to_date_steps(prefect_harness, tiny_data, tmp_path):
    from flows.data_flow import DataParams, data_flow

    root, summary = tiny_data
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(short_recipe().model_dump(mode="json", by_alias=True)))
    state = data_flow(DataParams(recipe_path=str(recipe), data_dir=str(root)), return_state=True)
    assert state.is_completed(), state
    res = state.result()
    assert res["tokens"] == summary["tokens"]
    # the corpus was made with the same data config: every output of every step is up to date
    for layer in ("raw", "filtered", "dedup", "validated", "tokenized"):
        assert set(res["up_to_date"][layer]) == set(summary[layer]), layer
    assert res["up_to_date"]["tokenizer"] == ["."]
    runs = _task_runs(state.state_details.flow_run_id, expected=6)
    assert sorted(r.name for r in runs) == sorted(
        ["sources", "filter", "dedup + QA synthesis", "validate", "train tokenizer", "tokenize"]
    )
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state) for r in runs]
    table = _artifact("kimivl-data-tokens", state.state_details.flow_run_id)
    text = summary["tokenized"]["text"]
    assert f"| text | {text['accepted']} | {text['tokens']['text']:,} | 0 | 0 |" in table


def test_data_steps_retry_transient_errors_only(prefect_harness, tiny_data, tmp_path, monkeypatch):
    """A filter step that hits a connection error once is retried (after the backoff) and completes; a
    missing input (deterministic) fails at once, without retries."""
    import tasks.data.pipeline as steps
    from flows.data_flow import DataParams, data_flow

    root, summary = tiny_data
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(short_recipe().model_dump(mode="json", by_alias=True)))
    real, calls = steps.step_filter, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("S3 endpoint reset the connection")
        return real(*args, **kwargs)

    monkeypatch.setattr(steps, "step_filter", flaky)
    params = DataParams(recipe_path=str(recipe), data_dir=str(root), io_retries=2)
    state = data_flow(params, return_state=True)
    assert state.is_completed(), state
    assert len(calls) == 2 and state.result()["tokens"] == summary["tokens"]

    def missing(*args, **kwargs):
        calls.append(1)
        raise FileNotFoundError("raw/: no such data directory")

    calls.clear()
    monkeypatch.setattr(steps, "step_filter", missing)
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError, match="no such data directory"):
        data_flow(params)
    assert len(calls) == 1 and time.monotonic() - t0 < 60


def test_run_cmd_rejects_a_bad_recipe_before_any_work(tmp_path):
    from flows.cli import app

    raw = short_recipe().model_dump(mode="json", by_alias=True)
    raw["phases"][0]["token_budget"] = -5
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", "--recipe", str(recipe), "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "phases.0.token_budget" in res.output
    assert not out.exists()


@pytest.fixture(scope="module")
def stage_run(prefect_harness, tiny_data, tmp_path_factory):
    from flows.stage_flow import StageParams, stage_flow

    tmp = tmp_path_factory.mktemp("stage-flow")
    recipe = _one_phase_recipe(tmp / "recipe.yaml")
    tracking = FakeMlflowTracking()
    params = StageParams(
        recipe_path=str(recipe), stage=PHASE, out_dir=str(tmp / "run"), data_dir=str(tiny_data[0])
    )
    state = stage_flow(params, tracking=tracking, return_state=True)
    return params, tracking, state


def test_stage_flow_trains_phase_with_tracking_links(stage_run):
    params, tracking, state = stage_run
    assert state.is_completed(), state
    (res,) = state.result()
    steps = res["steps"]
    assert res["phase"] == PHASE and res["up_to_date"] is False and steps >= 1
    assert res["tokens"]["total"] >= res["token_budget"]
    assert res["mlflow_run_id"] == f"run-{PHASE}" and res["mlflow_url"].endswith(f"run-{PHASE}")
    # the injected tracker got the phase's metrics (and run_phase's default JSONL tracker did not)
    assert [s for s, _ in tracking.trackers[PHASE].series("loss")] == list(range(1, steps + 1))
    assert tracking.events == ["pipeline:tiny:recipe.yaml", f"done:{PHASE}:run-{PHASE}", "pipeline:end"]
    assert not (Path(params.out_dir) / "phases" / PHASE / "metrics.jsonl").exists()
    (run,) = _task_runs(state.state_details.flow_run_id, expected=1)
    assert run.name == f"train {PHASE}" and run.state.is_completed()
    assert run.empirical_policy.retries in (0, None)  # training is never retried automatically
    table = _artifact(f"kimivl-stage-{PHASE.replace('_', '-')}-tokens", state.state_details.flow_run_id)
    tok = res["tokens"]
    assert (
        f"| {PHASE} | {PHASE} | {tok['text']:,} | {tok['image']:,} | {tok['video']:,} | {tok['total']:,} | {steps} |"
        in table
    )
    assert f"[run-{PHASE}](http://mlflow.invalid/#/runs/run-{PHASE})" in table


def test_pipeline_flow_skips_done_work_evaluates_and_exports(stage_run):
    from flows.pipeline import PipelineParams, pipeline_flow
    from tasks.model_io import load_hf, load_native

    stage_params, _, _ = stage_run
    params = PipelineParams(
        recipe_path=stage_params.recipe_path, out_dir=stage_params.out_dir, data_dir=stage_params.data_dir
    )
    tracking = FakeMlflowTracking()
    state = pipeline_flow(params, tracking=tracking, return_state=True)
    assert state.is_completed(), state
    res = state.result()
    # the phase was complete: no phase run is opened again; parent context, data hook, the recipe's
    # evaluation point after the phase, the run report
    data_total = res["data"]["tokens"]["total"]
    assert tracking.events == [
        "pipeline:tiny:recipe.yaml", f"data:{data_total}", f"eval:{PHASE}:ran", "report:report.md",
        "pipeline:end",
    ]  # fmt: skip
    assert res["phase_order"] == [PHASE] and res["results"][0]["up_to_date"] is True
    out = Path(stage_params.out_dir)
    final = out / "phases" / PHASE / "final"
    ev = res["eval"][PHASE]
    assert ev["dir"] == str(out / "eval" / PHASE) and ev["summary"]["text_loss/loss"] > 0
    point = json.loads((out / "eval" / PHASE / "eval.json").read_text())
    assert point["checkpoint"] == str(final) and list(point["tasks"]) == ["text_loss"]
    assert read_manifest(out / "eval" / PHASE).parents[0].content_hash == read_manifest(final).content_hash
    report = (out / "eval" / "report.md").read_text()
    assert (
        "| Text retention | `text_loss/loss` |" in report
        and f"| `text_loss/loss` | {ev['summary']['text_loss/loss']:.4f} |" in report
    )
    assert "eval" in _artifact("kimivl-pipeline-eval", state.state_details.flow_run_id).lower()
    assert res["export"]["native"] == str(out / "export" / "native")
    assert read_manifest(out / "export" / "native").content_hash == read_manifest(final).content_hash
    cfg0, sd0 = load_native(final)
    cfg1, sd1 = load_hf(out / "export" / "hf")
    assert cfg1.lm.hidden_size == cfg0.lm.hidden_size and set(sd1) == set(sd0)
    assert all(bool((sd0[k] == sd1[k]).all()) for k in sd0)
    assert read_manifest(out / "export" / "hf").parents[0].content_hash == read_manifest(final).content_hash
    table = _artifact("kimivl-pipeline-tokens", state.state_details.flow_run_id)
    assert f"| {PHASE} | {PHASE} |" in table and "| **all** |" in table
    # a second run: the evaluation point and the export are up to date
    again_tracking = FakeMlflowTracking()
    again = pipeline_flow(params, tracking=again_tracking, return_state=True).result()
    assert sorted(again["export"]["up_to_date"]) == ["hf", "native"]
    assert f"eval:{PHASE}:up_to_date" in again_tracking.events
    assert again["eval"][PHASE]["summary"] == ev["summary"]


# ----------------------------------------------------------------------------------- (b) real server


def _ops_app() -> typer.Typer:
    from flows.cli_ops import down_cmd, up_cmd

    app = typer.Typer()
    app.command("up")(up_cmd)
    app.command("down")(down_cmd)
    return app


SERVE_SCRIPT = (
    "import typer; from flows.cli_ops import serve_cmd; app = typer.Typer(); "
    "app.command('serve')(serve_cmd); app.command('noop')(lambda: None); app()"
)


def test_ui_triggered_pipeline_tracks_to_mlflow_with_s3_artifacts(
    tiny_data, tmp_path, s3_server, monkeypatch
):
    """kimivl up (Prefect + MLflow servers, MLflow artifacts in SeaweedFS) -> kimivl serve -> a pipeline run
    created through the Prefect API (as the UI does) -> Completed -> runs, metrics, lineage and evaluation
    read back from MLflow; MLflow artifacts and the run's published checkpoints are in S3 -> kimivl down."""
    from mlflow import MlflowClient
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli_ops import healthy
    from tasks import storage

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    prefix = f"s3://kimivl-test/ui-{os.urandom(4).hex()}"
    state_dir = tmp_path / "services"
    runner = CliRunner()
    up = runner.invoke(
        _ops_app(),
        ["up", "--state-dir", str(state_dir), "--prefect-port", "0", "--mlflow-port", "0",
         "--artifacts-destination", f"{prefix}/mlflow"],
    )  # fmt: skip
    assert up.exit_code == 0, up.output[-3000:]
    services = json.loads(up.stdout.strip().splitlines()[-1])["services"]
    api, tracking_uri = services["prefect"]["api_url"], services["mlflow"]["tracking_uri"]
    serve = None
    try:
        assert api.startswith("http://127.0.0.1:") and healthy(services["mlflow"]["health"])
        # a copy of the corpus without its tokenizer/tokenized layers: the run redoes exactly those two
        data = tmp_path / "data"
        shutil.copytree(tiny_data[0], data)
        shutil.rmtree(data / "tokenizer")
        shutil.rmtree(data / "tokenized")
        raw = short_recipe().model_dump(mode="json", by_alias=True)
        raw["phases"] = [p for p in raw["phases"] if p["name"] in ("text_pretrain", "align")]
        for p in raw["phases"]:
            p["token_budget"] = 1024
        raw["eval"]["points"] = [{"after": "align", "tasks": ["text_loss"]}]
        raw["eval"]["config"]["sizes"]["text_loss"] = 4
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(raw))
        env = {
            **subprocess_env(),
            "PREFECT_HOME": str(tmp_path / "prefect-client"),
            "PYTHONPATH": str(ROOT),
        }
        log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
        serve = subprocess.Popen(
            [sys.executable, "-c", SERVE_SCRIPT, "serve", "--api-url", api, "--recipe", str(recipe),
             "--out", str(tmp_path / "run"), "--state-dir", str(state_dir)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        out = tmp_path / "run"
        with temporary_settings(updates={PREFECT_API_URL: api}):
            deployment = _wait_for_deployment("kimivl-pipeline/serve", serve, tmp_path / "serve.log")
            params = {
                "params": {
                    "recipe_path": str(recipe), "out_dir": str(out), "data_dir": str(data), "io_retries": 1,
                    "export": False, "artifact_uri": f"{prefix}/run",
                }
            }  # fmt: skip
            flow_run = run_deployment(deployment.id, parameters=params, timeout=0)
            final = _wait_final(flow_run.id, serve, tmp_path / "serve.log", timeout=480)
            assert final.state.is_completed(), (final.state, _tail(tmp_path / "serve.log"))
            table = _artifact("kimivl-pipeline-tokens", flow_run.id)
        # the data steps ran in the served process
        for name, counts in tiny_data[1]["tokenized"].items():
            assert read_manifest(data / "tokenized" / name).counts["tokens"] == counts["tokens"], name
        # MLflow (the server `up` started): a parent run, a nested run per phase, metrics, lineage, eval
        client = MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name("kimivl")
        runs = client.search_runs([exp.experiment_id])
        parents = [r for r in runs if r.data.tags.get("kimivl.role") == "pipeline"]
        phases = {r.data.tags["kimivl.phase"]: r for r in runs if r.data.tags.get("kimivl.role") == "phase"}
        assert len(parents) == 1 and set(phases) == {"text_pretrain", "align"}
        parent = parents[0]
        assert parent.info.status == "FINISHED" and parent.data.tags["kimivl.out_dir"] == str(out)
        assert parent.data.metrics["eval.align.text_loss/loss"] > 0
        tp_final = out / "phases" / "text_pretrain" / "final"
        align = phases["align"]
        assert align.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert align.data.tags["kimivl.parent_checkpoint.hash"] == read_manifest(tp_final).content_hash
        loss = client.get_metric_history(align.info.run_id, "loss")
        assert len(loss) >= 1 and all(m.value > 0 for m in loss)
        assert f"]({tracking_uri}/#/experiments/{exp.experiment_id}/runs/{align.info.run_id})" in table
        # artifacts in S3: MLflow's (proxied by its server) and the run's published copies
        keys = storage.list_uris(prefix + "/")
        assert any("/mlflow/" in k and k.endswith("model.safetensors") for k in keys), keys[:20]
        assert any("/mlflow/" in k and k.endswith("loss_curve.png") for k in keys), keys[:20]
        published = f"{prefix}/run/phases/align/final"
        assert storage.dir_matches(out / "phases" / "align" / "final", published)
        assert storage.is_complete(f"{prefix}/run/data/tokenized/text") and storage.is_complete(
            f"{prefix}/run/eval/align"
        )
    finally:
        if serve is not None:  # serve first: it may ignore SIGTERM once the server is gone
            with contextlib.suppress(ProcessLookupError):
                os.killpg(serve.pid, signal.SIGTERM)
            try:
                serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
                serve.wait(timeout=10)
        down = runner.invoke(_ops_app(), ["down", "--state-dir", str(state_dir)])
    assert down.exit_code == 0, down.output
    assert json.loads(down.stdout.strip().splitlines()[-1])["stopped"] == {"prefect": True, "mlflow": True}
    for s in services.values():
        assert not Path(f"/proc/{s['pid']}").exists() or not Path(f"/proc/{s['pid']}/cmdline").read_bytes()
    assert not healthy(services["prefect"]["health"], timeout=1)


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


def _wait_for_deployment(name: str, serve: subprocess.Popen, log: Path, timeout: float = 180):
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert serve.poll() is None, f"serve exited {serve.returncode}:\n{_tail(log)}"
        with _client() as c, contextlib.suppress(ObjectNotFound):
            return c.read_deployment_by_name(name)
        time.sleep(1)
    raise AssertionError(f"deployment {name} not registered in {timeout} s:\n{_tail(log)}")


def _wait_final(flow_run_id, serve: subprocess.Popen, log: Path, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with _client() as c:
            run = c.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        assert serve.poll() is None, f"serve exited {serve.returncode}:\n{_tail(log)}"
        time.sleep(1)
    raise AssertionError(f"flow run {flow_run_id} not finished in {timeout} s:\n{_tail(log)}")


# ----------------------------------------------------------------------------------- prefect.yaml


def test_prefect_yaml_deployments_resolve_and_validate():
    """Every deployment's entrypoint is one of the three flows, its parameters validate against the flow's
    pydantic form, no build/push steps, and kubernetes job variables exist in the pool's job template."""
    from flows.data_flow import DataParams
    from flows.pipeline import PipelineParams
    from flows.stage_flow import StageParams

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert spec.get("build") is None and spec.get("push") is None
    forms = {"pipeline_flow": PipelineParams, "stage_flow": StageParams, "data_flow": DataParams}
    template = json.loads((ROOT / "docker" / "prefect" / "k8s-job-template.json").read_text())
    declared = set(template["variables"]["properties"])
    names = [d["name"] for d in spec["deployments"]]
    assert {"pipeline", "stage", "data", "pipeline-k8s", "stage-k8s", "data-k8s"} <= set(names)
    assert len(names) == len(set(names))
    for d in spec["deployments"]:
        path, func = d["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert hasattr(getattr(module, func), "to_deployment"), d["entrypoint"]
        forms[func].model_validate(d["parameters"]["params"])
        pool = d["work_pool"]
        if "k8s" in d["name"]:
            assert pool["name"] == "kimivl-k8s"
            assert set(pool["job_variables"]) <= declared, set(pool["job_variables"]) - declared
            assert {"image", "cpu_request", "memory_request"} <= set(pool["job_variables"])
            assert d["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == "/app"
        else:
            assert pool["name"] in ("kimivl-process", "kimivl-gpu")
    # the placeholders the template uses are all declared variables
    used = set(re.findall(r"{{\s*(\w+)\s*}}", json.dumps(template["job_configuration"])))
    assert used <= declared, used - declared
