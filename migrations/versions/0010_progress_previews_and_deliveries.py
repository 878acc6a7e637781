"""Live progress extras (issue 16): the latest preview image of a running job, and its
opt-in progress webhooks (`start`, `progress`), each attempted once and recorded.

job_previews holds at most one small image per job (overwritten every few steps; the sweeper
drops those of ended jobs). progress_deliveries is apart from webhook_deliveries on purpose:
those keep one terminal delivery per job, retried on a schedule; these are never retried.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_previews",
        sa.Column(
            "job_id",
            sa.Integer(),
            sa.ForeignKey("jobs.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("image", sa.LargeBinary(), nullable=False),
        sa.Column("media_type", sa.String(40), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "progress_deliveries",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("message_id", sa.String(64), nullable=False, unique=True),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_progress_deliveries_job_id", "progress_deliveries", ["job_id"])
    op.create_index("ix_progress_deliveries_state", "progress_deliveries", ["state"])


def downgrade() -> None:
    op.drop_index("ix_progress_deliveries_state", table_name="progress_deliveries")
    op.drop_index("ix_progress_deliveries_job_id", table_name="progress_deliveries")
    op.drop_table("progress_deliveries")
    op.drop_table("job_previews")
