"""Metrics of refund events out: outcomes, attempt latency, and per endpoint the age of
the oldest undelivered event (the alert)."""

from __future__ import annotations

import re

from prometheus_client import REGISTRY
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.adapters import metrics
from shared.domain.models import WebhookDelivery
from shared.services import refund_gauges, webhook_delivery
from tests.events.conftest import Receiver, make_endpoint, make_refund


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_outcomes_latency_and_oldest_undelivered_age(edb: Session, receiver: Receiver) -> None:
    receiver.status = 500
    endpoint = make_endpoint(edb, receiver.url)
    make_refund(edb)
    webhook_delivery.dispatch_once(enqueue=lambda _: True)
    delivery_id = edb.scalar(select(WebhookDelivery.id)
                             .where(WebhookDelivery.endpoint_id == endpoint.id))
    retries = sample("refunds_webhook_deliveries_total", {"outcome": "retry"})
    timed = sample("refunds_webhook_attempt_duration_seconds_count")
    webhook_delivery.deliver(delivery_id, observe=metrics.observe_webhook_attempt)
    assert sample("refunds_webhook_deliveries_total", {"outcome": "retry"}) == retries + 1
    assert sample("refunds_webhook_attempt_duration_seconds_count") == timed + 1

    text = refund_gauges.exposition(stuck_alert_seconds=3600).decode()
    label = f'endpoint_id="{endpoint.id}"'
    pending = re.search(rf"refunds_webhook_pending_deliveries\{{{label}\}} (\S+)", text)
    oldest = re.search(rf"refunds_webhook_oldest_undelivered_age_seconds\{{{label}\}} (\S+)",
                       text)
    enabled = re.search(rf"refunds_webhook_endpoint_enabled\{{{label}\}} (\S+)", text)
    assert pending and float(pending.group(1)) == 1
    assert oldest and float(oldest.group(1)) > 0
    assert enabled and float(enabled.group(1)) == 1

    receiver.status = 200
    webhook_delivery.resend(session=edb, delivery_id=delivery_id, requested_by="ops")
    delivered = sample("refunds_webhook_deliveries_total", {"outcome": "delivered"})
    webhook_delivery.deliver(delivery_id, observe=metrics.observe_webhook_attempt)
    assert sample("refunds_webhook_deliveries_total", {"outcome": "delivered"}) == delivered + 1
    text = refund_gauges.exposition(stuck_alert_seconds=3600).decode()
    assert f"refunds_webhook_oldest_undelivered_age_seconds{{{label}}} 0.0" in text
