"""Production refuses public development values and open doors (SPEC 8 "Production").

Production is ``APP_ENV=production`` or a live Stripe key. Every entry point (each
Procfile line and the CLI) must stop at start, naming the setting, and
``refunds check-config`` must give the same verdict. Before this check existed every
case below started happily on the defaults published in the README.
"""

from __future__ import annotations

import secrets
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.ops.test_settings import ENTRY_POINTS, _base_env, _one_line, _start


def _good(service_env: dict[str, str]) -> dict[str, str]:
    """A production setup with nothing wrong: every case breaks one thing in it."""
    env = _base_env(service_env)
    env.pop("STRIPE_API_BASE", None)
    env.update(
        APP_ENV="production",
        STRIPE_API_KEY=f"sk_live_{secrets.token_hex(12)}",
        JWT_SECRET=secrets.token_hex(32),
        CONSOLE_SECRET_KEY=secrets.token_hex(32),
        STRIPE_WEBHOOK_SECRET=f"whsec_{secrets.token_hex(16)}",
        METRICS_TOKEN=secrets.token_hex(24),
        FLOWER_BASIC_AUTH=f"ops:{secrets.token_hex(12)}",
    )
    return env


UNSET = None
#: (setting, value or UNSET, extra settings): each is refused in production.
REFUSED = [
    ("JWT_SECRET", UNSET, {}),
    ("JWT_SECRET", "dev-only-insecure-jwt-secret-change-me", {}),
    ("JWT_SECRET", "dev-only-insecure-jwt-secret-change-me",
     {"JWT_JWKS_URL": "https://keys.example.com/jwks.json"}),
    ("CONSOLE_SECRET_KEY", UNSET, {}),
    ("CONSOLE_SECRET_KEY", "dev-only-insecure-console-secret-change-me", {}),
    ("STRIPE_WEBHOOK_SECRET", UNSET, {}),
    ("STRIPE_WEBHOOK_SECRET", "whsec_local", {}),
    ("STRIPE_API_BASE", "http://stripe-emulator:12111", {}),
    ("STRIPE_API_BASE", "https://api.stripe.com.evil.example", {}),
    ("FLOWER_BASIC_AUTH", "admin:admin", {}),
    ("METRICS_TOKEN", UNSET, {}),
    ("METRICS_TOKEN", "", {}),
    # A live key with a test-mode setup, and the reverse.
    ("APP_ENV", "development", {}),
    ("STRIPE_API_KEY", "sk_test_not_for_production", {}),
]
Case = tuple[str, str | None, dict[str, str]]


def _case_id(case: Case) -> str:
    name, value, extra = case
    shown = "unset" if value is None else value[:20]
    return f"{name}={shown}" + ("+" + ",".join(extra) if extra else "")


def _env(service_env: dict[str, str], case: Case) -> dict[str, str]:
    name, value, extra = case
    env = {**_good(service_env), **extra}
    if value is None:
        env.pop(name, None)
    else:
        env[name] = value
    return env


@pytest.fixture(scope="module")
def cli_outcomes(service_env: dict[str, str]) -> dict[str, subprocess.CompletedProcess[str]]:
    cases = {_case_id(c): _env(service_env, c) for c in REFUSED}
    cases["good"] = _good(service_env)
    cases["good-jwks"] = {
        **_good(service_env), "JWT_JWKS_URL": "https://keys.example.com/jwks.json"
    }
    cases["good-jwks"].pop("JWT_SECRET")
    cases["live-key-only"] = {**_good(service_env)}
    cases["live-key-only"].pop("APP_ENV")
    with ThreadPoolExecutor(6) as pool:
        results = pool.map(lambda env: _start(ENTRY_POINTS["cli"], env), cases.values())
        return dict(zip(cases, results, strict=True))


@pytest.mark.parametrize("case", REFUSED, ids=_case_id)
def test_check_config_refuses_each_unsafe_production_setting_naming_it(
    case: Case, cli_outcomes: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    result = cli_outcomes[_case_id(case)]
    assert result.returncode != 0
    line = _one_line(result)
    assert line.startswith("configuration error: ") and f"{case[0]}:" in line, line
    assert "production" in line


@pytest.mark.parametrize("name", ["good", "good-jwks", "live-key-only"])
def test_check_config_accepts_a_complete_production_setup(
    name: str, cli_outcomes: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    result = cli_outcomes[name]
    assert result.returncode == 0, result.stdout + result.stderr
    assert _one_line(result).startswith("configuration ok for production")


def test_the_problems_are_all_named_on_one_line_and_no_secret_is_printed(
    service_env: dict[str, str],
) -> None:
    env = _good(service_env)
    for name in ("JWT_SECRET", "CONSOLE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET", "METRICS_TOKEN"):
        env.pop(name)
    live_key = env["STRIPE_API_KEY"]
    line = _one_line(_start(ENTRY_POINTS["cli"], env))
    for name in ("JWT_SECRET", "CONSOLE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET", "METRICS_TOKEN"):
        assert f"{name}:" in line
    assert live_key not in line and env["FLOWER_BASIC_AUTH"] not in line


@pytest.mark.parametrize("entry_point", sorted(set(ENTRY_POINTS) - {"devstack"}))
def test_every_process_refuses_to_start_on_a_public_secret_in_production(
    entry_point: str, service_env: dict[str, str]
) -> None:
    env = _good(service_env)
    env["JWT_SECRET"] = "dev-only-insecure-jwt-secret-change-me"
    result = _start(ENTRY_POINTS[entry_point], env)
    assert result.returncode != 0
    line = _one_line(result)
    assert line.startswith("configuration error: JWT_SECRET: is the public development default")
