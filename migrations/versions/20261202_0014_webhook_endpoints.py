"""webhook endpoints: refund events out (SPEC 13)

The outbox is filled by a trigger on refund_events, so an event exists for every status
change that commits, whichever code path wrote it. The trigger is not part of the models
(autogenerate does not compare triggers); tests/test_migrations.py checks it exists.

Revision ID: 0014
Revises: 0003_needs_attention
Create Date: 2026-12-02 05:25:48.948569
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0014"
down_revision: str | None = "0003_needs_attention"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A status change (from_status differs from to_status; the first event of a refund has
# none) becomes an outbound event in the same transaction. The refund's row is locked
# and copied as it is now, with the status the event names, and its events are counted
# under that lock, so ``sequence`` is 1, 2, 3... per refund whatever commits first.
# NOTIFY is sent on commit only: workers listening start the delivery at once.
OUTBOX_TRIGGER = """
CREATE FUNCTION refund_events_to_webhook_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    snapshot jsonb;
    next_sequence integer;
BEGIN
    IF NEW.from_status IS NOT DISTINCT FROM NEW.to_status THEN
        RETURN NULL;
    END IF;
    SELECT to_jsonb(r) INTO snapshot FROM refunds r WHERE r.id = NEW.refund_id FOR UPDATE;
    SELECT count(*) + 1 INTO next_sequence FROM webhook_outbox WHERE refund_id = NEW.refund_id;
    INSERT INTO webhook_outbox (id, refund_event_id, refund_id, type, sequence,
                                previous_status, refund, occurred_at)
    VALUES (
        'evt_' || replace(gen_random_uuid()::text, '-', ''),
        NEW.id,
        NEW.refund_id,
        CASE WHEN NEW.from_status IS NULL THEN 'refund.created'
             ELSE 'refund.' || NEW.to_status END,
        next_sequence,
        NEW.from_status,
        snapshot || jsonb_build_object('status', NEW.to_status),
        NEW.created_at
    );
    PERFORM pg_notify('webhook_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER refund_events_to_webhook_outbox AFTER INSERT ON refund_events
    FOR EACH ROW EXECUTE FUNCTION refund_events_to_webhook_outbox();
"""


def upgrade() -> None:
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("events", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("enabled", sa.Boolean(), server_default="true", nullable=False),
        sa.Column("secret", sa.String(length=100), nullable=False),
        sa.Column("previous_secret", sa.String(length=100), nullable=True),
        sa.Column("previous_secret_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("disabled_reason", sa.Text(), nullable=True),
        sa.Column("failing_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_endpoints")),
    )
    op.create_table(
        "webhook_outbox",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("refund_event_id", sa.BigInteger(), nullable=False),
        sa.Column("refund_id", sa.String(length=40), nullable=False),
        sa.Column("type", sa.String(length=60), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("previous_status", sa.String(length=20), nullable=True),
        sa.Column("refund", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("fanned_out_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["refund_event_id"],
            ["refund_events.id"],
            name=op.f("fk_webhook_outbox_refund_event_id_refund_events"),
        ),
        sa.ForeignKeyConstraint(
            ["refund_id"], ["refunds.id"], name=op.f("fk_webhook_outbox_refund_id_refunds")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_outbox")),
        sa.UniqueConstraint("refund_event_id", name=op.f("uq_webhook_outbox_refund_event_id")),
    )
    op.create_index(
        "ix_webhook_outbox_not_fanned_out",
        "webhook_outbox",
        ["created_at"],
        unique=False,
        postgresql_where=sa.text("fanned_out_at IS NULL"),
    )
    op.create_index(
        op.f("ix_webhook_outbox_refund_id"), "webhook_outbox", ["refund_id"], unique=False
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("endpoint_id", sa.String(length=40), nullable=False),
        sa.Column("event_id", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=20), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("schedule_step", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("scheduled_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempting_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resend_requested_by", sa.String(length=255), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "status IN ('pending','delivered','failed')",
            name=op.f("ck_webhook_deliveries_status_known"),
        ),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["webhook_endpoints.id"],
            name=op.f("fk_webhook_deliveries_endpoint_id_webhook_endpoints"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["webhook_outbox.id"],
            name=op.f("fk_webhook_deliveries_event_id_webhook_outbox"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
        sa.UniqueConstraint("endpoint_id", "event_id", name="uq_webhook_deliveries_endpoint_event"),
    )
    op.create_index(
        "ix_webhook_deliveries_due",
        "webhook_deliveries",
        ["next_attempt_at"],
        unique=False,
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "ix_webhook_deliveries_failing",
        "webhook_deliveries",
        ["last_attempt_at"],
        unique=False,
        postgresql_where=sa.text("status <> 'delivered' AND last_error IS NOT NULL"),
    )
    op.create_index(
        "ix_webhook_deliveries_endpoint_created",
        "webhook_deliveries",
        ["endpoint_id", "created_at", "id"],
        unique=False,
    )
    op.create_index(
        op.f("ix_webhook_deliveries_event_id"), "webhook_deliveries", ["event_id"], unique=False
    )
    op.create_table(
        "webhook_delivery_attempts",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("delivery_id", sa.String(length=40), nullable=False),
        sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("response_body", sa.Text(), nullable=True),
        sa.Column("requested_by", sa.String(length=255), nullable=True),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["webhook_deliveries.id"],
            name=op.f("fk_webhook_delivery_attempts_delivery_id_webhook_deliveries"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_delivery_attempts")),
    )
    op.create_index(
        op.f("ix_webhook_delivery_attempts_delivery_id"),
        "webhook_delivery_attempts",
        ["delivery_id"],
        unique=False,
    )
    op.execute(OUTBOX_TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER refund_events_to_webhook_outbox ON refund_events")
    op.execute("DROP FUNCTION refund_events_to_webhook_outbox()")
    op.drop_index(
        op.f("ix_webhook_delivery_attempts_delivery_id"), table_name="webhook_delivery_attempts"
    )
    op.drop_table("webhook_delivery_attempts")
    op.drop_index(op.f("ix_webhook_deliveries_event_id"), table_name="webhook_deliveries")
    op.drop_index("ix_webhook_deliveries_failing", table_name="webhook_deliveries")
    op.drop_index("ix_webhook_deliveries_endpoint_created", table_name="webhook_deliveries")
    op.drop_index(
        "ix_webhook_deliveries_due",
        table_name="webhook_deliveries",
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.drop_table("webhook_deliveries")
    op.drop_index(op.f("ix_webhook_outbox_refund_id"), table_name="webhook_outbox")
    op.drop_index(
        "ix_webhook_outbox_not_fanned_out",
        table_name="webhook_outbox",
        postgresql_where=sa.text("fanned_out_at IS NULL"),
    )
    op.drop_table("webhook_outbox")
    op.drop_table("webhook_endpoints")
