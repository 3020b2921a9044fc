"""The UI path as a user walks it (README "Team services"), in a real browser: Playwright for Python driving
the system's Chromium.

`kimivl up` -> `kimivl serve` -> the pipeline deployment's form in the Prefect UI (descriptions intact, one
typed parameter object) -> an out-of-range value refused -> a small valid run submitted from the form ->
Completed, its logs (threads per run) and evaluation artifact (no dead relative links) -> the stage form on
the phase that is now complete (no empty MLflow run; a rerun switch) -> from the tokens artifact's link to
the MLflow run page (loss, lineage tag, what the metrics mean, system metrics) and the experiment's runs
table -> `kimivl down` stops serve first and leaves no process behind.

Skipped, with the reason, where Playwright or a Chromium binary is missing (``scripts/install.sh`` installs
the system package when it can). On failure every open page is saved as a screenshot under
``test-artifacts/browser/`` (or ``$KIMIVL_TEST_ARTIFACTS``) and the path is in the failure message.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from tests.integration.conftest import ROOT, short_recipe, subprocess_env

PHASE = "text_pretrain"
pytestmark = pytest.mark.timeout(1200)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]


def _chromium() -> str | None:
    names = (os.environ.get("KIMIVL_CHROMIUM"), "chromium", "chromium-browser", "google-chrome")
    return next((shutil.which(n) for n in names if n and shutil.which(n)), None)


@pytest.fixture
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright is not installed (the dev extra has it: scripts/install.sh)"
    )
    exe = _chromium()
    if exe is None:
        pytest.skip(
            "no Chromium binary (chromium / chromium-browser / $KIMIVL_CHROMIUM): install the system package, "
            "e.g. `apt-get install chromium` (scripts/install.sh does so when it runs as root)"
        )
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        except sync_api.Error as e:
            pytest.skip(f"Chromium at {exe} does not start: {str(e)[:300]}")
        try:
            yield b
        finally:
            b.close()


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "kimivl"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "flows.cli"]


def _post(url: str, body: dict) -> list | dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


class Ui:
    """The Prefect UI's pages, as the user fills and reads them."""

    def __init__(self, page, base: str) -> None:
        self.page, self.base = page, base

    def prop(self, label: str):
        """The form property whose label is ``label`` (Prefect shows optional ones as 'X (Optional)')."""
        span = self.page.locator(
            "span.schema-form-property__label", has_text=re.compile(rf"^{re.escape(label)} \(Optional\)$")
        )
        return span.locator("xpath=ancestor::div[contains(concat(' ', @class, ' '), ' p-label ')][1]")

    def fill(self, label: str, value: str) -> None:
        box = self.prop(label)
        as_str = box.get_by_role("button", name="str", exact=True)  # an Optional[str]: leave "None"
        if as_str.count():
            as_str.click()
        box.locator("input:not([type=checkbox]), textarea").first.fill(value)

    def open_form(self, deployment_id: str) -> str:
        self.page.goto(f"{self.base}/deployments/deployment/{deployment_id}/run", wait_until="networkidle")
        self.page.get_by_text("Submit", exact=True).wait_for()
        return self.page.inner_text("body")

    def submit_and_open_run(self) -> str:
        """Submit; follow the toast's "View run" to the flow run page; returns the flow run id. (The toast
        keeps animating, which Playwright's click never sees as stable: the click event is dispatched.)"""
        self.page.get_by_role("button", name="Submit").click()
        view = self.page.get_by_text("View run").last
        view.wait_for(timeout=30_000)
        view.dispatch_event("click")
        self.page.wait_for_url(re.compile(r".*/runs/flow-run/[0-9a-f-]{36}"), timeout=60_000)
        return self.page.url.rstrip("/").split("/")[-1].split("?")[0]

    def wait_completed(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            body = self.page.inner_text("body")
            if re.search(r"\n(Failed|Crashed|Cancelled)\n", body):
                raise AssertionError(f"flow run ended badly:\n{body[:3000]}")
            if "\nCompleted\n" in body:
                return
            time.sleep(3)
            self.page.reload(wait_until="networkidle")
        raise AssertionError(f"flow run not Completed in {timeout_s:.0f} s")

    def wait_log(self, text: str, timeout_s: float = 120) -> None:
        """The run page loads its logs after its state: a Completed page may not show every line yet
        (seen once in CI). Poll, reloading, until the line is there."""
        deadline = time.monotonic() + timeout_s
        while True:
            body = self.page.inner_text("body")
            if text in body:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"log line {text!r} not shown in {timeout_s:.0f} s:\n{body[-3000:]}")
            time.sleep(2)
            self.page.reload(wait_until="networkidle")

    def tab(self, name: str) -> None:
        self.page.get_by_text(name, exact=True).first.click()
        self.page.wait_for_load_state("networkidle")


def _screenshots(browser, where: Path) -> list[str]:
    where.mkdir(parents=True, exist_ok=True)
    saved = []
    for i, ctx in enumerate(browser.contexts):
        for j, pg in enumerate(ctx.pages):
            path = where / f"page-{i}-{j}.png"
            try:
                pg.screenshot(path=str(path), full_page=True)
                (where / f"page-{i}-{j}.url").write_text(pg.url + "\n")
                saved.append(str(path))
            except Exception as e:  # a page that cannot be drawn must not hide the failure
                saved.append(f"{path}: not saved ({e})")
    return saved


def _descriptions(flow) -> list[str]:
    schema = flow.parameters.model_dump()
    return [f["description"] for d in schema["definitions"].values() for f in d["properties"].values()]


def _one_phase_recipe(path: Path) -> Path:
    raw = short_recipe().model_dump(mode="json", by_alias=True)
    raw["phases"] = [p for p in raw["phases"] if p["name"] == PHASE]
    raw["phases"][0]["token_budget"] = 1024
    raw["eval"]["points"] = [{"after": PHASE, "tasks": ["text_loss"]}]
    raw["eval"]["config"]["sizes"]["text_loss"] = 4
    path.write_text(yaml.safe_dump(raw))
    return path


def _tree(pid: int) -> list[int]:
    try:
        p = psutil.Process(pid)
        return [pid, *(c.pid for c in p.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_ui_path_in_a_real_browser(browser, tiny_data, tmp_path):
    artifacts = Path(os.environ.get("KIMIVL_TEST_ARTIFACTS") or ROOT / "test-artifacts") / "browser"
    shutil.rmtree(artifacts, ignore_errors=True)
    state, out, data = tmp_path / "services", tmp_path / "run", tmp_path / "data"
    shutil.copytree(tiny_data[0], data)  # the data steps find their outputs up to date
    recipe = _one_phase_recipe(tmp_path / "recipe.yaml")
    env = {**subprocess_env(), "COLUMNS": "80", "PREFECT_HOME": str(tmp_path / "prefect-client")}
    env.pop("MLFLOW_TRACKING_URI", None)
    up = subprocess.run(
        [*_cli(), "up", "--state-dir", str(state), "--prefect-port", "0", "--mlflow-port", "0"],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert up.returncode == 0, up.stderr[-3000:]
    services = json.loads(up.stdout.strip().splitlines()[-1])["services"]
    api, mlflow_uri = services["prefect"]["api_url"], services["mlflow"]["tracking_uri"]
    base = services["prefect"]["url"]
    # (2) the export hint is one line to paste, whatever the terminal width
    export = [ln for ln in up.stderr.splitlines() if ln.startswith("export ")]
    assert export == [f"export PREFECT_API_URL={api} MLFLOW_TRACKING_URI={mlflow_uri}"], up.stderr
    serve_log = tmp_path / "serve.log"
    with open(serve_log, "wb") as log:
        serve = subprocess.Popen(
            [*_cli(), "serve", "--state-dir", str(state), "--recipe", str(recipe), "--out", str(out)],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
        )  # fmt: skip
    watched: set[int] = {serve.pid, *(int(s["pid"]) for s in services.values())}
    try:
        _walk(browser, base, api, mlflow_uri, serve, serve_log, out, data, watched)
    except BaseException as e:
        shots = _screenshots(browser, artifacts)
        shutil.copy(serve_log, artifacts / "serve.log")
        raise AssertionError(f"{e}\nscreenshots: {shots}\nserve log: {artifacts / 'serve.log'}") from e
    finally:
        down = subprocess.run(
            [*_cli(), "down", "--state-dir", str(state)], env=env, capture_output=True, text=True, timeout=300
        )
        if serve.poll() is None:  # down did not stop it: clean up, and the assertions below say so
            serve.kill()
            serve.wait(timeout=10)
    # (9) down stopped serve first (with what it started), then the servers; nothing is left running
    assert down.returncode == 0, down.stderr
    stopped = json.loads(down.stdout.strip().splitlines()[-1])["stopped"]
    assert stopped == {f"serve-{serve.pid}": True, "prefect": True, "mlflow": True}, stopped
    assert serve.wait(timeout=30) is not None
    left = [p for p in watched if _running(p)]
    left += [p.pid for p in psutil.process_iter() if _cwd(p) and _cwd(p).startswith(str(tmp_path))]
    assert left == [], [psutil.Process(p).cmdline() for p in left if _running(p)]
    log_text = serve_log.read_text(errors="replace")
    assert "ConnectError" not in log_text and "Cancellation polling task failed" not in log_text, log_text[
        -3000:
    ]
    assert list(state.glob("serve-*.json")) == []


def _cwd(p: psutil.Process) -> str | None:
    try:
        return p.cwd()
    except (psutil.Error, OSError):
        return None


def _walk(browser, base, api, mlflow_uri, serve, serve_log: Path, out: Path, data: Path, watched) -> None:
    from mlflow import MlflowClient

    from flows.pipeline import pipeline_flow
    from flows.stage_flow import stage_flow

    deployments = _wait_for_deployments(api, serve, serve_log)
    # (1) serve says what each flow run gets; the form's run will log it
    started = json.loads(next(ln for ln in serve_log.read_text().splitlines() if ln.startswith("{")))
    threads = str(max(1, len(os.sched_getaffinity(0)) // 1))
    assert started["threads"] == {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    ui_line = f"(UI: {base}/deployments)"
    assert any(ln.endswith(ui_line) for ln in serve_log.read_text().splitlines()), serve_log.read_text()
    page = browser.new_context(viewport={"width": 1400, "height": 1600}).new_page()
    ui = Ui(page, base)

    # (3, 4) the pipeline form: every description as written, one typed "params" object, no untyped field
    body = ui.open_form(deployments["kimivl-pipeline"])
    for desc in _descriptions(pipeline_flow):
        assert desc in body, f"description not shown as written: {desc!r}"
    assert "$KIMIVL_ARTIFACT_URI/RUN_DIR_NAME" in body
    assert page.locator("span.schema-form-property__label", has_text=re.compile(r"^tracking ")).count() == 0
    assert ui.prop("params").count() == 1

    # (5) out of range: refused with the field and the reason, and no flow run is created
    runs_before = len(_post(f"{api}/flow_runs/filter", {}))
    ui.fill("Io Retries", "99")
    ui.fill("Data Dir", str(data))
    page.get_by_role("button", name="Submit").click()
    refused = page.get_by_text(re.compile(r"Validation failed for field 'params\.io_retries'.*maximum of 10"))
    refused.first.wait_for(timeout=30_000)
    assert len(_post(f"{api}/flow_runs/filter", {})) == runs_before

    # a valid run from the same form: Completed
    ui.fill("Io Retries", "1")
    run_id = ui.submit_and_open_run()
    watched.update(_tree(serve.pid))
    ui.wait_completed(timeout_s=600)
    # (1) the run trained with the thread count serve set for it
    ui.wait_log(f"[{PHASE}] training on cpu: 1 rank(s), {threads} CPU threads per rank")

    # (6) the evaluation artifact names the per-point report by its absolute path, no dead relative link
    ui.tab("Artifacts")
    page.get_by_text("kimivl-pipeline-eval", exact=True).first.click()
    report = out.resolve() / "eval" / PHASE / "report.md"
    page.get_by_text(str(report)).first.wait_for(timeout=30_000)
    hrefs = page.locator("a").evaluate_all("els => els.map(e => e.getAttribute('href') || '')")
    assert not [h for h in hrefs if h.endswith("report.md")], hrefs

    # (7) the stage form on the now complete phase: up to date, no empty MLflow run; a rerun switch
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("kimivl")
    mlflow_runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags.get("kimivl.role") for r in mlflow_runs) == ["phase", "pipeline"]
    body = ui.open_form(deployments["kimivl-stage"])
    for desc in _descriptions(stage_flow):
        assert desc in body, f"description not shown as written: {desc!r}"
    assert ui.prop("Rerun").count() == 1
    ui.fill("Stage", PHASE)
    ui.fill("Data Dir", str(data))
    ui.submit_and_open_run()
    ui.wait_completed(timeout_s=300)
    ui.wait_log(f"[{PHASE}] up to date: already complete")
    assert len(client.search_runs([exp.experiment_id])) == len(mlflow_runs)

    # (8) from the pipeline run's tokens artifact to the phase's MLflow run: loss, lineage, what they mean
    page.goto(f"{base}/runs/flow-run/{run_id}", wait_until="networkidle")
    ui.tab("Artifacts")
    page.get_by_text("kimivl-pipeline-tokens", exact=True).first.click()
    phase_run = next(r for r in mlflow_runs if r.data.tags.get("kimivl.role") == "phase")
    link = page.locator(f"a[href$='/runs/{phase_run.info.run_id}']")
    link.first.wait_for(timeout=30_000)
    page.goto(link.first.get_attribute("href"), wait_until="load")  # MLflow keeps polling: no networkidle
    page.get_by_text("kimivl.parent_checkpoint.hash").first.wait_for(timeout=60_000)
    body = page.inner_text("body")
    for expected in (
        "k = max(1, min(5, steps // 4))",  # the description: loss vs final_loss
        "system/cpu_utilization_percentage",  # MLflow's system metrics
        "final_loss",
        "kimivl.checkpoint.hash",
    ):
        assert expected in body, expected
    assert re.search(r"\nloss\n[0-9.]+\n", body), body[:3000]
    # the experiment's runs table, in MLflow's "Model training" view, lists the pipeline's parent run
    page.goto(mlflow_uri, wait_until="load")
    page.get_by_text("Model training", exact=True).first.click()
    page.get_by_role("link", name="kimivl", exact=True).first.click()
    parent = next(r for r in mlflow_runs if r.data.tags.get("kimivl.role") == "pipeline")
    page.get_by_role("link", name=parent.info.run_name).first.wait_for(timeout=60_000)
    watched.update(_tree(serve.pid))


def _wait_for_deployments(api: str, serve: subprocess.Popen, log: Path, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert serve.poll() is None, f"serve exited {serve.returncode}:\n{log.read_text()[-3000:]}"
        try:
            deps = _post(f"{api}/deployments/filter", {})
            flows = {f["id"]: f["name"] for f in _post(f"{api}/flows/filter", {})}
        except OSError:
            deps, flows = [], {}
        found = {flows.get(d["flow_id"]): d["id"] for d in deps}
        if {"kimivl-pipeline", "kimivl-stage", "kimivl-data"} <= set(found) and any(
            ln.startswith("{") for ln in log.read_text().splitlines()
        ):
            return found
        time.sleep(1)
    raise AssertionError(f"deployments not registered in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
