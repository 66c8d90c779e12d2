"""Shared call budget (tracker_quota_usage, tracker_quota_state) and tracker_instances.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "tracker_quota_usage",
        sa.Column("window_name", sa.String(16), nullable=False),
        sa.Column("bucket", sa.BigInteger, nullable=False, autoincrement=False),
        sa.Column("used", sa.Integer, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("window_name", "bucket", name=op.f("pk_tracker_quota_usage")),
    )
    state = op.create_table(
        "tracker_quota_state",
        sa.Column("id", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("paused_until", sa.Float, nullable=True),
        sa.CheckConstraint("id = 1", name=op.f("ck_tracker_quota_state_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tracker_quota_state")),
    )
    op.bulk_insert(state, [{"id": 1, "paused_until": None}])
    op.create_table(
        "tracker_instances",
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("last_sweep_at", TIMESTAMP, nullable=True),
        sa.Column("stopped_at", TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("owner", name=op.f("pk_tracker_instances")),
    )
    op.create_index("ix_tracker_instances_host", "tracker_instances", ["host"])


def downgrade() -> None:
    op.drop_table("tracker_instances")
    op.drop_table("tracker_quota_state")
    op.drop_table("tracker_quota_usage")
