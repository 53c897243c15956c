"""GET /openapi.json (SPEC 3.6): valid OpenAPI 3.1, every endpoint, and consistent with
the seed's API page and with the request model the API actually enforces."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from pydantic import ValidationError

from api.openapi import build_document
from api.schemas import RefundCreate
from tests.api.helpers import REFUNDS, Contract
from tests.support import auth

# The seed's API page (admin-refunds-api-reference), as published.
SEED_REQUEST = {
    "type": "object",
    "properties": {
        "charge_id": {"type": "string", "minLength": 1},
        "amount_cents": {"type": "integer", "exclusiveMinimum": 0},
        "full": {"type": "boolean"},
        "reason": {"type": ["string", "null"]},
    },
    "required": ["charge_id"],
}
SEED_201 = {
    "type": "object",
    "properties": {
        "refund_id": {"type": "string"},
        "payment_id": {"type": "string"},
        "charge_id": {"type": ["string", "null"]},
        "amount_cents": {"type": "integer"},
        "status": {"type": "string"},
        "stripe_refund_id": {"type": "string"},
    },
    "required": [
        "refund_id",
        "payment_id",
        "charge_id",
        "amount_cents",
        "status",
        "stripe_refund_id",
    ],
}
SEED_ERROR_STATUSES = ("404", "409", "412", "422")

SPEC_ENDPOINTS = {
    ("post", "/v1/admin/refunds"),
    ("get", "/v1/admin/refunds"),
    ("get", "/v1/admin/refunds/{refund_id}"),
    ("post", "/v1/admin/refunds/{refund_id}/approve"),  # SPEC 12
    ("post", "/v1/admin/refunds/{refund_id}/reject"),
    ("post", "/v1/admin/refunds/{refund_id}/cancel"),
    ("post", "/v1/webhooks/stripe"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    # SPEC 13: refund events out
    ("post", "/v1/admin/webhook-endpoints"),
    ("get", "/v1/admin/webhook-endpoints"),
    ("get", "/v1/admin/webhook-endpoints/{endpoint_id}"),
    ("patch", "/v1/admin/webhook-endpoints/{endpoint_id}"),
    ("delete", "/v1/admin/webhook-endpoints/{endpoint_id}"),
    ("get", "/v1/admin/webhook-endpoints/{endpoint_id}/deliveries"),
    ("post", "/v1/admin/webhook-deliveries/{delivery_id}/retry"),
    ("post", "/v1/admin/webhook-endpoints/{endpoint_id}/rotate-secret"),
}


@pytest.fixture(scope="module")
def doc(contract: Contract) -> dict[str, Any]:
    return contract.document


def test_served_without_a_token_as_valid_openapi_3_1(api_url, contract) -> None:
    resp = httpx.get(f"{api_url}/openapi.json", timeout=10)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    document = resp.json()
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises on any violation of the OpenAPI 3.1 schema
    contract.check(resp, "GET", "/openapi.json")


def test_every_endpoint_of_spec_3_is_described(doc) -> None:
    described = {(m, p) for p, item in doc["paths"].items() for m in item}
    assert described == SPEC_ENDPOINTS
    ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


def test_request_schema_is_the_seeds_with_the_spec_limits(doc, contract) -> None:
    """The seed's one object, published as its two valid shapes (by amount, full), each
    closed to unknown fields and listing every property it takes."""
    op = doc["paths"][REFUNDS]["post"]
    assert op["requestBody"]["required"] is True
    schema = contract.resolve(op["requestBody"]["content"]["application/json"]["schema"])
    variants = {ref["$ref"].rsplit("/", 1)[1]: contract.resolve(ref) for ref in schema["oneOf"]}
    assert set(variants) == {"RefundByAmount", "FullRefund"}
    assert set().union(*(v["properties"] for v in variants.values())) == set(
        SEED_REQUEST["properties"]
    )
    for variant in variants.values():
        assert variant["type"] == "object"
        assert variant["additionalProperties"] is False  # SPEC 3.1
        assert "charge_id" in variant["required"]
        for name, prop in variant["properties"].items():
            for keyword, value in SEED_REQUEST["properties"][name].items():
                assert prop[keyword] == value, (name, keyword)
        assert variant["properties"]["charge_id"]["maxLength"] == 255
        assert variant["properties"]["reason"]["maxLength"] == 500
    by_amount, full = variants["RefundByAmount"], variants["FullRefund"]
    assert by_amount["required"] == ["charge_id", "amount_cents"]
    assert by_amount["properties"]["amount_cents"]["maximum"] == 2**53
    assert by_amount["properties"]["full"]["const"] is False
    assert full["required"] == ["charge_id", "full"]
    assert full["properties"]["full"]["const"] is True


def test_201_schema_has_exactly_the_seeds_fields(doc, contract) -> None:
    created = doc["paths"][REFUNDS]["post"]["responses"]["201"]
    schema = contract.resolve(created["content"]["application/json"]["schema"])
    assert list(schema["properties"]) == list(SEED_201["properties"])
    assert schema["required"] == SEED_201["required"]
    assert schema["additionalProperties"] is False
    for name, seed_property in SEED_201["properties"].items():
        assert schema["properties"][name]["type"] == seed_property["type"], name
    assert contract.resolve(created["headers"]["Location"])["required"] is True


@pytest.mark.parametrize(
    ("method", "path", "statuses"),
    [
        ("post", REFUNDS, ("401", "403", "404", "409", "412", "413", "422", "500", "503")),
        ("get", REFUNDS, ("401", "403", "422", "500", "503")),
        ("get", f"{REFUNDS}/{{refund_id}}", ("401", "403", "404", "500", "503")),
        ("post", "/v1/webhooks/stripe", ("400", "413", "500", "503")),
    ],
)
def test_error_answers_are_error_objects(doc, contract, method, path, statuses) -> None:
    responses = doc["paths"][path][method]["responses"]
    for status in statuses:
        response = contract.resolve(responses[status])
        schema = contract.resolve(response["content"]["application/json"]["schema"])
        assert schema["required"] == ["error", "message"], (path, status)
        assert set(schema["properties"]) == {"error", "message"}
    if path == REFUNDS and method == "post":
        assert set(SEED_ERROR_STATUSES) <= set(responses)
        unauthorized = contract.resolve(responses["401"])
        assert "WWW-Authenticate" in unauthorized["headers"]


def test_security_names_the_scopes_and_the_public_endpoints(doc, settings) -> None:
    scheme = doc["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"], scheme["bearerFormat"]) == ("http", "bearer", "JWT")
    assert settings.refunds_write_scope in scheme["description"]
    assert settings.refunds_read_scope in scheme["description"]
    paths = doc["paths"]
    assert paths[REFUNDS]["post"]["security"] == [{"bearerAuth": ["refunds:write"]}]
    assert paths[REFUNDS]["get"]["security"] == [{"bearerAuth": ["refunds:read"]}]
    assert paths[f"{REFUNDS}/{{refund_id}}"]["get"]["security"] == [
        {"bearerAuth": ["refunds:read"]}
    ]
    for path in ("/v1/webhooks/stripe", "/healthz", "/readyz", "/metrics", "/openapi.json"):
        for op in paths[path].values():
            assert op["security"] == [], path


def test_scope_names_follow_the_configuration(settings) -> None:
    custom = settings.model_copy(
        update={"refunds_write_scope": "payments:refund", "refunds_read_scope": "payments:audit"}
    )
    document = build_document(custom)
    assert document["paths"][REFUNDS]["post"]["security"] == [{"bearerAuth": ["payments:refund"]}]
    assert document["paths"][REFUNDS]["get"]["security"] == [{"bearerAuth": ["payments:audit"]}]


def test_request_id_and_idempotency_key_headers_are_described(doc, contract) -> None:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            names = {contract.resolve(p)["name"] for p in op.get("parameters", [])}
            assert "X-Request-Id" in names, (method, path)
            for status, response in op["responses"].items():
                headers = contract.resolve(response).get("headers", {})
                assert "X-Request-Id" in headers, (method, path, status)
    key = contract.resolve(doc["components"]["parameters"]["Idempotency-Key"])
    assert key["in"] == "header" and key["schema"]["maxLength"] == 255
    post_params = [contract.resolve(p)["name"] for p in doc["paths"][REFUNDS]["post"]["parameters"]]
    assert "Idempotency-Key" in post_params


def test_list_parameters_match_what_the_api_accepts(doc, contract) -> None:
    params = {
        contract.resolve(p)["name"]: contract.resolve(p)
        for p in doc["paths"][REFUNDS]["get"]["parameters"]
    }
    assert set(params) >= {"charge_id", "payment_id", "status", "limit", "cursor"}
    limit = params["limit"]["schema"]
    assert (limit["minimum"], limit["maximum"], limit["default"]) == (1, 100, 20)
    assert set(params["status"]["schema"]["enum"]) == {
        "awaiting_approval",
        "pending",
        "processing",
        "requires_action",
        "succeeded",
        "failed",
        "canceled",
    }


# --- the published request schema and the enforced model agree ---------------------------


def model_accepts(body: Any) -> bool:
    try:
        RefundCreate.model_validate_json(json.dumps(body))
    except ValidationError:
        return False
    return True


def schema_accepts(contract: Contract, body: Any) -> bool:
    return contract.schema_validator(
        contract.resolve(
            contract.operation("POST", REFUNDS)["requestBody"]["content"]["application/json"][
                "schema"
            ]
        )
    ).is_valid(body)


EXAMPLES = [
    {"charge_id": "ch_1", "amount_cents": 1},
    {"charge_id": "ch_1", "amount_cents": 2**53},
    {"charge_id": "ch_1", "amount_cents": 2**53 + 1},
    {"charge_id": "ch_1", "full": True},
    {"charge_id": "ch_1", "full": True, "reason": None},
    {"charge_id": "ch_1", "full": True, "reason": "r" * 500},
    {"charge_id": "ch_1", "full": True, "reason": "r" * 501},
    {"charge_id": "ch_1", "amount_cents": 5, "full": False},
    {"charge_id": "ch_1", "amount_cents": 5, "full": True},
    {"charge_id": "ch_1"},
    {"charge_id": "ch_1", "full": False},
    {"charge_id": "ch_1", "amount_cents": None, "full": True},
    {"charge_id": "ch_1", "amount_cents": "5"},
    {"charge_id": "ch_1", "amount_cents": 1.5},
    {"charge_id": "ch_1", "amount_cents": True},
    {"charge_id": "ch_1", "full": "yes"},
    {"charge_id": "", "full": True},
    {"charge_id": "c" * 255, "full": True},
    {"charge_id": "c" * 256, "full": True},
    {"charge_id": "ch_\u0000", "full": True},
    {"charge_id": "ch_\u007f", "full": True},
    {"charge_id": "ch_é", "full": True},
    {"charge_id": "ch_1", "full": True, "amount": 5},
    {"full": True},
    [],
    None,
    "ch_1",
]


@pytest.mark.parametrize("body", EXAMPLES, ids=[json.dumps(b)[:40] for b in EXAMPLES])
def test_published_request_schema_and_model_agree_on_examples(contract, body) -> None:
    assert schema_accepts(contract, body) == model_accepts(body)


json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-10, max_value=2**53 + 10),
    st.integers(min_value=2**53 - 2, max_value=2**53 + 2),
    # Not whole floats: JSON Schema calls 100.0 an integer, the API (SPEC 3.1) does not.
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()),
    st.text(max_size=8),
    st.text(min_size=254, max_size=256),
    st.text(min_size=499, max_size=502),
)
bodies = st.dictionaries(
    st.sampled_from(["charge_id", "amount_cents", "full", "reason", "amount", "extra"]),
    json_values,
) | st.fixed_dictionaries(
    {"charge_id": st.text(min_size=1, max_size=10)},
    optional={
        "amount_cents": st.integers(),
        "full": st.booleans(),
        "reason": st.none() | st.text(max_size=10),
    },
)


@hypothesis_settings(max_examples=300, database=None, deadline=None)
@given(body=bodies)
def test_published_request_schema_and_model_agree_on_any_body(contract, body) -> None:
    assert schema_accepts(contract, body) == model_accepts(body), body


# (A DEL byte never reaches the app: gunicorn refuses such a header itself.)
@pytest.mark.parametrize("key", ["a", "a b", "~!@#", "k" * 255, "k" * 256, "a\tb"])
def test_published_idempotency_key_schema_agrees_with_the_server(
    client, settings, contract, key
) -> None:
    published = contract.resolve(contract.document["components"]["parameters"]["Idempotency-Key"])
    schema_ok = contract.schema_validator(published["schema"]).is_valid(key)
    resp = client.post(
        REFUNDS,
        json={"charge_id": "ch_no_such_charge", "full": True},
        headers={**auth(settings), "Idempotency-Key": key},
    )
    assert resp.status_code == (404 if schema_ok else 422), resp.text
