"""indexes for retention: idempotency records and Stripe event ids by age

Revision ID: 0002_retention_indexes
Revises: 0013
Create Date: 2026-12-02 05:40:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002_retention_indexes"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_idempotency_records_created_at", "idempotency_records", ["created_at"], unique=False
    )
    op.create_index("ix_stripe_events_received_at", "stripe_events", ["received_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_stripe_events_received_at", table_name="stripe_events")
    op.drop_index("ix_idempotency_records_created_at", table_name="idempotency_records")
