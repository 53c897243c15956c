"""refund events out: no fan-out work while nobody subscribes

While no webhook endpoint is enabled, the trigger records each event already fanned out
and sends no NOTIFY: no dispatcher wakes and no commit waits on Postgres' notification
queue (a lock every notifying commit takes in turn) for events nobody receives. An
endpoint receives the events recorded while it is enabled, as before; the events list
keeps every event either way.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-02 20:50:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# {subscribed}: whether an endpoint receives this event (0018: always taken as true).
_FUNCTION = """
CREATE OR REPLACE FUNCTION refund_events_to_webhook_outbox() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    snapshot jsonb;
    next_sequence integer;
    subscribed boolean;
BEGIN
    IF NEW.from_status IS NOT DISTINCT FROM NEW.to_status THEN
        RETURN NULL;
    END IF;
    SELECT to_jsonb(r) INTO snapshot FROM refunds r WHERE r.id = NEW.refund_id FOR UPDATE;
    SELECT count(*) INTO next_sequence FROM refund_events
    WHERE refund_id = NEW.refund_id AND from_status IS DISTINCT FROM to_status;
    subscribed := {subscribed};
    INSERT INTO webhook_outbox (id, refund_event_id, refund_id, type, sequence,
                                previous_status, refund, occurred_at, fanned_out_at)
    VALUES (
        'evt_' || replace(gen_random_uuid()::text, '-', ''),
        NEW.id,
        NEW.refund_id,
        CASE WHEN NEW.from_status IS NULL THEN 'refund.created'
             ELSE 'refund.' || NEW.to_status END,
        next_sequence,
        NEW.from_status,
        snapshot || jsonb_build_object('status', NEW.to_status),
        NEW.created_at,
        CASE WHEN NOT subscribed THEN now() END
    );
    IF subscribed THEN
        PERFORM pg_notify('webhook_outbox', '');
    END IF;
    RETURN NULL;
END $$;
"""


def upgrade() -> None:
    op.execute(
        _FUNCTION.format(subscribed="EXISTS (SELECT 1 FROM webhook_endpoints WHERE enabled)")
    )


def downgrade() -> None:
    op.execute(_FUNCTION.format(subscribed="true"))
