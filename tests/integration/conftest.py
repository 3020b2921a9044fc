"""Shared, session-scoped artifacts: a small tiny-recipe corpus and one full run of a shortened recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tasks.data.pipeline import DataRecipe, run_data_all
from tasks.data.synth import SynthConfig
from tasks.recipe import Recipe, recipe_from_dict
from tests.integration.s3_server import s3_server  # noqa: F401  (session fixture: a real SeaweedFS on loopback)

ROOT = Path(__file__).resolve().parents[2]

SMALL_DATA = DataRecipe(
    synth=SynthConfig(
        caption=48, grounding=24, ocr=24, chart_qa=16, doc_qa=16, interleaved=16, video_qa=12,
        video_haystack=2, long_doc=3, text=48, sft=24, cot=24, long_doc_words=800,
    )
)  # fmt: skip

# phase -> (seq_len, token_budget): the tiny recipe's phases, shortened for tests
SHORT = {
    "text_pretrain": (512, 8192),
    "vit": (512, 6000),
    "align": (512, 2048),
    "joint_pretrain": (512, 8192),
    "cooldown": (512, 4096),
    "long_context.1": (1024, 2048),
    "long_context.2": (2048, 4096),
    "sft.1": (1024, 3072),
    "sft.2": (2048, 4096),
    "cot_sft": (1024, 3072),
}


def short_recipe(**train_overrides) -> Recipe:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"] = SMALL_DATA.model_dump(mode="json", by_alias=True)
    raw["train"].update({"checkpoint_every_steps": 4, **train_overrides})
    for p in raw["phases"]:
        p["seq_len"], p["token_budget"] = SHORT[p["name"]]
    return recipe_from_dict(raw, "short-recipe")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("tiny-data")
    summary = run_data_all(SMALL_DATA, root, log=lambda *_: None)
    return root, summary


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect database + API server for the whole session (flows run against it)."""
    # isort: off
    import flows.prefect_common  # noqa: F401  (environment defaults before Prefect starts a server)
    from prefect.testing.utilities import prefect_test_harness

    # isort: on

    with prefect_test_harness(server_startup_timeout=180):
        yield


from flows.launch_settings import DIST_ENV  # noqa: E402  (the launcher's variables)


def subprocess_env() -> dict[str, str]:
    """This process's environment without Prefect settings and without the torch.distributed variables
    that in-process training tests leave behind (a child would read them as a launcher's and try to join
    this process's group)."""
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k not in DIST_ENV}


@pytest.fixture(scope="session")
def prefect_api_env(prefect_harness) -> dict[str, str]:
    """An environment for subprocesses that run flows against the session's Prefect test server."""

    from prefect.settings import PREFECT_API_URL

    env = subprocess_env()
    env.update({"PREFECT_API_URL": str(PREFECT_API_URL.value()), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    return env


def stop_process_group(proc, timeout: float = 15.0) -> None:
    """SIGTERM the process group a test started (``start_new_session=True``), SIGKILL it if it has not
    exited within ``timeout`` seconds, and reap it."""
    import contextlib
    import os
    import signal
    import subprocess

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
