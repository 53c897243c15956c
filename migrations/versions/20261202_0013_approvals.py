"""approvals: refunds may await a second person's approval (SPEC 12)

Revision ID: 0013
Revises: 0011
Create Date: 2026-12-02 05:40:00.000000

Adds the ``awaiting_approval`` status and the columns that record the decision taken
on a refund before it reaches Stripe. New columns are nullable without a default (no
table rewrite); the check constraints are added NOT VALID and then validated, which
scans the table without blocking writes.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES_BEFORE = "'pending','processing','requires_action','succeeded','failed','canceled'"
STATUSES_AFTER = f"'awaiting_approval',{STATUSES_BEFORE}"
DECISIONS = "'approved','rejected','withdrawn','expired'"


def _replace_status_check(statuses: str) -> None:
    op.execute("ALTER TABLE refunds DROP CONSTRAINT ck_refunds_status_known")
    op.execute(
        f"ALTER TABLE refunds ADD CONSTRAINT ck_refunds_status_known "
        f"CHECK (status IN ({statuses})) NOT VALID"
    )
    op.execute("ALTER TABLE refunds VALIDATE CONSTRAINT ck_refunds_status_known")


def upgrade() -> None:
    op.add_column("refunds", sa.Column("approval_threshold", sa.BigInteger(), nullable=True))
    op.add_column("refunds", sa.Column("decision", sa.String(length=20), nullable=True))
    op.add_column("refunds", sa.Column("decided_by", sa.String(length=255), nullable=True))
    op.add_column(
        "refunds", sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("refunds", sa.Column("decision_note", sa.Text(), nullable=True))
    op.execute(
        f"ALTER TABLE refunds ADD CONSTRAINT ck_refunds_decision_known "
        f"CHECK (decision IN ({DECISIONS})) NOT VALID"
    )
    op.execute("ALTER TABLE refunds VALIDATE CONSTRAINT ck_refunds_decision_known")
    _replace_status_check(STATUSES_AFTER)


def downgrade() -> None:
    # A refund still awaiting approval has no status before this revision: the check
    # below then fails and the downgrade stops, rather than guess what to make of it.
    _replace_status_check(STATUSES_BEFORE)
    op.execute("ALTER TABLE refunds DROP CONSTRAINT ck_refunds_decision_known")
    for column in ("decision_note", "decided_at", "decided_by", "decision", "approval_threshold"):
        op.drop_column("refunds", column)
