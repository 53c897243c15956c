"""refunds held for a person: needs_attention_since and its reason

Revision ID: 0003_needs_attention
Revises: 0002_retention_indexes
Create Date: 2026-12-02 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_needs_attention"
down_revision: str | None = "0002_retention_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "refunds", sa.Column("needs_attention_since", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("refunds", sa.Column("needs_attention_reason", sa.Text(), nullable=True))
    op.create_index(
        "ix_refunds_needs_attention_since",
        "refunds",
        ["needs_attention_since"],
        unique=False,
        postgresql_where=sa.text("needs_attention_since IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_refunds_needs_attention_since", table_name="refunds")
    op.drop_column("refunds", "needs_attention_reason")
    op.drop_column("refunds", "needs_attention_since")
