"""stored Stripe events waiting to be applied, by the object they name

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-02 10:30:00

A worker that fetched a refund from Stripe marks applied every waiting event about
that refund stored before it asked (``stripe_events._mark_superseded``); this index
finds them among the waiting events only.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_stripe_events_unapplied_object",
        "stripe_events",
        [sa.text("(payload->>'id')")],
        postgresql_where=sa.text("applied_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_stripe_events_unapplied_object",
        table_name="stripe_events",
        postgresql_where=sa.text("applied_at IS NULL"),
    )
