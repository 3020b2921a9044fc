"""The served deployments: one run triggered through a real Prefect server's API against a deployment
served from ``prefect.yaml`` (as the UI does), and the deployments in ``prefect.yaml`` checked against the
flows' parameter forms and the Kubernetes job template.

The run starts a real ``prefect server`` + MLflow server with ``kimivl up`` (``up_cmd``) on loopback ports,
serves the deployments with ``kimivl serve`` (``serve_cmd``) in a subprocess, triggers the pipeline flow's
deployment through the API, waits for Completed, checks the outputs on disk, in MLflow and in S3, then
stops serve before the servers (``down_cmd``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import typer
import yaml
from typer.testing import CliRunner

from tasks.io.manifest import read_manifest
from tests.integration._prefect_common import _artifact, _client
from tests.integration.conftest import ROOT, short_recipe, stop_process_group, subprocess_env

# ----------------------------------------------------------------------------------- real servers


def _ops_app() -> typer.Typer:
    from flows.cli.services import down_cmd, up_cmd

    app = typer.Typer()
    app.command("up")(up_cmd)
    app.command("down")(down_cmd)
    return app


SERVE_SCRIPT = (
    "import typer; from flows.cli.services import serve_cmd; app = typer.Typer(); "
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

    from flows.services import healthy
    from tasks.io import storage

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
        down = runner.invoke(_ops_app(), ["down", "--state-dir", str(state_dir)])  # serve first, then servers
        if serve is not None and serve.poll() is None:  # down failed to: clean up, the assertion says so
            stop_process_group(serve, timeout=30)
    assert down.exit_code == 0, down.output
    stopped = json.loads(down.stdout.strip().splitlines()[-1])["stopped"]
    assert stopped == {f"serve-{serve.pid}": True, "prefect": True, "mlflow": True}, stopped
    assert serve.wait(timeout=10) is not None and list(state_dir.glob("serve-*.json")) == []
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
