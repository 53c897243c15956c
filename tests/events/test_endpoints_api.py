"""/v1/admin/webhook-endpoints and the delivery log over HTTP, on a real gunicorn."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.domain.models import WebhookDelivery, WebhookEndpoint
from shared.services import webhook_delivery
from tests.events.conftest import Receiver, make_refund
from tests.support import auth

ENDPOINTS = "/v1/admin/webhook-endpoints"


@pytest.fixture
def admin(settings, events_env) -> dict[str, str]:
    return auth(settings, scopes=("refunds:admin",))


@pytest.fixture
def http(events_web: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=events_web, timeout=10) as client:
        yield client


def create(http: httpx.Client, admin: dict[str, str], **body: object) -> httpx.Response:
    return http.post(ENDPOINTS, headers=admin, json={"url": "https://example.com/hooks", **body})


def stored(db: Session) -> int:
    db.expire_all()
    return int(db.scalar(select(func.count()).select_from(WebhookEndpoint)) or 0)


def test_create_shows_the_secret_once_and_never_again(
    http: httpx.Client, admin: dict[str, str], edb: Session
) -> None:
    resp = create(http, admin, events=["refund.succeeded", "refund.failed"],
                  description="ledger")
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert resp.headers["Location"] == f"{ENDPOINTS}/{body['id']}"
    assert body["id"].startswith("we_") and body["enabled"] is True
    assert body["events"] == ["refund.failed", "refund.succeeded"]
    secret = body["secret"]
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) >= 24
    one = http.get(f"{ENDPOINTS}/{body['id']}", headers=admin)
    assert one.status_code == 200 and "secret" not in one.json()
    assert secret not in http.get(ENDPOINTS, headers=admin).text
    assert {k: v for k, v in one.json().items()} == {
        k: v for k, v in body.items() if k != "secret"}
    assert create(http, admin).json()["events"] == ["*"]


def test_update_and_delete(http: httpx.Client, admin: dict[str, str], edb: Session) -> None:
    endpoint_id = create(http, admin).json()["id"]
    resp = http.patch(f"{ENDPOINTS}/{endpoint_id}", headers=admin,
                      json={"url": "https://example.org/x", "events": ["refund.canceled"],
                            "description": None, "enabled": False})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["url"], body["events"], body["description"], body["enabled"]) == (
        "https://example.org/x", ["refund.canceled"], None, False)
    assert body["disabled_reason"] == "disabled by an operator"
    resp = http.patch(f"{ENDPOINTS}/{endpoint_id}", headers=admin, json={"enabled": True})
    assert resp.json()["enabled"] is True and resp.json()["disabled_reason"] is None
    resp = http.delete(f"{ENDPOINTS}/{endpoint_id}", headers=admin)
    assert resp.status_code == 200 and resp.json() == {"id": endpoint_id, "deleted": True}
    assert http.get(f"{ENDPOINTS}/{endpoint_id}", headers=admin).status_code == 404
    assert http.delete(f"{ENDPOINTS}/{endpoint_id}", headers=admin).status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "http://169.254.169.254/latest/meta-data/"}, "url"),
        ({"url": "http://2852039166/"}, "url"),  # 169.254.169.254 as one number
        ({"url": "http://0xa9fea9fe/"}, "url"),
        ({"url": "http://[fe80::1]/hook"}, "url"),
        ({"url": "http://[::ffff:169.254.169.254]/"}, "url"),
        ({"url": "http://metadata.google.internal/computeMetadata/v1/"}, "url"),
        ({"url": "ftp://example.com/"}, "url"),
        ({"url": "https://user:pw@example.com/"}, "url"),
        ({"url": "example.com/hooks"}, "url"),
        ({"url": "https://example.com:99999/"}, "url"),
        ({"url": 5}, "url"),
        ({}, "url"),
        ({"url": "https://example.com/", "events": ["refund.refunded"]}, "events"),
        ({"url": "https://example.com/", "events": []}, "events"),
        ({"url": "https://example.com/", "events": None}, "events"),
        ({"url": "https://example.com/", "description": "x" * 501}, "description"),
        ({"url": "https://example.com/", "secret": "whsec_mine"}, "secret"),
    ],
)
def test_bad_input_is_a_422_naming_the_field_and_nothing_is_stored(
    http: httpx.Client, admin: dict[str, str], edb: Session, body: dict, field: str
) -> None:
    before = stored(edb)
    resp = http.post(ENDPOINTS, headers=admin, json=body)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"] == "validation_error"
    assert resp.json()["message"].startswith(f"{field}:"), resp.json()
    assert stored(edb) == before


def test_update_refuses_a_forbidden_url_and_keeps_the_old_one(
    http: httpx.Client, admin: dict[str, str], edb: Session
) -> None:
    endpoint_id = create(http, admin).json()["id"]
    resp = http.patch(f"{ENDPOINTS}/{endpoint_id}", headers=admin,
                      json={"url": "http://169.254.169.254/"})
    assert resp.status_code == 422 and resp.json()["message"].startswith("url:")
    assert http.get(f"{ENDPOINTS}/{endpoint_id}", headers=admin).json()["url"] == (
        "https://example.com/hooks")
    for body in ({}, {"enabled": None}, {"enabled": "yes"}):
        assert http.patch(f"{ENDPOINTS}/{endpoint_id}", headers=admin,
                          json=body).status_code == 422


def test_https_is_required_in_production() -> None:
    from shared.domain.outbound_events import UnsafeUrl, check_endpoint_url

    assert check_endpoint_url("http://127.0.0.1:9000/x", production=False)
    with pytest.raises(UnsafeUrl, match="https://"):
        check_endpoint_url("http://hooks.example.com/x", production=True)
    assert check_endpoint_url("https://hooks.example.com/x", production=True)


def test_the_admin_scope_is_needed(http: httpx.Client, settings, events_env) -> None:
    assert http.get(ENDPOINTS).status_code == 401
    writer = auth(settings, scopes=("refunds:read", "refunds:write"))
    for method, path in (("GET", ENDPOINTS), ("POST", ENDPOINTS),
                         ("GET", f"{ENDPOINTS}/we_x/deliveries"),
                         ("POST", "/v1/admin/webhook-deliveries/whd_x/retry")):
        resp = http.request(method, path, headers=writer, json={"url": "https://e.com/"})
        assert resp.status_code == 403, (method, path)
        assert resp.json()["error"] == "forbidden"


def test_delivery_log_pages_newest_first_filters_and_sends_again(
    http: httpx.Client, admin: dict[str, str], edb: Session, receiver: Receiver
) -> None:
    endpoint_id = create(http, admin, events=["refund.created"]).json()["id"]
    edb.expire_all()
    edb.get(WebhookEndpoint, endpoint_id).url = receiver.url  # loopback, as set by a test
    edb.commit()
    for _ in range(5):
        make_refund(edb)
    # Delivered in this process (no worker in this module): 3 delivered, 2 failing.
    receiver.decide = lambda _: 200 if len(receiver.received) <= 3 else 500
    webhook_delivery.dispatch_once(enqueue=lambda _: True)
    edb.expire_all()
    for (delivery_id,) in edb.execute(select(WebhookDelivery.id)
                                      .where(WebhookDelivery.endpoint_id == endpoint_id)):
        webhook_delivery.deliver(delivery_id)
    page1 = http.get(f"{ENDPOINTS}/{endpoint_id}/deliveries?limit=2", headers=admin).json()
    assert len(page1["data"]) == 2 and page1["has_more"]
    page2 = http.get(f"{ENDPOINTS}/{endpoint_id}/deliveries",
                     params={"limit": 10, "cursor": page1["next_cursor"]}, headers=admin).json()
    everything = page1["data"] + page2["data"]
    assert len(everything) == 5 and not page2["has_more"]
    created = [d["created_at"] for d in everything]
    assert created == sorted(created, reverse=True)
    pending = http.get(f"{ENDPOINTS}/{endpoint_id}/deliveries?status=pending",
                       headers=admin).json()["data"]
    assert len(pending) == 2
    assert {d["last_status_code"] for d in pending} == {500}
    assert pending[0]["attempt_log"][0]["status_code"] == 500
    assert pending[0]["attempt_log"][0]["error"] == "HTTP 500"
    done = http.get(f"{ENDPOINTS}/{endpoint_id}/deliveries?status=delivered",
                    headers=admin).json()["data"]
    assert len(done) == 3
    resp = http.post(f"/v1/admin/webhook-deliveries/{done[0]['id']}/retry", headers=admin)
    assert resp.status_code == 202, resp.text
    assert resp.json()["status"] == "pending"
    for bad in ("status=lost", "limit=0", "cursor=nonsense", "extra=1"):
        resp = http.get(f"{ENDPOINTS}/{endpoint_id}/deliveries?{bad}", headers=admin)
        assert resp.status_code == 422, bad
    assert http.get(f"{ENDPOINTS}/we_nope/deliveries", headers=admin).status_code == 404
    resp = http.post("/v1/admin/webhook-deliveries/whd_nope/retry", headers=admin)
    assert resp.status_code == 404 and resp.json()["error"] == "not_found"


def test_a_rotated_secret_is_shown_once_and_both_verify_during_the_overlap(
    http: httpx.Client, admin: dict[str, str], edb: Session, receiver: Receiver
) -> None:
    from standardwebhooks import Webhook

    created = create(http, admin, events=["refund.created"]).json()
    endpoint_id, old_secret = created["id"], created["secret"]
    edb.expire_all()
    edb.get(WebhookEndpoint, endpoint_id).url = receiver.url
    edb.commit()
    resp = http.post(f"{ENDPOINTS}/{endpoint_id}/rotate-secret", headers=admin)
    assert resp.status_code == 200, resp.text
    new_secret = resp.json()["secret"]
    assert new_secret.startswith("whsec_") and new_secret != old_secret
    assert resp.json()["previous_secret_expires_at"] is not None
    assert "secret" not in http.get(f"{ENDPOINTS}/{endpoint_id}", headers=admin).json()

    def deliver_one() -> tuple[bytes, dict[str, str]]:
        receiver.received.clear()
        make_refund(edb)
        webhook_delivery.dispatch_once(enqueue=webhook_delivery.deliver)
        (got,) = receiver.received
        return got.body, got.headers

    body, headers = deliver_one()
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(new_secret).verify(body, headers)
    Webhook(old_secret).verify(body, headers)  # the subscriber has not switched yet
    # A leaked secret: rotated with no overlap, the old one stops at once.
    resp = http.post(f"{ENDPOINTS}/{endpoint_id}/rotate-secret", headers=admin,
                     json={"overlap_seconds": 0})
    newest = resp.json()["secret"]
    body, headers = deliver_one()
    Webhook(newest).verify(body, headers)
    with pytest.raises(Exception, match="No matching signature"):
        Webhook(new_secret).verify(body, headers)
    for bad in ({"overlap_seconds": -1}, {"overlap_seconds": "60"}, {"overlap": 60}):
        resp = http.post(f"{ENDPOINTS}/{endpoint_id}/rotate-secret", headers=admin, json=bad)
        assert resp.status_code == 422, bad
        assert resp.json()["message"].startswith(("overlap_seconds:", "overlap:"))
