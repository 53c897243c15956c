"""Typed SQLAlchemy 2 models. Alembic migrations (``migrations/``) are the only way
the schema changes; ``tests/test_migrations.py`` fails when the two drift."""

from __future__ import annotations

import enum
import secrets
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class RefundStatus(enum.StrEnum):
    AWAITING_APPROVAL = "awaiting_approval"  # four eyes (SPEC 12): held until a second person
    PENDING = "pending"
    PROCESSING = "processing"
    REQUIRES_ACTION = "requires_action"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


#: Refunds in these states do not count against what is left on a payment.
RELEASED_STATUSES = (RefundStatus.FAILED, RefundStatus.CANCELED)
TERMINAL_STATUSES = (RefundStatus.SUCCEEDED, RefundStatus.FAILED, RefundStatus.CANCELED)
#: Refunds in these states are still on their way (the pipeline's, not a person's, to finish).
OPEN_STATUSES = (RefundStatus.PENDING, RefundStatus.PROCESSING, RefundStatus.REQUIRES_ACTION)


class Decision(enum.StrEnum):
    """What a person (or the reconciler, on expiry) decided about a refund before Stripe."""

    APPROVED = "approved"  # awaiting_approval -> pending
    REJECTED = "rejected"  # awaiting_approval -> canceled, by an approver
    WITHDRAWN = "withdrawn"  # awaiting_approval or unsent pending -> canceled, by a writer
    EXPIRED = "expired"  # awaiting_approval -> canceled, by the reconciler


def _now_column() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class Payment(Base):
    __tablename__ = "payments"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    stripe_payment_intent_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    status: Mapped[str] = mapped_column(String(40), nullable=False)
    created_at: Mapped[datetime] = _now_column()
    updated_at: Mapped[datetime] = _now_column()

    __table_args__ = (CheckConstraint("amount >= 0", name="amount_not_negative"),)


class Charge(Base):
    __tablename__ = "charges"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # Stripe's ch_/py_ id
    payment_id: Mapped[str] = mapped_column(ForeignKey("payments.id"), nullable=False, index=True)
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    status: Mapped[str] = mapped_column(String(40), nullable=False)
    disputed: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    created_at: Mapped[datetime] = _now_column()
    updated_at: Mapped[datetime] = _now_column()


class Refund(Base):
    __tablename__ = "refunds"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    payment_id: Mapped[str] = mapped_column(ForeignKey("payments.id"), nullable=False)
    charge_id: Mapped[str | None] = mapped_column(ForeignKey("charges.id"))
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False)
    reason: Mapped[str | None] = mapped_column(Text)
    stripe_refund_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    stripe_idempotency_key: Mapped[str] = mapped_column(String(255), nullable=False, unique=True)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    initiated_by: Mapped[str] = mapped_column(String(255), nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    #: While in the future, one worker holds the refund's send (SPEC 6); set by the claim,
    #: cleared when Stripe's answer is recorded, simply left to lapse if the worker dies.
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Held for a person after MAX_ATTEMPTS credential refusals (shared/services/attention.py).
    needs_attention_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    needs_attention_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now_column()
    updated_at: Mapped[datetime] = _now_column()
    # Four eyes (SPEC 12): the threshold in force when a refund was held for approval
    # (NULL: it needed none), and the one decision taken on it before Stripe. The audit
    # trail has the same facts; these columns let lists and the console show them.
    approval_threshold: Mapped[int | None] = mapped_column(BigInteger)
    decision: Mapped[str | None] = mapped_column(String(20))
    decided_by: Mapped[str | None] = mapped_column(String(255))
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    decision_note: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint(
            "status IN ('awaiting_approval','pending','processing','requires_action',"
            "'succeeded','failed','canceled')",
            name="status_known",
        ),
        CheckConstraint(
            "decision IN ('approved','rejected','withdrawn','expired')", name="decision_known"
        ),
        Index("ix_refunds_payment_id", "payment_id"),
        Index("ix_refunds_charge_id", "charge_id"),
        Index("ix_refunds_status_updated_at", "status", "updated_at"),
        Index("ix_refunds_created_at_id", "created_at", "id"),
        Index("ix_refunds_initiated_by", "initiated_by"),
        Index(
            "ix_refunds_needs_attention_since",
            "needs_attention_since",
            postgresql_where=text("needs_attention_since IS NOT NULL"),
        ),
    )


class RefundEvent(Base):
    """Append-only audit trail: one row per change of a refund, with who made it."""

    __tablename__ = "refund_events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    refund_id: Mapped[str] = mapped_column(ForeignKey("refunds.id"), nullable=False, index=True)
    from_status: Mapped[str | None] = mapped_column(String(20))
    to_status: Mapped[str] = mapped_column(String(20), nullable=False)
    actor: Mapped[str] = mapped_column(String(255), nullable=False)
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = _now_column()


class IdempotencyRecord(Base):
    __tablename__ = "idempotency_records"

    subject: Mapped[str] = mapped_column(String(255), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    response_status: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = _now_column()

    # Retention deletes by age (shared/services/retention.py).
    __table_args__ = (Index("ix_idempotency_records_created_at", "created_at"),)


class StripeEvent(Base):
    """Stripe event ids already handled, so a redelivered webhook changes nothing."""

    __tablename__ = "stripe_events"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(100), nullable=False)
    #: The event's ``data.object``, kept until it is applied (SPEC 3.3).
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    received_at: Mapped[datetime] = _now_column()
    #: NULL while the event waits for a worker (it needs a call to Stripe).
    applied_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_stripe_events_received_at", "received_at"),
        Index(
            "ix_stripe_events_unapplied",
            "received_at",
            postgresql_where=text("applied_at IS NULL"),
        ),
        # The waiting events about one Stripe object (stripe_events._mark_superseded).
        Index(
            "ix_stripe_events_unapplied_object",
            text("(payload->>'id')"),
            postgresql_where=text("applied_at IS NULL"),
        ),
    )


# -- Refund events out (SPEC 13) -----------------------------------------------------
# ``webhook_outbox`` is filled by a trigger on ``refund_events`` (migration 0014), in the
# transaction that records the status change, so no change can commit without its event.

WEBHOOK_DELIVERY_STATUSES = ("pending", "delivered", "failed")


class WebhookEndpoint(Base):
    """A subscriber's URL, the event types it wants and the secret its events are signed with."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    url: Mapped[str] = mapped_column(Text, nullable=False)
    # ["*"] is every event type, including ones added later.
    events: Mapped[list[str]] = mapped_column(JSONB, nullable=False)
    description: Mapped[str | None] = mapped_column(Text)
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="true")
    secret: Mapped[str] = mapped_column(String(100), nullable=False)
    # After a rotation, events are signed with the old secret too until this time, so
    # the subscriber can deploy the new one without a window of failed verifications.
    previous_secret: Mapped[str | None] = mapped_column(String(100))
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    # Since when every attempt to this endpoint has failed (None after a success).
    failing_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now_column()
    updated_at: Mapped[datetime] = _now_column()


class WebhookOutboxEvent(Base):
    """One outbound event per status change: its id, type, order and the refund as it was."""

    __tablename__ = "webhook_outbox"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # evt_…
    refund_event_id: Mapped[int] = mapped_column(
        ForeignKey("refund_events.id"), nullable=False, unique=True
    )
    refund_id: Mapped[str] = mapped_column(ForeignKey("refunds.id"), nullable=False, index=True)
    type: Mapped[str] = mapped_column(String(60), nullable=False)
    sequence: Mapped[int] = mapped_column(Integer, nullable=False)
    previous_status: Mapped[str | None] = mapped_column(String(20))
    # The refunds row as the change left it (to_jsonb of the row); the event body is
    # built from it, so every retry sends the same body.
    refund: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    created_at: Mapped[datetime] = _now_column()
    fanned_out_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        # Retention deletes by age (shared/services/retention.py).
        Index("ix_webhook_outbox_created_at", "created_at"),
        Index(
            "ix_webhook_outbox_not_fanned_out",
            "created_at",
            postgresql_where=text("fanned_out_at IS NULL"),
        ),
    )


class WebhookDelivery(Base):
    """One event for one endpoint: delivered at least once, or failed after the schedule."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # whd_…
    endpoint_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), nullable=False
    )
    # Retention deletes an old event with its deliveries (shared/services/retention.py).
    event_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_outbox.id", ondelete="CASCADE"), nullable=False, index=True
    )
    status: Mapped[str] = mapped_column(String(20), nullable=False, server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    # How many delays of WEBHOOK_RETRY_SCHEDULE are used up.
    schedule_step: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Enqueued and not yet run (the dispatcher leaves it alone until then).
    scheduled_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # An attempt is running (exclusive for a while longer than WEBHOOK_TIMEOUT_SECONDS).
    attempting_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Who asked for the next attempt ("send again"), recorded with that attempt.
    resend_requested_by: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = _now_column()
    updated_at: Mapped[datetime] = _now_column()

    __table_args__ = (
        CheckConstraint("status IN ('pending','delivered','failed')", name="status_known"),
        UniqueConstraint("endpoint_id", "event_id", name="uq_webhook_deliveries_endpoint_event"),
        Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at", "id"),
        # The head of one endpoint's backlog: what the dispatcher leases and a delivery
        # task claims, oldest due first.
        Index(
            "ix_webhook_deliveries_endpoint_due",
            "endpoint_id",
            "next_attempt_at",
            "id",
            postgresql_where=text("status = 'pending'"),
        ),
        # The console's "failing deliveries": newest failed attempt first.
        Index(
            "ix_webhook_deliveries_failing",
            "last_attempt_at",
            postgresql_where=text("status <> 'delivered' AND last_error IS NOT NULL"),
        ),
    )


class WebhookDeliveryAttempt(Base):
    """One try at sending a delivery: when, how long, the answer (body cut to 1 KB) or error."""

    __tablename__ = "webhook_delivery_attempts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), nullable=False, index=True
    )
    attempted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    duration_ms: Mapped[int] = mapped_column(Integer, nullable=False)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    response_body: Mapped[str | None] = mapped_column(Text)
    requested_by: Mapped[str | None] = mapped_column(String(255))  # who asked for a resend
