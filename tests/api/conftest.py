"""Fixtures for the HTTP tests: a client on the run's gunicorn server and the API's
own OpenAPI document, against which answers are checked."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.api.helpers import Contract


@pytest.fixture
def client(api_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url, timeout=10) as c:
        yield c


@pytest.fixture(scope="session")
def contract(api_url: str) -> Contract:
    """The document the server publishes at /openapi.json."""
    resp = httpx.get(f"{api_url}/openapi.json", timeout=10)
    assert resp.status_code == 200, resp.text
    return Contract(resp.json())
