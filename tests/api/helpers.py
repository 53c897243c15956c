"""Assertions shared by the HTTP tests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
from jsonschema import Draft202012Validator
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.domain.models import Refund

REFUNDS = "/v1/admin/refunds"
T = TypeVar("T")


def assert_error(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The documented status and a ``{"error", "message"}`` JSON body, nothing more."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error", "message"}, body
    assert body["error"] == code, body
    assert body["message"]
    return body


def refund_count(db: Session, payment_id: str) -> int:
    db.expire_all()
    return int(db.scalar(select(func.count()).where(Refund.payment_id == payment_id)) or 0)


def all_at_once(n: int, call: Callable[[int], T]) -> list[T]:
    """Run ``call(i)`` for i in 0..n-1 on n threads released together by a barrier, so
    the requests really overlap rather than trickle in one by one."""
    barrier = threading.Barrier(n)

    def run(i: int) -> T:
        barrier.wait(timeout=30)
        return call(i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(run, range(n)))


class Contract:
    """The published OpenAPI document, used to check live answers against it."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document

    def resolve(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            target: Any = self.document
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            node = target
        return node

    def operation(self, method: str, path: str) -> dict[str, Any]:
        return self.document["paths"][path][method.lower()]

    def schema_validator(self, schema: dict[str, Any]) -> Draft202012Validator:
        return Draft202012Validator({**schema, "components": self.document["components"]})

    def check(self, resp: httpx.Response, method: str, path: str) -> None:
        """The status is documented for the operation, and the body and required headers
        match what the document says for it."""
        responses = self.operation(method, path)["responses"]
        status = str(resp.status_code)
        assert status in responses, f"{method} {path} answered {status}, undocumented"
        spec = self.resolve(responses[status])
        media = resp.headers["content-type"].split(";")[0]
        assert media in spec["content"], f"{method} {path} {status} answered {media}"
        if media == "application/json":
            self.schema_validator(spec["content"][media]["schema"]).validate(resp.json())
        for name, header in spec.get("headers", {}).items():
            if self.resolve(header).get("required"):
                assert name in resp.headers, f"{method} {path} {status} lacks header {name}"
