"""Contract fuzzing: schemathesis against the service's own ``/openapi.json``.

Every operation the running server publishes is fuzzed, with schema-valid requests
(``positive``) and requests that break the schema (``negative``), on a gunicorn with
real Postgres, Redis, a Celery worker and the Stripe emulator, with a token holding
every scope. Positive bodies name real charges half of the time, and refund paths
real refunds, so requests reach past "not found" into the money rules, the worker
and Stripe.

Checks on every answer:
- no 5xx (``not_a_server_error``), status, content type, headers and body as the
  document says for that operation and status;
- a request that breaks the schema is refused with a 4xx (``negative_data_rejection``),
  and an operation declaring a token refuses one without it (``ignored_auth``);
- every error is ``{"error", "message"}`` JSON (SPEC 3);
- a request the schema allows is never refused as ``validation_error``: the
  document and the request models agree. (The service's business refusals are 422
  too, with their own codes, which is why schemathesis' ``positive_data_acceptance``
  does not apply as it stands.)

``make test`` runs FUZZ_EXAMPLES (default 25) examples per operation and mode;
``make test-long`` runs FUZZ_EXAMPLES=1000.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as given_settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS as REGISTRY
from schemathesis.checks import CheckContext, load_all_checks
from schemathesis.core.transport import Response
from schemathesis.generation.case import Case

from tests.chaos.stack import Pipeline
from tests.support import auth

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
# `make test` replays the same examples every run (deterministic); a longer run set with
# FUZZ_EXAMPLES explores new ones each time.
FUZZ_DERANDOMIZE = "FUZZ_EXAMPLES" not in os.environ
#: Every operation the service publishes; a new one must be added here, so it is fuzzed.
OPERATIONS = {
    "POST /v1/admin/refunds", "GET /v1/admin/refunds", "GET /v1/admin/refunds/{refund_id}",
    "POST /v1/admin/refunds/{refund_id}/approve", "POST /v1/admin/refunds/{refund_id}/reject",
    "POST /v1/admin/refunds/{refund_id}/cancel",
    "POST /v1/webhooks/stripe", "GET /healthz", "GET /readyz", "GET /metrics",
    "GET /openapi.json",
    # SPEC 13: refund events out
    "POST /v1/admin/webhook-endpoints", "GET /v1/admin/webhook-endpoints",
    "GET /v1/admin/webhook-endpoints/{endpoint_id}",
    "PATCH /v1/admin/webhook-endpoints/{endpoint_id}",
    "DELETE /v1/admin/webhook-endpoints/{endpoint_id}",
    "GET /v1/admin/webhook-endpoints/{endpoint_id}/deliveries",
    "POST /v1/admin/webhook-deliveries/{delivery_id}/retry",
    "POST /v1/admin/webhook-endpoints/{endpoint_id}/rotate-secret",
}
#: Operations a request can break the schema of (a body, a bounded parameter, a token);
#: the others take nothing but free-form string headers.
BREAKABLE = OPERATIONS - {"GET /healthz", "GET /readyz", "GET /metrics", "GET /openapi.json"}
REFUNDS = "/v1/admin/refunds"
WEBHOOK_ENDPOINTS = "/v1/admin/webhook-endpoints"
#: The token every fuzzed request carries: every scope an operation may need.
SCOPES = ("refunds:read", "refunds:write", "refunds:approve", "refunds:admin")


@schemathesis.check
def errors_are_json_error_bodies(ctx: CheckContext, response: Response, case: Case) -> bool:
    """SPEC 3: every error body is ``{"error": code, "message": sentence}``, JSON."""
    if response.status_code < 400:
        return True
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.startswith("application/json"), f"error answered as {content_type!r}"
    body = json.loads(response.content)
    assert isinstance(body, dict), body
    expected = {"error", "message", "down"} if case.path == "/readyz" else {"error", "message"}
    assert set(body) <= expected and {"error", "message"} <= set(body), body
    assert isinstance(body["error"], str) and body["error"], body
    assert isinstance(body["message"], str) and body["message"], body
    return True


@schemathesis.check
def schema_valid_requests_pass_validation(
    ctx: CheckContext, response: Response, case: Case
) -> bool:
    """A request the published schema allows is not refused as malformed. A cursor is
    opaque: one this service did not make is refused, whatever its spelling."""
    if response.status_code != 422:
        return True
    body = json.loads(response.content)
    if body["error"] != "validation_error":
        return True  # a business rule (amount_exceeds_refundable, idempotency_key_reused)
    if case.path.startswith(WEBHOOK_ENDPOINTS) and case.method in ("POST", "PATCH"):
        # Where a URL points (https in production, never link-local or metadata
        # addresses) is checked beyond what a schema can say.
        assert body["message"].startswith("url:"), f"schema-valid request refused: {body}"
        return True
    lists = (case.path == REFUNDS
             or case.path == f"{WEBHOOK_ENDPOINTS}/{{endpoint_id}}/deliveries")
    assert lists and case.method == "GET" and body["message"].startswith(
        "cursor:"), f"schema-valid request refused: {body['message']}"
    return True


def _check(name: str) -> Any:
    load_all_checks()
    return REGISTRY.get_one(name)


BUILT_IN = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
            "response_headers_conformance", "response_schema_conformance",
            "negative_data_rejection", "missing_required_header", "ignored_auth"]


def plain_integers(case: Case) -> Case:
    """JSON Schema counts ``100.0`` as an integer; SPEC 3.1 does not (types are strict),
    and no JSON Schema keyword can say so. Clients write integers as integers."""
    if isinstance(case.body, dict):
        for name in ("amount_cents", "overlap_seconds"):
            value = case.body.get(name)
            if isinstance(value, float) and value.is_integer():
                case.body[name] = int(value)
    return case


def with_real_ids(case: Case, charge_id: str | None, refund_id: str | None) -> Case:
    if charge_id is not None and isinstance(case.body, dict) and "charge_id" in case.body:
        case.body["charge_id"] = charge_id
    if refund_id is not None and case.path_parameters and "refund_id" in case.path_parameters:
        case.path_parameters["refund_id"] = refund_id
    return case


#: A request that breaks the schema may be refused by the HTTP server itself: a query
#: or header too long for it is a 414 or 431 (documented on every operation).
REJECTIONS = ["400", "401", "403", "404", "405", "406", "409", "413", "414", "415", "422",
              "428", "429", "431", "5xx"]


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_pipeline: Pipeline) -> Any:
    config = schemathesis.Config.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": REJECTIONS}}})
    return schemathesis.openapi.from_url(f"{fuzz_pipeline.api_url}/openapi.json", config=config)


@pytest.fixture(scope="module")
def real_refunds(fuzz_pipeline: Pipeline, fuzz_charges: list[str], settings) -> list[str]:
    """A few refunds made through the API, for GETs to find."""
    ids = []
    for charge_id in fuzz_charges[:3]:
        resp = httpx.post(f"{fuzz_pipeline.api_url}{REFUNDS}", headers=auth(settings),
                          json={"charge_id": charge_id, "amount_cents": 100}, timeout=30)
        assert resp.status_code == 201, resp.text
        ids.append(resp.json()["refund_id"])
    return ids


@pytest.fixture(scope="module")
def tally() -> Counter[str]:
    counts: Counter[str] = Counter()
    yield counts
    print(f"\nfuzz: {sum(v for k, v in counts.items() if k.startswith('examples'))} examples, "
          f"answers {dict(sorted((k, v) for k, v in counts.items() if k.startswith('status')))}")


def test_every_published_operation_is_fuzzed(fuzz_schema) -> None:
    paths = fuzz_schema.raw_schema["paths"]
    published = {f"{method.upper()} {path}" for path, item in paths.items() for method in item}
    assert published == OPERATIONS


@pytest.mark.parametrize(
    ("label", "mode"),
    [(label, GenerationMode.POSITIVE) for label in sorted(OPERATIONS)]
    + [(label, GenerationMode.NEGATIVE) for label in sorted(BREAKABLE)],
)
def test_operation_keeps_its_contract(
    fuzz_schema, fuzz_pipeline, fuzz_charges, real_refunds, settings, tally, label, mode
) -> None:
    operation = fuzz_schema.find_operation_by_label(label)
    checks = [_check(name) for name in BUILT_IN] + [errors_are_json_error_bodies]
    if mode is GenerationMode.POSITIVE:
        checks.append(schema_valid_requests_pass_validation)
    # Every scope: approve and reject reach past 403 (the refunds' initiator is another
    # caller, so a decision is taken, or refused as 409, as the refund's state says), and
    # the webhook endpoints' operations too.
    headers = auth(settings, sub="fuzzer@example.com", scopes=SCOPES)
    real = mode is GenerationMode.POSITIVE
    cases = st.builds(
        with_real_ids,
        operation.as_strategy(generation_mode=mode).map(plain_integers),
        st.one_of(st.none(), st.sampled_from(fuzz_charges)) if real else st.none(),
        st.one_of(st.none(), st.sampled_from(real_refunds)) if real else st.none(),
    )

    @given(case=cases)
    @given_settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                    derandomize=FUZZ_DERANDOMIZE, suppress_health_check=list(HealthCheck))
    def fuzz(case: Case) -> None:
        response = case.call_and_validate(
            base_url=fuzz_pipeline.api_url, headers=headers, checks=checks, timeout=30
        )
        tally[f"examples {label} {mode}"] += 1
        tally[f"status {response.status_code}"] += 1

    fuzz()
