"""The Prefect flows: task states, "up to date" skips, transient-only retries, the tokens artifact, tracking
links, evaluation and export, run under ``prefect_test_harness`` (a temporary database and server, once per
session); and ``kimivl run`` rejecting a bad recipe before any work. The served deployments and
``prefect.yaml`` are tested in ``test_prefect_deployments.py``.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tasks.io.manifest import read_manifest
from tasks.tracking.base import RunTracking
from tests.integration._prefect_common import _artifact, _client
from tests.integration.conftest import short_recipe

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


class FakeMlflowTracking(RunTracking):
    """A tracking backend shaped like the MLflow one: a parent context, a tracker per phase (with a run id),
    hooks for the data summary and each phase's result (which returns the run's URL)."""

    def __init__(self) -> None:
        from tasks.tracking.local import MemoryTracker

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
    from flows.stage_flow import StageParams, stage_flow, tracking_backend

    tmp = tmp_path_factory.mktemp("stage-flow")
    recipe = _one_phase_recipe(tmp / "recipe.yaml")
    tracking = FakeMlflowTracking()
    params = StageParams(
        recipe_path=str(recipe), stage=PHASE, out_dir=str(tmp / "run"), data_dir=str(tiny_data[0])
    )
    with tracking_backend(tracking):
        state = stage_flow(params, return_state=True)
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
        f"| {PHASE} | {PHASE} | {tok['text']:,} | {tok['image']:,} | {tok['video']:,} | {tok['total']:,} "
        f"| text 100% | {steps} |" in table  # one share group: every token is 'text'
    )
    assert (
        res["tokens_by_group"] == {"text": tok["total"]}
        and sum(res["tokens_by_source"].values()) == tok["total"]
    )
    assert f"[run-{PHASE}](http://mlflow.invalid/#/runs/run-{PHASE})" in table


def test_pipeline_flow_skips_done_work_evaluates_and_exports(stage_run):
    from flows.pipeline import PipelineParams, pipeline_flow
    from flows.stage_flow import tracking_backend
    from tasks.io.weights import load_hf, load_native

    stage_params, _, _ = stage_run
    params = PipelineParams(
        recipe_path=stage_params.recipe_path, out_dir=stage_params.out_dir, data_dir=stage_params.data_dir
    )
    tracking = FakeMlflowTracking()
    with tracking_backend(tracking):
        state = pipeline_flow(params, return_state=True)
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
    with tracking_backend(again_tracking):
        again = pipeline_flow(params, return_state=True).result()
    assert sorted(again["export"]["up_to_date"]) == ["hf", "native"]
    assert f"eval:{PHASE}:up_to_date" in again_tracking.events
    assert again["eval"][PHASE]["summary"] == ev["summary"]


def test_stage_flow_up_to_date_opens_no_run_and_rerun_trains_again(stage_run):
    """A complete phase: no tracking run is opened (no empty MLflow run); ``rerun`` sets the phase
    directory aside (kept) and trains it again from its start."""
    from flows.stage_flow import stage_flow, tracking_backend

    params, _, _ = stage_run
    pdir = Path(params.out_dir) / "phases" / PHASE
    before = json.loads((pdir / "final" / "result.json").read_text())
    tracking = FakeMlflowTracking()
    with tracking_backend(tracking):
        (res,) = stage_flow(params)
    assert res["up_to_date"] is True and tracking.events == []
    tracking = FakeMlflowTracking()
    with tracking_backend(tracking):
        (res,) = stage_flow(params.model_copy(update={"rerun": True}))
    assert res["up_to_date"] is False and res["steps"] == before["steps"]
    assert tracking.events == ["pipeline:tiny:recipe.yaml", f"done:{PHASE}:run-{PHASE}", "pipeline:end"]
    (aside,) = pdir.parent.glob(f".{PHASE}.replaced-*")
    assert json.loads((aside / "final" / "result.json").read_text()) == before


def test_stage_flow_on_two_launched_processes_relays_rank0_tracking(prefect_harness, tiny_data, tmp_path):
    """`launch.nproc = 2`: the phase trains on two torchrun ranks; what rank 0 records reaches the flow's
    tracker (every step's metrics in order, params, tags, the final checkpoint); a global batch the ranks
    cannot split fails the flow before any work."""
    from flows.launched_phase import LaunchSettings
    from flows.stage_flow import StageParams, stage_flow, tracking_backend
    from tasks.tracking.local import JsonlTracker, TeeTracker

    raw = yaml.safe_load(_one_phase_recipe(tmp_path / "one.yaml").read_text())
    p = raw["phases"][0]
    p["micro_batches_per_step"] = 2
    p["token_budget"] = p["seq_len"] * 2 * 3  # 3 optimizer steps of 2 micro-batches (1 per rank)
    recipe = tmp_path / "dp2.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"

    def params(nproc: int) -> StageParams:
        return StageParams(
            recipe_path=str(recipe), stage=PHASE, out_dir=str(out), data_dir=str(tiny_data[0]),
            tracking="local", launch=LaunchSettings(nproc=nproc),
        )  # fmt: skip

    with tracking_backend(FakeMlflowTracking()):
        bad = stage_flow(params(3), return_state=True)
    assert bad.is_failed() and "phases.0.micro_batches_per_step" in str(bad.result(raise_on_failure=False))
    assert not out.exists()

    class TeeToPhaseDir(FakeMlflowTracking):  # the MLflow backend's shape: it also keeps metrics.jsonl
        @contextlib.contextmanager
        def phase(self, phase, phase_dir):
            with super().phase(phase, phase_dir) as t:
                yield TeeTracker(t, JsonlTracker(phase_dir))

    tracking = TeeToPhaseDir()
    with tracking_backend(tracking):
        state = stage_flow(params(2), return_state=True)
    assert state.is_completed(), state
    (res,) = state.result()
    pdir = out / "phases" / PHASE
    rows = [json.loads(line) for line in (pdir / "rank0" / PHASE / "metrics.jsonl").read_text().splitlines()]
    t = tracking.trackers[PHASE]
    assert res["steps"] >= 3 and [r["step"] for r in rows] == list(range(1, res["steps"] + 1))
    assert t.series("loss") == [(r["step"], r["loss"]) for r in rows]
    # relayed once each: the tracker's own metrics.jsonl in the phase directory is not read back
    mine = [json.loads(line) for line in (pdir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in mine] == [(r["step"], r["loss"]) for r in rows]
    assert t.series("tokens_total") == [(r["step"], r["tokens_total"]) for r in rows]
    assert t.params["phase.name"] == PHASE and t.params["phase.micro_batches_per_step"] == 2
    assert t.tags["phase"] == PHASE and t.artifacts == [(pdir / "final", f"{PHASE}-final")]
    assert res["mlflow_run_id"] == f"run-{PHASE}" and res["checkpoint"] == str(pdir / "final")
    assert (
        yaml.safe_load((pdir / "launch-recipe.yaml").read_text())["phases"][0]["micro_batches_per_step"] == 2
    )
