"""Due deliveries are found through an index of the pending ones only (issue 15): the
dispatcher's claim (`webhooks.claim_due_deliveries`, oldest due first) walked the index of every
delivery's next_attempt_at, past every delivered or failed row, which keep their last
next_attempt_at: each claim read all the finished history (2,000 rows in a benchmark round,
a growing table in production) to find a few pending rows.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03 16:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

PENDING = sa.text("state = 'pending'")


def upgrade() -> None:
    op.create_index(
        "ix_webhook_deliveries_pending_due",
        "webhook_deliveries",
        ["next_attempt_at"],
        postgresql_where=PENDING,
        sqlite_where=PENDING,
    )


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_pending_due", table_name="webhook_deliveries")
