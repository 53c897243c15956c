"""retention of refund events out

Retention (shared/services/retention.py) deletes old events with their deliveries and
attempts: the deliveries' foreign key to the outbox cascades, and
``ix_webhook_outbox_created_at`` finds old events by age.

``sequence`` is counted from the refund's status changes in ``refund_events`` (the audit
trail, never deleted) rather than from the outbox, so a refund's next event is numbered
on from its old ones after they are gone. It is the same number: the trigger adds one
outbox row per status change.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-02 10:10:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FUNCTION = """
CREATE OR REPLACE FUNCTION refund_events_to_webhook_outbox() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    snapshot jsonb;
    next_sequence integer;
BEGIN
    IF NEW.from_status IS NOT DISTINCT FROM NEW.to_status THEN
        RETURN NULL;
    END IF;
    SELECT to_jsonb(r) INTO snapshot FROM refunds r WHERE r.id = NEW.refund_id FOR UPDATE;
    SELECT {count} INTO next_sequence FROM {source} WHERE refund_id = NEW.refund_id{extra};
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
"""
# The refund's status changes so far, this one included (the trigger runs after its
# insert, with the refund's row locked: concurrent changes are counted in commit order).
FROM_AUDIT_TRAIL = _FUNCTION.format(
    count="count(*)", source="refund_events",
    extra=" AND from_status IS DISTINCT FROM to_status",
)
FROM_OUTBOX = _FUNCTION.format(count="count(*) + 1", source="webhook_outbox", extra="")

_EVENT_FK = "fk_webhook_deliveries_event_id_webhook_outbox"


def upgrade() -> None:
    op.create_index("ix_webhook_outbox_created_at", "webhook_outbox", ["created_at"],
                    unique=False)
    op.drop_constraint(_EVENT_FK, "webhook_deliveries", type_="foreignkey")
    op.create_foreign_key(_EVENT_FK, "webhook_deliveries", "webhook_outbox", ["event_id"],
                          ["id"], ondelete="CASCADE")
    op.execute(FROM_AUDIT_TRAIL)


def downgrade() -> None:
    op.execute(FROM_OUTBOX)
    op.drop_constraint(_EVENT_FK, "webhook_deliveries", type_="foreignkey")
    op.create_foreign_key(_EVENT_FK, "webhook_deliveries", "webhook_outbox", ["event_id"],
                          ["id"])
    op.drop_index("ix_webhook_outbox_created_at", table_name="webhook_outbox")
