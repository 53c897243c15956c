"""Every answer is JSON, errors included (SPEC 3): 404, 405, 413 on the run's server, and
503 on a gunicorn whose database and JWKS endpoint are unreachable, which is a real
failure, not a test-only code path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.api.helpers import REFUNDS, assert_error
from tests.support import auth, free_port, wait_for_http, web_process

ONE = f"{REFUNDS}/{{refund_id}}"


def test_unknown_paths_are_json_404(client, settings) -> None:
    for path in ("/nope", "/v1/admin", "/v1/admin/refunds/", "/v1/admin/refund", "/openapi.yaml"):
        resp = client.get(path, headers=auth(settings))
        assert_error(resp, 404, "not_found")
        assert resp.headers["X-Request-Id"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", REFUNDS),
        ("PUT", REFUNDS),
        ("PATCH", f"{REFUNDS}/rf_x"),
        ("POST", f"{REFUNDS}/rf_x"),
        ("GET", "/v1/webhooks/stripe"),
        ("POST", "/healthz"),
        ("POST", "/openapi.json"),
    ],
)
def test_wrong_methods_are_json_405_with_allow(client, settings, method, path) -> None:
    resp = client.request(method, path, headers=auth(settings))
    assert_error(resp, 405, "method_not_allowed")
    assert resp.headers["Allow"]


@pytest.mark.parametrize("path", [REFUNDS, "/v1/webhooks/stripe"])
def test_oversized_bodies_are_json_413(client, settings, contract, path) -> None:
    resp = client.post(
        path,
        content=b'{"charge_id": "' + b"x" * 100_000 + b'"}',
        headers={**auth(settings), "Content-Type": "application/json"},
    )
    assert_error(resp, 413, "request_too_large")
    contract.check(resp, "POST", path)


@pytest.mark.parametrize(
    "incoming",
    ["", "x" * 129, "with space\tand tab", "caf\u00e9"],
    ids=["empty", "long", "tab", "latin1"],
)
def test_unusable_request_ids_are_replaced_not_echoed(client, incoming) -> None:
    resp = client.get("/healthz", headers={"X-Request-Id": incoming.encode("latin-1")})
    assert resp.status_code == 200
    assert resp.headers["X-Request-Id"] and resp.headers["X-Request-Id"] != incoming


def test_request_id_is_echoed_on_errors_too(client) -> None:
    resp = client.post(REFUNDS, json={}, headers={"X-Request-Id": "trace-abc-123"})
    assert_error(resp, 401, "unauthorized")
    assert resp.headers["X-Request-Id"] == "trace-abc-123"


# --- a server whose dependencies are down ----------------------------------------------


@pytest.fixture(scope="module")
def broken_api(service_env: dict[str, str], log_dir: Path) -> Iterator[str]:
    """Nothing listens on the database's or the JWKS endpoint's port."""
    env = service_env | {
        "DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/refunds_absent",
        "JWT_JWKS_URL": f"http://127.0.0.1:{free_port()}/.well-known/jwks.json",
    }
    web, url = web_process(env, log_dir, workers=1)
    with web:
        wait_for_http(f"{url}/healthz", proc=web.proc)
        yield url


@pytest.mark.parametrize(
    ("method", "path", "template"),
    [
        ("GET", REFUNDS, REFUNDS),
        ("GET", f"{REFUNDS}/rf_000000000000000000000000", ONE),
        ("POST", REFUNDS, REFUNDS),
    ],
)
def test_a_database_outage_is_a_json_503_without_internals(
    broken_api, settings, contract, method, path, template
) -> None:
    resp = httpx.request(
        method,
        f"{broken_api}{path}",
        json={"charge_id": "ch_x", "full": True} if method == "POST" else None,
        headers={**auth(settings), "X-Request-Id": "req-for-support-42"},
        timeout=20,
    )
    assert_error(resp, 503, "unavailable")
    assert resp.headers["Retry-After"] == "2"
    assert resp.headers["X-Request-Id"] == "req-for-support-42"  # something to quote
    contract.check(resp, method, template)
    lowered = resp.text.lower()
    for leak in ("traceback", "psycopg", "operationalerror", "postgres", "127.0.0.1", "sqlalchemy"):
        assert leak not in lowered, leak


def test_readyz_says_which_dependency_is_down(broken_api, contract) -> None:
    resp = httpx.get(f"{broken_api}/readyz", timeout=20)
    assert resp.status_code == 503
    assert resp.json()["error"] == "unavailable" and "database" in resp.json()["down"]
    contract.check(resp, "GET", "/readyz")


def test_unreachable_token_keys_are_503_not_401(broken_api, contract) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(
        {"sub": "ops", "scope": "refunds:read", "exp": 2_000_000_000},
        key,
        algorithm="RS256",
        headers={"kid": "any"},
    )
    resp = httpx.get(
        f"{broken_api}{REFUNDS}", headers={"Authorization": f"Bearer {token}"}, timeout=20
    )
    assert_error(resp, 503, "unavailable")
    contract.check(resp, "GET", REFUNDS)
