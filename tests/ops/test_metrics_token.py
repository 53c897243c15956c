"""/metrics answers only ``Authorization: Bearer $METRICS_TOKEN`` when the token is set
(SPEC 3.5), on the web port and on a worker's metrics port alike.

These failed before METRICS_TOKEN existed: both answered anyone, and the web's
answer ran its Postgres queries for every scrape.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from shared.adapters.metrics import start_worker_metrics_server
from tests.support import free_port, wait_for_http, web_process

TOKEN = "metrics-token-for-the-tests-0123456789"


def _assert_refused(resp: httpx.Response) -> None:
    assert resp.status_code == 401, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json()["error"] == "unauthorized" and "METRICS_TOKEN" in resp.json()["message"]
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert "refunds_" not in resp.text


WRONG = [None, "Bearer not-the-token", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer"]


@pytest.fixture(scope="module")
def guarded_web(service_env: dict[str, str], log_dir: Path):
    web, url = web_process({**service_env, "METRICS_TOKEN": TOKEN}, log_dir, workers=1)
    with web:
        wait_for_http(f"{url}/healthz", proc=web.proc)
        yield url


@pytest.mark.parametrize("authorization", WRONG)
def test_web_metrics_refuse_a_scrape_without_the_token(guarded_web: str, authorization) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    _assert_refused(httpx.get(f"{guarded_web}/metrics", headers=headers, timeout=10))


def test_web_metrics_answer_the_token(guarded_web: str) -> None:
    resp = httpx.get(
        f"{guarded_web}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    )
    assert resp.status_code == 200
    assert "refunds_open{" in resp.text and "refunds_db_metrics_up 1.0" in resp.text


def test_the_other_service_endpoints_need_no_token(guarded_web: str) -> None:
    assert httpx.get(f"{guarded_web}/healthz", timeout=10).status_code == 200
    assert httpx.get(f"{guarded_web}/openapi.json", timeout=10).status_code == 200


def test_a_workers_metrics_port_takes_the_same_token() -> None:
    port = free_port()
    assert start_worker_metrics_server(port, "127.0.0.1", token=TOKEN)
    url = f"http://127.0.0.1:{port}/metrics"
    for authorization in WRONG:
        headers = {"Authorization": authorization} if authorization else {}
        _assert_refused(httpx.get(url, headers=headers, timeout=10))
    resp = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert resp.status_code == 200 and "refunds_worker_tasks_total" in resp.text
