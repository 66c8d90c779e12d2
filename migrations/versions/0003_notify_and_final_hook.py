"""PostgreSQL NOTIFY on new batches and on every transition; the on-final hook's queue flag.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

import sqlite3
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A new row wakes the daemons at once instead of at their next interval sweep.
WAKEUP_FUNCTION = """
CREATE OR REPLACE FUNCTION tracker_notify_new_batch() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('tracker_wakeup', NEW.id::text);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql
"""
WAKEUP_TRIGGER = """
CREATE TRIGGER tracker_batches_wakeup
AFTER INSERT ON tracker_batches
FOR EACH ROW EXECUTE FUNCTION tracker_notify_new_batch()
"""

# Every transition, whoever wrote it, published for other applications to LISTEN to.
# NOTIFY is transactional: listeners hear it only once the transition is committed.
TRANSITION_FUNCTION = """
CREATE OR REPLACE FUNCTION tracker_notify_transition() RETURNS trigger AS $$
DECLARE
    batch RECORD;
    payload TEXT;
BEGIN
    SELECT label, file_path INTO batch FROM tracker_batches WHERE id = NEW.batch_id;
    payload := json_build_object(
        'request_id', NEW.request_id,
        'label', batch.label,
        'from', NEW.from_state,
        'to', NEW.to_state,
        'file_path', batch.file_path
    )::text;
    -- pg_notify refuses payloads over 8000 bytes, which would fail the whole transaction:
    -- a producer's very long label must not stop the batch. Listeners then look it up.
    IF octet_length(payload) > 7900 THEN
        payload := json_build_object(
            'batch_id', NEW.batch_id, 'from', NEW.from_state, 'to', NEW.to_state,
            'truncated', true
        )::text;
    END IF;
    PERFORM pg_notify('tracker_transitions', payload);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql
"""
TRANSITION_TRIGGER = """
CREATE TRIGGER tracker_transitions_notify
AFTER INSERT ON tracker_transitions
FOR EACH ROW EXECUTE FUNCTION tracker_notify_transition()
"""


def upgrade() -> None:
    # A plain ADD COLUMN, not a batch rebuild: rebuilding the table on SQLite would drop
    # its AUTOINCREMENT, and deleted ids would be reused.
    op.add_column(
        "tracker_batches",
        sa.Column("hook_pending", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_index(
        "ix_tracker_batches_hook_pending",
        "tracker_batches",
        ["id"],
        sqlite_where=sa.text("hook_pending"),
        postgresql_where=sa.text("hook_pending"),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(WAKEUP_FUNCTION)
        op.execute(WAKEUP_TRIGGER)
        op.execute(TRANSITION_FUNCTION)
        op.execute(TRANSITION_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS tracker_transitions_notify ON tracker_transitions")
        op.execute("DROP FUNCTION IF EXISTS tracker_notify_transition()")
        op.execute("DROP TRIGGER IF EXISTS tracker_batches_wakeup ON tracker_batches")
        op.execute("DROP FUNCTION IF EXISTS tracker_notify_new_batch()")
    op.drop_index("ix_tracker_batches_hook_pending", table_name="tracker_batches")
    bind = op.get_bind()
    if bind.dialect.name != "sqlite" or sqlite3.sqlite_version_info >= (3, 35):
        # A plain DROP COLUMN. On SQLite it rewrites no table: a rebuild would DROP
        # tracker_batches, whose implicit DELETE cascades to every transition while foreign
        # keys are on (and they cannot be turned off inside the migration's transaction),
        # and it would reset the AUTOINCREMENT counter, so deleted ids could come back.
        op.drop_column("tracker_batches", "hook_pending")
        return
    # SQLite before 3.35 has no DROP COLUMN: rebuild the table. migrations/env.py runs every
    # migration with foreign keys off, so dropping the old table deletes no transitions; the
    # AUTOINCREMENT counter is put back by hand.
    counter = bind.execute(
        sa.text("SELECT seq FROM sqlite_sequence WHERE name = 'tracker_batches'")
    ).scalar()
    with op.batch_alter_table(
        "tracker_batches", table_kwargs={"sqlite_autoincrement": True}
    ) as batch:
        batch.drop_column("hook_pending")
    if counter is not None:
        bind.execute(
            sa.text(
                "UPDATE sqlite_sequence SET seq = max(seq, :seq) WHERE name = 'tracker_batches'"
            ),
            {"seq": counter},
        )
