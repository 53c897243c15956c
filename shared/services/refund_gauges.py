"""Refund gauges read from Postgres at scrape time (``/metrics`` on the web).

``RefundStateCollector``: refunds by status, the oldest open one, the stuck ones (one
definition, ``shared.domain.stuck``), the ones held for a person. ``AwaitingApprovalCollector``:
refunds awaiting approval (SPEC 12), kept apart: such a refund waits for a person, not
for Stripe, so it belongs in neither ``refunds_open`` nor ``refunds_stuck`` (whose alerts
are about the pipeline). Alert on its age instead, against APPROVAL_EXPIRES_SECONDS:
approvals older than that are canceled by beat.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import text

from shared.adapters.db import get_engine
from shared.domain.models import OPEN_STATUSES, TERMINAL_STATUSES
from shared.domain.stuck import stuck_counts
from shared.services.attention import needs_attention_counts

log = logging.getLogger(__name__)

ALL_STATUSES = (*OPEN_STATUSES, *TERMINAL_STATUSES)
RECENT_WINDOW_SECONDS = 24 * 3600
SCRAPE_QUERY_TIMEOUT_MS = 2000


def exposition(*, stuck_alert_seconds: float) -> bytes:
    """The Prometheus text of the gauges read from Postgres."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RefundStateCollector(stuck_alert_seconds))
    registry.register(AwaitingApprovalCollector())
    registry.register(WebhookBacklogCollector())
    return generate_latest(registry)


_STATE_QUERY = """
SELECT status,
       count(*) AS n,
       coalesce(extract(epoch FROM now() - min(created_at)), 0) AS oldest_age
FROM refunds
WHERE status IN ('pending', 'processing', 'requires_action')
GROUP BY status
"""
_RECENT_QUERY = """
SELECT status, count(*) FROM refunds
WHERE status IN ('pending', 'processing', 'requires_action', 'succeeded', 'failed', 'canceled')
  AND updated_at >= now() - make_interval(secs => :window)
GROUP BY status
"""


class RefundStateCollector(Collector):
    """Refund gauges read from Postgres at scrape time.

    Both queries use the (status, updated_at) index: the first reads only the
    non-terminal rows (few, unless something is stuck), the second a 24 h range.
    """

    def __init__(self, stuck_alert_seconds: float) -> None:
        self.stuck_alert_seconds = stuck_alert_seconds

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "refunds_db_metrics_up", "1 if the refund gauges below could be read from Postgres."
        )
        open_ = GaugeMetricFamily(
            "refunds_open", "Refunds not yet in a terminal status, by status.", labels=["status"]
        )
        oldest = GaugeMetricFamily(
            "refunds_oldest_open_age_seconds",
            "Age (since creation) of the oldest refund in each non-terminal status; 0 when none.",
            labels=["status"],
        )
        stuck = GaugeMetricFamily(
            "refunds_stuck",
            "Open refunds without progress at Stripe (no status change) for longer than "
            "STUCK_ALERT_SECONDS, by status (shared/domain/stuck.py).",
            labels=["status"],
        )
        attention = GaugeMetricFamily(
            "refunds_needs_attention",
            "Open refunds held for a person: Stripe refused our credentials MAX_ATTEMPTS times; "
            "not retried until someone asks (shared/services/attention.py).",
        )
        recent = GaugeMetricFamily(
            "refunds_updated_last_24h",
            "Refunds whose status changed in the last 24 hours, by status.",
            labels=["status"],
        )
        start = time.perf_counter()
        try:
            with get_engine().connect() as conn:
                conn.execute(text(f"SET LOCAL statement_timeout = {SCRAPE_QUERY_TIMEOUT_MS}"))
                rows = {r.status: r for r in conn.execute(text(_STATE_QUERY))}
                stuck_rows = stuck_counts(conn, threshold_seconds=self.stuck_alert_seconds)
                held = sum(needs_attention_counts(conn).values())
                recent_rows = dict(
                    conn.execute(text(_RECENT_QUERY), {"window": RECENT_WINDOW_SECONDS}).all()
                )
                conn.rollback()
        except Exception as exc:
            log.warning("refund metrics unavailable: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        for status in OPEN_STATUSES:
            row = rows.get(status)
            open_.add_metric([status], row.n if row else 0)
            oldest.add_metric([status], float(row.oldest_age) if row else 0.0)
            stuck.add_metric([status], stuck_rows.get(status, 0))
        for status in ALL_STATUSES:
            recent.add_metric([status], recent_rows.get(status, 0))
        attention.add_metric([], held)
        up.add_metric([], 1)
        scrape = GaugeMetricFamily(
            "refunds_db_metrics_seconds", "Time the refund gauges' queries took."
        )
        scrape.add_metric([], time.perf_counter() - start)
        yield from (up, open_, oldest, stuck, attention, recent, scrape)


# Served by the (status, updated_at) index: only the refunds awaiting approval are read.
_APPROVAL_QUERY = """
SELECT count(*) AS n, coalesce(extract(epoch FROM now() - min(created_at)), 0) AS oldest_age
FROM refunds WHERE status = 'awaiting_approval'
"""


class AwaitingApprovalCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        waiting = GaugeMetricFamily(
            "refunds_awaiting_approval", "Refunds awaiting a second person's approval."
        )
        oldest = GaugeMetricFamily(
            "refunds_oldest_awaiting_approval_age_seconds",
            "Age (since it was requested) of the oldest refund awaiting approval; 0 when none.",
        )
        try:
            with get_engine().connect() as conn:
                conn.execute(text(f"SET LOCAL statement_timeout = {SCRAPE_QUERY_TIMEOUT_MS}"))
                row = conn.execute(text(_APPROVAL_QUERY)).one()
                conn.rollback()
        except Exception as exc:
            # refunds_db_metrics_up, from the refund gauges' own query, says the database
            # cannot be read; these two are left out rather than reported as zero.
            log.warning("approval metrics unavailable: %s", type(exc).__name__)
            return
        waiting.add_metric([], row.n)
        oldest.add_metric([], float(row.oldest_age))
        yield from (waiting, oldest)


_WEBHOOK_BACKLOG_QUERY = """
SELECT e.id AS endpoint_id, e.enabled, count(d.id) AS pending,
       coalesce(extract(epoch FROM now() - min(o.occurred_at)), 0) AS oldest_age
FROM webhook_endpoints e
LEFT JOIN webhook_deliveries d ON d.endpoint_id = e.id AND d.status = 'pending'
LEFT JOIN webhook_outbox o ON o.id = d.event_id
GROUP BY e.id, e.enabled
"""
_WEBHOOK_NOT_FANNED_QUERY = """
SELECT count(*) AS n, coalesce(extract(epoch FROM now() - min(created_at)), 0) AS oldest_age
FROM webhook_outbox WHERE fanned_out_at IS NULL
"""


class WebhookBacklogCollector(Collector):
    """Per endpoint, at scrape time: undelivered events and the age of the oldest (the
    alert: a subscriber that has not heard of a refund's change for that long)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pending = GaugeMetricFamily(
            "refunds_webhook_pending_deliveries",
            "Events not yet delivered to each endpoint (being retried).",
            labels=["endpoint_id"],
        )
        oldest = GaugeMetricFamily(
            "refunds_webhook_oldest_undelivered_age_seconds",
            "Age of the oldest event not yet delivered to each endpoint; 0 when none.",
            labels=["endpoint_id"],
        )
        enabled = GaugeMetricFamily(
            "refunds_webhook_endpoint_enabled",
            "1 for an enabled endpoint, 0 for one disabled (by an operator or after failing).",
            labels=["endpoint_id"],
        )
        not_fanned = GaugeMetricFamily(
            "refunds_webhook_outbox_oldest_not_fanned_out_age_seconds",
            "Age of the oldest event not yet turned into deliveries; 0 when none.",
        )
        try:
            with get_engine().connect() as conn:
                conn.execute(text(f"SET LOCAL statement_timeout = {SCRAPE_QUERY_TIMEOUT_MS}"))
                rows = conn.execute(text(_WEBHOOK_BACKLOG_QUERY)).all()
                outbox = conn.execute(text(_WEBHOOK_NOT_FANNED_QUERY)).one()
                conn.rollback()
        except Exception as exc:
            log.warning("webhook metrics unavailable: %s", type(exc).__name__)
            return
        for row in rows:
            pending.add_metric([row.endpoint_id], row.pending)
            oldest.add_metric([row.endpoint_id], float(row.oldest_age))
            enabled.add_metric([row.endpoint_id], 1 if row.enabled else 0)
        not_fanned.add_metric([], float(outbox.oldest_age))
        yield from (pending, oldest, enabled, not_fanned)
