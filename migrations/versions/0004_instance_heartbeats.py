"""Instance heartbeats on the database's clock, and the boot id that names a machine's boot.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, so that instances of an older version still running during a rolling
    # upgrade (they never heartbeat) are left to their lease expiry, never presumed dead.
    op.add_column(
        "tracker_instances", sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("tracker_instances", sa.Column("boot_id", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tracker_instances") as table:
        table.drop_column("boot_id")
        table.drop_column("heartbeat_at")
