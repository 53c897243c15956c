"""Gauges of refunds awaiting approval (SPEC 12), read from Postgres at scrape time.

Kept apart from ``RefundStateCollector``: a refund awaiting approval waits for a
person, not for Stripe, so it belongs in neither ``refunds_open`` nor ``refunds_stuck``
(whose alerts are about the pipeline). Alert on the age instead, against
APPROVAL_EXPIRES_SECONDS: approvals older than that are canceled by beat.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

SCRAPE_QUERY_TIMEOUT_MS = 2000
# Served by the (status, updated_at) index: only the refunds awaiting approval are read.
_QUERY = """
SELECT count(*) AS n, coalesce(extract(epoch FROM now() - min(created_at)), 0) AS oldest_age
FROM refunds WHERE status = 'awaiting_approval'
"""


class AwaitingApprovalCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        from sqlalchemy import text

        from shared.db import get_engine

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
                row = conn.execute(text(_QUERY)).one()
                conn.rollback()
        except Exception as exc:
            # refunds_db_metrics_up, from the refund gauges' own query, says the database
            # cannot be read; these two are left out rather than reported as zero.
            log.warning("approval metrics unavailable: %s", type(exc).__name__)
            return
        waiting.add_metric([], row.n)
        oldest.add_metric([], float(row.oldest_age))
        yield from (waiting, oldest)
