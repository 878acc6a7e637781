"""Operator requeue: job_requeues keeps what a requeued job's previous run left behind.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-21 16:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_requeues",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("requeued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("previous_state", sa.String(length=20), nullable=False),
        sa.Column("previous_error", sa.Text(), nullable=True),
        sa.Column("previous_attempts", sa.Integer(), nullable=False),
        sa.Column("previous_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("previous_finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("previous_webhook", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("job_requeues", schema=None) as batch_op:
        batch_op.create_index("ix_job_requeues_job_id", ["job_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("job_requeues", schema=None) as batch_op:
        batch_op.drop_index("ix_job_requeues_job_id")
    op.drop_table("job_requeues")
