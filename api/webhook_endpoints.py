"""Refund events out (SPEC 13): subscribers' endpoints, their delivery log and replay.

Thin views over ``shared.services.webhook_delivery``; every operation needs REFUNDS_ADMIN_SCOPE.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from flask import Blueprint, Response, g, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from api.auth import authenticate
from api.errors import ApiError, error_response
from api.schemas import CURSOR_MAX, LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX, NO_NUL_PATTERN, describe
from shared.adapters.celery_app import enqueue_webhook_delivery
from shared.adapters.config import get_settings
from shared.adapters.db import unit_of_work
from shared.domain.outbound_events import (
    ALL_EVENTS,
    DESCRIPTION_MAX,
    URL_MAX,
    UnsafeUrl,
    check_endpoint_url,
    event_types,
)
from shared.services import webhook_delivery

bp = Blueprint("webhook_endpoints", __name__, url_prefix="/v1/admin")
F = TypeVar("F", bound=Callable[..., Any])

EVENTS_MAX = 32
OVERLAP_MAX = 7 * 24 * 3600
DELIVERY_STATUSES = ("pending", "delivered", "failed")


def require_admin_scope(view: F) -> F:
    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        settings = get_settings()
        caller = authenticate(request.headers.get("Authorization"), settings)
        if settings.refunds_admin_scope not in caller.scopes:
            raise ApiError(
                403, f"The token lacks the '{settings.refunds_admin_scope}' scope this "
                     "endpoint needs."
            )
        g.caller = caller
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


Description = Annotated[str, Field(max_length=DESCRIPTION_MAX, pattern=NO_NUL_PATTERN)]
EventList = Annotated[list[str], Field(min_length=1, max_length=EVENTS_MAX)]


def _url(value: str) -> str:
    try:
        return check_endpoint_url(value, production=get_settings().is_production)
    except UnsafeUrl as exc:
        raise ValueError(str(exc)) from None


def _events(value: list[str] | None) -> list[str] | None:
    if value is None:
        return None
    known = {ALL_EVENTS, *event_types()}
    unknown = [name for name in value if name not in known]
    if unknown:
        raise ValueError(
            f"unknown event type {unknown[0][:60]!r}; use {', '.join(sorted(known))}"
        )
    return value


class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    url: Annotated[str, Field(min_length=1, max_length=URL_MAX)]
    events: EventList | None = None
    description: Description | None = None

    @field_validator("events", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("must not be null; leave the field out for every event type")
        return value

    _check_url = field_validator("url")(_url)
    _check_events = field_validator("events")(_events)


class EndpointUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    url: Annotated[str, Field(min_length=1, max_length=URL_MAX)] | None = None
    events: EventList | None = None
    description: Description | None = None
    enabled: bool | None = None

    @field_validator("url", "events", "enabled", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("must not be null; leave the field out instead")
        return value

    _check_url = field_validator("url")(_url)
    _check_events = field_validator("events")(_events)


class SecretRotation(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    overlap_seconds: Annotated[int, Field(ge=0, le=OVERLAP_MAX)] = (
        webhook_delivery.ROTATION_OVERLAP_SECONDS
    )


class DeliveryListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["pending", "delivered", "failed"] | None = None
    limit: Annotated[int, Field(ge=1, le=LIST_LIMIT_MAX)] = LIST_LIMIT_DEFAULT
    cursor: Annotated[str, Field(min_length=1, max_length=CURSOR_MAX)] | None = None


M = TypeVar("M", bound=BaseModel)


def _parse_body(model: type[M], example: str) -> M:
    raw = request.get_data(cache=False)
    try:
        body = model.model_validate_json(raw or b"null")
    except ValidationError as exc:
        if any(e["type"] in ("json_invalid", "model_type") for e in exc.errors()):
            raise ApiError(422, f"The body must be a JSON object, e.g. {example}.") from exc
        raise ApiError(422, describe(exc, model)) from exc
    repeated: list[str] = []

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        names = [name for name, _ in items]
        repeated.extend(sorted({name for name in names if names.count(name) > 1}))
        return dict(items)

    json.loads(raw, object_pairs_hook=pairs)
    if repeated:
        raise ApiError(422, f"{', '.join(repeated)}: give each field once.")
    return body


def _query(model: type[M]) -> M:
    args = request.args.to_dict(flat=False)
    repeated = sorted(name for name, values in args.items() if len(values) > 1)
    if repeated:
        raise ApiError(422, f"{', '.join(repeated)}: give each query parameter at most once.")
    try:
        return model.model_validate({name: values[0] for name, values in args.items()})
    except ValidationError as exc:
        raise ApiError(422, describe(exc, model)) from exc


@bp.post("/webhook-endpoints")
@require_admin_scope
def create_endpoint() -> Response:
    body = _parse_body(EndpointCreate, '{"url": "https://example.com/refund-events"}')
    with unit_of_work() as session:
        created = webhook_delivery.create_endpoint(
            session=session, url=body.url, events=body.events, description=body.description,
            production=get_settings().is_production,
        )
    response = jsonify(created)
    response.status_code = 201
    response.headers["Location"] = f"{bp.url_prefix}/webhook-endpoints/{created['id']}"
    return response


@bp.get("/webhook-endpoints")
@require_admin_scope
def list_endpoints() -> Response:
    _query(_NoQuery)
    with unit_of_work() as session:
        return jsonify(webhook_delivery.list_endpoints(session=session))


class _NoQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")


@bp.get("/webhook-endpoints/<path:endpoint_id>/deliveries")
@require_admin_scope
def list_deliveries(endpoint_id: str) -> Response:
    query = _query(DeliveryListQuery)
    with unit_of_work() as session:
        try:
            page = webhook_delivery.list_deliveries(
                session=session, endpoint_id=endpoint_id, **query.model_dump()
            )
        except webhook_delivery.InvalidCursor as exc:
            raise ApiError(422, "cursor: pass back a next_cursor this service returned.") from exc
    return jsonify(page)


@bp.get("/webhook-endpoints/<path:endpoint_id>")
@require_admin_scope
def get_endpoint(endpoint_id: str) -> Response:
    with unit_of_work() as session:
        return jsonify(webhook_delivery.get_endpoint(session=session, endpoint_id=endpoint_id))


@bp.patch("/webhook-endpoints/<path:endpoint_id>")
@require_admin_scope
def update_endpoint(endpoint_id: str) -> Response:
    body = _parse_body(EndpointUpdate, '{"enabled": true}')
    changes = body.model_dump(exclude_unset=True)
    if not changes:
        raise ApiError(422, "Give at least one of url, events, description, enabled.")
    with unit_of_work() as session:
        return jsonify(webhook_delivery.update_endpoint(
            session=session, endpoint_id=endpoint_id, changes=changes,
            production=get_settings().is_production,
        ))


@bp.post("/webhook-endpoints/<path:endpoint_id>/rotate-secret")
@require_admin_scope
def rotate_secret(endpoint_id: str) -> Response:
    if request.get_data(cache=True):
        body = _parse_body(SecretRotation, '{"overlap_seconds": 86400}')
    else:
        body = SecretRotation()
    with unit_of_work() as session:
        return jsonify(webhook_delivery.rotate_secret(
            session=session, endpoint_id=endpoint_id, overlap_seconds=body.overlap_seconds
        ))


@bp.delete("/webhook-endpoints/<path:endpoint_id>")
@require_admin_scope
def delete_endpoint(endpoint_id: str) -> Response:
    with unit_of_work() as session:
        webhook_delivery.delete_endpoint(session=session, endpoint_id=endpoint_id)
    return jsonify(id=endpoint_id, deleted=True)


@bp.post("/webhook-deliveries/<path:delivery_id>/retry")
@require_admin_scope
def retry_delivery(delivery_id: str) -> Response:
    with unit_of_work() as session:
        try:
            delivery = webhook_delivery.resend(
                session=session, delivery_id=delivery_id, requested_by=g.caller.subject
            )
        except webhook_delivery.EndpointDisabled as exc:
            return error_response(409, exc.code, exc.message)
    enqueue_webhook_delivery(delivery_id)
    response = jsonify(delivery)
    response.status_code = 202
    return response
