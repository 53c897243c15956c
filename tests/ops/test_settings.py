"""A missing or malformed setting stops every entry point at start with one line naming it.

Every case is a real process started as the Procfile (or the CLI, or `make run`) starts
it; they are started all at once by one fixture and each test reads its own outcome.
"""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from cli.procfile import procfile_lines
from tests.support import BIN, ROOT, free_port

STARTUP_TIMEOUT = 60

#: Every way the service is started: each Procfile line, the CLI and `make run`.
ENTRY_POINTS = {
    **{name: ["/bin/sh", "-c", command] for name, command in procfile_lines().items()},
    "cli": [str(BIN / "refunds"), "check-config"],
    "devstack": [str(BIN / "python"), "-m", "cli.devstack"],
}


def _start(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT,
        check=False,
    )


def _base_env(service_env: dict[str, str]) -> dict[str, str]:
    env = {**service_env, "PATH": f"{BIN}:/usr/bin:/bin", "PORT": str(free_port())}
    env["FLOWER_PORT"] = str(free_port())
    env.pop("CELERY_BROKER_URL", None)
    return env


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


MALFORMED = [(name, "STRIPE_MAX_RPS", "fast") for name in sorted(ENTRY_POINTS)]
NAMED = [
    ("worker", "DATABASE_URL", "mysql://root@localhost/refunds"),
    ("worker", "WORKER_METRICS_PORT", "99999"),
    ("web", "JWT_SECRET", "short"),
    ("web", "WEB_CONCURRENCY", "lots"),
    ("web", "LOG_LEVEL", "LOUD"),
    ("flower", "FLOWER_BASIC_AUTH", "admin"),
    ("flower", "FLOWER_BASIC_AUTH", None),  # unset
    # Malformed values that used to be accepted (issue 12).
    ("worker", "REDIS_URL", "bogus"),
    ("web", "REDIS_URL", "redis://localhost:port/0"),
    ("beat", "CELERY_BROKER_URL", "rabbit-at-localhost"),
    ("worker", "STRIPE_API_BASE", "not-a-url"),
    ("web", "JWT_JWKS_URL", "keys.example.com/jwks.json"),
    ("web", "REFUNDS_WRITE_SCOPE", ""),
    ("cli", "REFUNDS_READ_SCOPE", "refunds:read refunds:write"),
    ("beat", "RECONCILE_INTERVAL_SECONDS", "-60"),
    ("cli", "APP_ENV", "prod"),
]
Case = tuple[str, str, str | None]


@pytest.fixture(scope="module")
def outcomes(service_env: dict[str, str]) -> dict[Case, subprocess.CompletedProcess[str]]:
    def start(case: Case) -> subprocess.CompletedProcess[str]:
        entry_point, name, value = case
        env = _base_env(service_env)
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
        return _start(ENTRY_POINTS[entry_point], env)

    cases = [*MALFORMED, *NAMED]
    with ThreadPoolExecutor(6) as pool:
        return dict(zip(cases, pool.map(start, cases), strict=True))


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_a_malformed_setting_stops_every_entry_point_with_one_line(
    case: Case, outcomes: dict[Case, subprocess.CompletedProcess[str]]
) -> None:
    result = outcomes[case]
    assert result.returncode != 0
    assert _one_line(result).startswith("configuration error: STRIPE_MAX_RPS:")


@pytest.mark.parametrize("case", NAMED, ids=[f"{c[0]}-{c[1]}={c[2]}" for c in NAMED])
def test_each_setting_is_named_when_it_is_wrong_or_missing(
    case: Case, outcomes: dict[Case, subprocess.CompletedProcess[str]]
) -> None:
    result = outcomes[case]
    assert result.returncode != 0
    line = _one_line(result)
    assert line.startswith("configuration error:") and case[1] in line, line


def test_flower_says_it_never_runs_open(
    outcomes: dict[Case, subprocess.CompletedProcess[str]],
) -> None:
    assert _one_line(outcomes[("flower", "FLOWER_BASIC_AUTH", None)]) == (
        "configuration error: FLOWER_BASIC_AUTH: not set; Flower never runs open: "
        "set it to user:password"
    )
