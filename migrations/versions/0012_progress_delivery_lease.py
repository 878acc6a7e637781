"""Progress deliveries are claimed with a lease (issue 16 follow-up): a `sending` row whose
dispatcher died mid-attempt is claimable again once `lease_until` (on the database's clock)
has passed, instead of staying `sending` forever. Rows claimed before this revision have no
lease: they count as expired, so a dispatcher that died before the upgrade is recovered too.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03 14:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("progress_deliveries") as batch:
        batch.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("progress_deliveries") as batch:
        batch.drop_column("lease_until")
