"""Model installs (load_model and friends), and webhook deliveries that belong to an install.

model_installs holds one row per installed (or installing) model, LoRA, embedding or VAE.
webhook_deliveries gains the key that signs it (filled from the job for existing rows) and an
optional install; job_id becomes nullable, since an install's webhook has no job.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 11:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_STATES = ("queued", "downloading", "ready", "failed")


def upgrade() -> None:
    op.create_table(
        "model_installs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("model_id", sa.String(200), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column(
            "api_key_id",
            sa.Integer(),
            sa.ForeignKey("api_keys.id", ondelete="SET NULL"),
            nullable=True,
        ),
        sa.Column("webhook_url", sa.Text(), nullable=True),
        sa.Column(
            "state",
            sa.Enum(*_STATES, name="installstate", native_enum=False, length=20),
            nullable=False,
        ),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("family", sa.String(20), nullable=True),
        sa.Column("format", sa.String(20), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("bytes_done", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("kind", "model_id", name="uq_model_installs_kind_id"),
    )
    op.create_index("ix_model_installs_state", "model_installs", ["state"])
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("api_key_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("model_install_id", sa.Integer(), nullable=True))
    # Existing deliveries are signed with their job's key, as before.
    op.execute(
        "UPDATE webhook_deliveries SET api_key_id = "
        "(SELECT jobs.api_key_id FROM jobs WHERE jobs.id = webhook_deliveries.job_id)"
    )
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.alter_column("api_key_id", existing_type=sa.Integer(), nullable=False)
        batch_op.alter_column("job_id", existing_type=sa.Integer(), nullable=True)
        batch_op.create_foreign_key(
            "fk_webhook_deliveries_api_key_id",
            "api_keys",
            ["api_key_id"],
            ["id"],
            ondelete="CASCADE",
        )
        batch_op.create_foreign_key(
            "fk_webhook_deliveries_model_install_id",
            "model_installs",
            ["model_install_id"],
            ["id"],
            ondelete="CASCADE",
        )
        batch_op.create_index(
            "ix_webhook_deliveries_model_install_id", ["model_install_id"], unique=False
        )


def downgrade() -> None:
    op.execute("DELETE FROM webhook_deliveries WHERE job_id IS NULL")
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_webhook_deliveries_model_install_id")
        batch_op.drop_constraint("fk_webhook_deliveries_model_install_id", type_="foreignkey")
        batch_op.drop_constraint("fk_webhook_deliveries_api_key_id", type_="foreignkey")
        batch_op.alter_column("job_id", existing_type=sa.Integer(), nullable=False)
        batch_op.drop_column("model_install_id")
        batch_op.drop_column("api_key_id")
    op.drop_index("ix_model_installs_state", table_name="model_installs")
    op.drop_table("model_installs")
