"""The console's "Events out" page: endpoints, failing deliveries and "send again"."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.domain.models import WebhookDelivery, WebhookDeliveryAttempt
from shared.services import webhook_delivery
from tests.events.conftest import Receiver, make_endpoint, make_refund
from tests.support import token


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no CSRF token on the page"
    return found.group(1)


@contextmanager
def signed_in(base: str, bearer: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, timeout=10) as client:
        page = client.get("/console/login")
        resp = client.post("/console/login",
                           data={"token": bearer, "csrf_token": csrf_of(page.text)})
        assert resp.status_code == 303, resp.text
        yield client


@pytest.fixture
def failing_delivery(edb: Session, receiver: Receiver) -> Iterator[str]:
    receiver.status = 500
    endpoint = make_endpoint(edb, receiver.url)
    make_refund(edb)
    webhook_delivery.dispatch_once(enqueue=lambda _: True)
    delivery_id = edb.scalar(select(WebhookDelivery.id)
                             .where(WebhookDelivery.endpoint_id == endpoint.id))
    webhook_delivery.deliver(delivery_id)
    yield delivery_id


def test_operators_see_endpoints_and_failing_deliveries_and_admins_send_again(
    events_web: str, settings, edb: Session, failing_delivery: str
) -> None:
    with signed_in(events_web, token(settings, scopes=("refunds:read", "refunds:admin"),
                                     sub="lead@example.com")) as admin:
        _send_again_as_admin(admin, edb, failing_delivery)


def _send_again_as_admin(admin: httpx.Client, edb: Session, failing_delivery: str) -> None:
    page = admin.get("/console/webhooks")
    assert page.status_code == 200
    assert failing_delivery in page.text and "HTTP 500" in page.text
    assert "Send again" in page.text and "failing" in page.text
    # Without the form's CSRF token: refused, nothing recorded.
    refused = admin.post(f"/console/webhooks/deliveries/{failing_delivery}/resend")
    assert refused.status_code == 400
    resp = admin.post(f"/console/webhooks/deliveries/{failing_delivery}/resend",
                      data={"csrf_token": csrf_of(page.text)})
    assert resp.status_code == 303
    edb.expire_all()
    delivery = edb.get(WebhookDelivery, failing_delivery)
    assert delivery.resend_requested_by == "lead@example.com"
    assert delivery.next_attempt_at is not None
    webhook_delivery.deliver(failing_delivery)
    requested = edb.scalars(select(WebhookDeliveryAttempt.requested_by)
                            .where(WebhookDeliveryAttempt.delivery_id == failing_delivery)
                            .order_by(WebhookDeliveryAttempt.id)).all()
    assert requested == [None, "lead@example.com"]


def test_reading_operators_see_no_send_again_and_cannot_post_it(
    events_web: str, settings, failing_delivery: str
) -> None:
    bearer = token(settings, scopes=("refunds:read", "refunds:write"))
    with signed_in(events_web, bearer) as reader:
        page = reader.get("/console/webhooks")
        assert page.status_code == 200 and failing_delivery in page.text
        assert "Send again" not in page.text
        resp = reader.post(f"/console/webhooks/deliveries/{failing_delivery}/resend",
                           data={"csrf_token": csrf_of(page.text)})
        assert resp.status_code == 403
