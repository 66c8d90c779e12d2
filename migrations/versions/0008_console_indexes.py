"""Indexes for the console: its list filters (by label, by state and label, by request_id
prefix) and its recent errors.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain CREATE INDEX, no batch rebuild: rebuilding on SQLite would drop the
    # AUTOINCREMENT and the triggers of 0005.
    # (label, id): a label's page is read newest first along the index and stops after the
    # page, however few or many of the table's rows carry that label.
    op.create_index("ix_tracker_batches_label_id", "tracker_batches", ["label", "id"])
    # (state, label, id): both filters at once, exactly, in id order. Without it SQLite (no
    # statistics of how values spread) reads a whole common label to find its few rows of a
    # rare state, and PostgreSQL, taking the two as independent, may walk the primary key
    # through every row when that label never had that state.
    op.create_index(
        "ix_tracker_batches_state_label_id", "tracker_batches", ["state", "label", "id"]
    )
    # The overview's recent errors, newest first: a partial index holds only the rows with
    # an error, so reading the latest ten costs the same beside a million clean batches.
    op.create_index(
        "ix_tracker_batches_recent_errors",
        "tracker_batches",
        ["updated_at", "id"],
        sqlite_where=sa.text("last_error IS NOT NULL"),
        postgresql_where=sa.text("last_error IS NOT NULL"),
    )
    if op.get_bind().dialect.name == "postgresql":
        # LIKE 'prefix%' can use a btree only under the C collation or with the pattern
        # operator class; the unique index on request_id has neither (C.UTF-8 is not "C").
        # SQLite's GLOB already narrows the unique index to the prefix's range.
        op.create_index(
            "ix_tracker_batches_request_id_pattern",
            "tracker_batches",
            ["request_id"],
            postgresql_ops={"request_id": "text_pattern_ops"},
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_tracker_batches_request_id_pattern", table_name="tracker_batches")
    op.drop_index("ix_tracker_batches_recent_errors", table_name="tracker_batches")
    op.drop_index("ix_tracker_batches_state_label_id", table_name="tracker_batches")
    op.drop_index("ix_tracker_batches_label_id", table_name="tracker_batches")
