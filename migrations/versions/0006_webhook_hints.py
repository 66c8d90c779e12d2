"""When a webhook delivery last brought a batch's next check forward.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ADD COLUMN, not a batch rebuild: rebuilding the table on SQLite would drop
    # its AUTOINCREMENT and the triggers of 0005.
    op.add_column(
        "tracker_batches", sa.Column("hinted_at", sa.DateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    # A plain DROP COLUMN on both backends (SQLite 3.35 and later): a rebuild would lose the
    # triggers of 0005 and the AUTOINCREMENT counter.
    op.execute("ALTER TABLE tracker_batches DROP COLUMN hinted_at")
