"""Progress, batching and routing: jobs.progress, jobs.batch_key, jobs.queue_name.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21 15:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("progress", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("batch_key", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("queue_name", sa.String(length=200), nullable=True))
        batch_op.create_index("ix_jobs_batch_key", ["batch_key"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_batch_key")
        batch_op.drop_column("queue_name")
        batch_op.drop_column("batch_key")
        batch_op.drop_column("progress")
