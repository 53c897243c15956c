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
    )
