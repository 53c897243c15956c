"""worker leases and stored Stripe events

Revision ID: 0011
Revises: 0001
Create Date: 2026-12-02 05:45:00

A refund is claimed by a lease (``lease_expires_at``), not by a lock held on a
connection across the Stripe call (SPEC 6). Stripe events are stored with what they
carry and applied later when they need a call to Stripe (SPEC 3.3); events stored
before this revision were applied when they arrived.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("refunds", sa.Column("lease_expires_at", sa.DateTime(timezone=True)))
    op.add_column(
        "stripe_events", sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()))
    )
    op.add_column("stripe_events", sa.Column("applied_at", sa.DateTime(timezone=True)))
    op.execute("UPDATE stripe_events SET applied_at = received_at")
    op.create_index(
        "ix_stripe_events_unapplied",
        "stripe_events",
        ["received_at"],
        unique=False,
        postgresql_where=sa.text("applied_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_stripe_events_unapplied",
        table_name="stripe_events",
        postgresql_where=sa.text("applied_at IS NULL"),
    )
    op.drop_column("stripe_events", "applied_at")
    op.drop_column("stripe_events", "payload")
    op.drop_column("refunds", "lease_expires_at")
