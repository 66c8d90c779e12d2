"""The two tables other applications see, declared once for SQLAlchemy and Alembic.

Every column but `request_id` has a server-side default or is nullable, so that a bare
`INSERT INTO tracker_batches (request_id) VALUES (...)` from any application works.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

from tracker.domain.states import ACTIVE_STATES, State


class UnreadableTimestamp(datetime):
    """A stored value that is not a timestamp ('yesterday', PostgreSQL's 'infinity').

    Other applications write these tables by hand, and one bad value must not stop every
    read: it comes back as this stand-in, at the earliest representable moment, keeping
    the raw value for error messages and views. The claim treats such a row as malformed.
    """

    raw: str

    def __new__(cls, raw: object) -> UnreadableTimestamp:
        moment = super().__new__(cls, 1, 1, 1, tzinfo=UTC)
        moment.raw = raw if isinstance(raw, str) else repr(raw)
        return moment


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Timestamps are UTC on both backends and always come back timezone-aware.

    SQLite has no timezone type: values are stored as naive UTC text, in the same
    'YYYY-MM-DD HH:MM:SS' shape CURRENT_TIMESTAMP produces, so the two compare as text.
    A stored value that is not a timestamp comes back as an UnreadableTimestamp.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given where UTC is required")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        if dialect.name != "sqlite":
            return super().result_processor(dialect, coltype)

        # SQLite's own DATETIME processor raises on text it cannot parse; this one reads
        # the stored text itself, so that one bad value costs only its row.
        def process(value: Any) -> datetime | None:
            return self.process_result_value(value, dialect)

        return process

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        # Text when another application wrote the row in its own format (or, from
        # PostgreSQL, an infinity that the driver passes through as text).
        try:
            moment = datetime.fromisoformat(value) if isinstance(value, str) else value
        except ValueError:
            return UnreadableTimestamp(value)
        if not isinstance(moment, datetime):  # a number or a blob in an SQLite column
            return UnreadableTimestamp(value)
        if moment.tzinfo is None:
            return moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC)


metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

_state_list = ", ".join(f"'{s.value}'" for s in State)
_active_list = ", ".join(f"'{s.value}'" for s in sorted(ACTIVE_STATES))
ACTIVE_PREDICATE = f"state IN ({_active_list})"

batches = sa.Table(
    "tracker_batches",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.Text, nullable=False, unique=True),
    sa.Column("label", sa.Text, nullable=True),
    sa.Column("state", sa.String(16), nullable=False, server_default=State.PENDING.value),
    sa.Column(
        "created_at", UTCDateTime, nullable=False, server_default=sa.func.current_timestamp()
    ),
    sa.Column(
        "updated_at", UTCDateTime, nullable=False, server_default=sa.func.current_timestamp()
    ),
    sa.Column("next_check_at", UTCDateTime, nullable=True),
    sa.Column("checks", sa.Integer, nullable=False, server_default="0"),
    sa.Column("api_status", sa.Integer, nullable=True),
    sa.Column("api_message", sa.Text, nullable=True),
    sa.Column("file_path", sa.Text, nullable=True),
    sa.Column("file_size", sa.BigInteger, nullable=True),
    sa.Column("file_sha256", sa.String(64), nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    # Consecutive answers of one kind, for backoff and for giving up.
    sa.Column("faults", sa.Integer, nullable=False, server_default="0"),
    sa.Column("rejections", sa.Integer, nullable=False, server_default="0"),
    sa.Column("download_attempts", sa.Integer, nullable=False, server_default="0"),
    # The lease: who works on the batch until when. The token only ever grows (fencing):
    # every write by a worker names the token it claimed with.
    sa.Column("lease_owner", sa.Text, nullable=True),
    sa.Column("lease_token", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("lease_expires_at", UTCDateTime, nullable=True),
    # Set when a batch becomes final while TRACKER_ON_FINAL is configured; cleared when a
    # daemon takes the hook run on.
    sa.Column("hook_pending", sa.Boolean, nullable=False, server_default=sa.false()),
    # When a webhook delivery last brought the next check forward: at most one early check
    # per TRACKER_POLL_MIN_INTERVAL, however many deliveries name the batch.
    sa.Column("hinted_at", UTCDateTime, nullable=True),
    sa.CheckConstraint(f"state IN ({_state_list})", name="state"),
    # Claiming looks only at unfinished rows; a partial index keeps that cheap however
    # many finished batches the table holds.
    sa.Index(
        "ix_tracker_batches_due",
        "next_check_at",
        sqlite_where=sa.text(ACTIVE_PREDICATE),
        postgresql_where=sa.text(ACTIVE_PREDICATE),
    ),
    sa.Index("ix_tracker_batches_state", "state"),
    # The console's list filters, newest first (0008). (label, id): a label's page walks the
    # index in id order and stops after the page, for a rare label as for a common one.
    sa.Index("ix_tracker_batches_label_id", "label", "id"),
    # Both filters at once, exactly and in id order, whichever of the two is the rarer.
    sa.Index("ix_tracker_batches_state_label_id", "state", "label", "id"),
    # The overview's recent errors, newest first, among the rows with an error only (0008).
    sa.Index(
        "ix_tracker_batches_recent_errors",
        "updated_at",
        "id",
        sqlite_where=sa.text("last_error IS NOT NULL"),
        postgresql_where=sa.text("last_error IS NOT NULL"),
    ),
    # LIKE 'prefix%' uses a btree only under the "C" collation or with the pattern operator
    # class, which the unique index lacks. PostgreSQL only: SQLite's GLOB narrows the unique
    # index itself.
    sa.Index(
        "ix_tracker_batches_request_id_pattern",
        "request_id",
        postgresql_ops={"request_id": "text_pattern_ops"},
    ),
    sa.Index(
        "ix_tracker_batches_hook_pending",
        "id",
        sqlite_where=sa.text("hook_pending"),
        postgresql_where=sa.text("hook_pending"),
    ),
    # Without AUTOINCREMENT SQLite hands a deleted row's id to the next insert, and a worker
    # still holding a claim on the deleted row could then write onto the newcomer.
    sqlite_autoincrement=True,
)

# Indexes that exist on PostgreSQL alone (see above): created only there, and not expected
# on SQLite when a migrated schema is compared with this one.
POSTGRESQL_ONLY_INDEXES = frozenset({"ix_tracker_batches_request_id_pattern"})
for _index in batches.indexes:
    if _index.name in POSTGRESQL_ONLY_INDEXES:
        _index.ddl_if(dialect="postgresql")

transitions = sa.Table(
    "tracker_transitions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "batch_id",
        sa.Integer,
        sa.ForeignKey("tracker_batches.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("request_id", sa.Text, nullable=False),
    sa.Column("from_state", sa.String(16), nullable=False),
    sa.Column("to_state", sa.String(16), nullable=False),
    sa.Column("at", UTCDateTime, nullable=False, server_default=sa.func.current_timestamp()),
    sa.Column("api_status", sa.Integer, nullable=True),
    sa.Column("api_message", sa.Text, nullable=True),
    sa.Column("detail", sa.Text, nullable=True),
    # The check that made this transition was brought forward by a webhook delivery.
    sa.Column("brought_forward", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.CheckConstraint("from_state <> to_state", name="changes_state"),
    sa.Index("ix_tracker_transitions_batch_id", "batch_id", "id"),
    sqlite_autoincrement=True,
)

# The shared call budget (see tracker.domain.quota): calls counted per window and bucket,
# so every instance on this database draws from one quota, and a restart keeps the day.
quota_usage = sa.Table(
    "tracker_quota_usage",
    metadata,
    sa.Column("window_name", sa.String(16), primary_key=True),
    sa.Column("bucket", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("used", sa.Integer, nullable=False, server_default="0"),
)

# One row: the cluster-wide pause after a 429, and the row reservations lock on.
quota_state = sa.Table(
    "tracker_quota_state",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    # Seconds since the epoch on the database's clock.
    sa.Column("paused_until", sa.Float, nullable=True),
    sa.CheckConstraint("id = 1", name="single_row"),
)

# One row per daemon process: who is running, whether it is alive, when it last swept.
instances = sa.Table(
    "tracker_instances",
    metadata,
    sa.Column("owner", sa.Text, primary_key=True),
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("last_sweep_at", UTCDateTime, nullable=True),
    # Set on a clean stop, or by another instance that found this one dead.
    sa.Column("stopped_at", UTCDateTime, nullable=True),
    # Stamped with the database's clock a few times per TRACKER_HEARTBEAT_TIMEOUT; an
    # instance silent for longer is presumed dead and its leases go to the others.
    sa.Column("heartbeat_at", UTCDateTime, nullable=True),
    # The kernel's boot id: with the host name, it tells a daemon that a predecessor whose
    # pid is gone is really dead (same machine, same boot), not on another machine.
    sa.Column("boot_id", sa.Text, nullable=True),
    # When this instance's webhook listener last took a delivery with the right secret;
    # written with the heartbeat, so a flood of deliveries costs no write of its own.
    sa.Column("last_delivery_at", UTCDateTime, nullable=True),
    sa.Index("ix_tracker_instances_host", "host"),
)
