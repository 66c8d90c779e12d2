"""Create tracker_batches and tracker_transitions.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATES = (
    "pending",
    "processing",
    "ready",
    "downloaded",
    "failed",
    "rejected",
    "expired",
    "cancelled",
)
# Migrations keep their own copies of names: they must not change when the code does.
TIMESTAMP = sa.DateTime(timezone=True)
ACTIVE = "state IN ('pending', 'processing', 'ready')"


def upgrade() -> None:
    op.create_table(
        "tracker_batches",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("label", sa.Text, nullable=True),
        sa.Column("state", sa.String(16), nullable=False, server_default="pending"),
        sa.Column(
            "created_at", TIMESTAMP, nullable=False, server_default=sa.func.current_timestamp()
        ),
        sa.Column(
            "updated_at", TIMESTAMP, nullable=False, server_default=sa.func.current_timestamp()
        ),
        sa.Column("next_check_at", TIMESTAMP, nullable=True),
        sa.Column("checks", sa.Integer, nullable=False, server_default="0"),
        sa.Column("api_status", sa.Integer, nullable=True),
        sa.Column("api_message", sa.Text, nullable=True),
        sa.Column("file_path", sa.Text, nullable=True),
        sa.Column("file_size", sa.BigInteger, nullable=True),
        sa.Column("file_sha256", sa.String(64), nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("faults", sa.Integer, nullable=False, server_default="0"),
        sa.Column("rejections", sa.Integer, nullable=False, server_default="0"),
        sa.Column("download_attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("lease_owner", sa.Text, nullable=True),
        sa.Column("lease_token", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("lease_expires_at", TIMESTAMP, nullable=True),
        sa.CheckConstraint(
            "state IN (" + ", ".join(f"'{s}'" for s in STATES) + ")",
            name=op.f("ck_tracker_batches_state"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tracker_batches")),
        sa.UniqueConstraint("request_id", name=op.f("uq_tracker_batches_request_id")),
        # Never reuse a deleted row's id on SQLite: leases are fenced by (id, token).
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_tracker_batches_due",
        "tracker_batches",
        ["next_check_at"],
        sqlite_where=sa.text(ACTIVE),
        postgresql_where=sa.text(ACTIVE),
    )
    op.create_index("ix_tracker_batches_state", "tracker_batches", ["state"])
    op.create_table(
        "tracker_transitions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("batch_id", sa.Integer, nullable=False),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("from_state", sa.String(16), nullable=False),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("at", TIMESTAMP, nullable=False, server_default=sa.func.current_timestamp()),
        sa.Column("api_status", sa.Integer, nullable=True),
        sa.Column("api_message", sa.Text, nullable=True),
        sa.Column("detail", sa.Text, nullable=True),
        sa.CheckConstraint(
            "from_state <> to_state", name=op.f("ck_tracker_transitions_changes_state")
        ),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["tracker_batches.id"],
            name=op.f("fk_tracker_transitions_batch_id_tracker_batches"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tracker_transitions")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_tracker_transitions_batch_id", "tracker_transitions", ["batch_id", "id"])


def downgrade() -> None:
    op.drop_table("tracker_transitions")
    op.drop_table("tracker_batches")
