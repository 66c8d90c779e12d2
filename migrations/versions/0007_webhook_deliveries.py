"""Which checks a webhook brought forward, and when each instance last heard a delivery.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMNs, not batch rebuilds: rebuilding on SQLite would drop the
    # AUTOINCREMENT and the triggers of 0005.
    op.add_column(
        "tracker_transitions",
        sa.Column("brought_forward", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.add_column(
        "tracker_instances",
        sa.Column("last_delivery_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    # Plain DROP COLUMNs on both backends (SQLite 3.35 and later), for the same reason.
    op.execute("ALTER TABLE tracker_instances DROP COLUMN last_delivery_at")
    op.execute("ALTER TABLE tracker_transitions DROP COLUMN brought_forward")
