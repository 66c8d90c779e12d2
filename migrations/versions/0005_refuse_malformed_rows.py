"""Refuse malformed rows at INSERT time: timestamps the tracker can read, counts it can keep.

Other applications write tracker_batches by hand. A value such as created_at = 'yesterday'
(SQLite keeps any text) or next_check_at = '-infinity' (PostgreSQL takes it) once stopped
every claim. From here on the database refuses them when they are written, with an error
for the application that wrote them; a plain INSERT (request_id) still passes, its
defaults being sound. Rows already holding such values are rejected now (the raw value is
kept in last_error) and made readable.

PostgreSQL: CHECK constraints. SQLite cannot add one without rebuilding the table, so it
gets triggers (AFTER, so that they see the values as stored, column affinity applied):
every check on INSERT, and on UPDATE only for the columns the statement sets, so that a
row the daemon is rejecting as malformed can still be written.

Every SQL text below is built from this module's constants only.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Callable, Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Migrations keep their own copies of names: they must not change when the code does.
TIMES = ("created_at", "updated_at", "next_check_at", "lease_expires_at", "finished_at")
REQUIRED_TIMES = ("created_at", "updated_at")
COUNTS = ("checks", "faults", "rejections", "download_attempts")
INTEGER_MAX = 2**31 - 1
TIMESTAMP_GLOB = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]*"
ACTIVE = "('pending', 'processing', 'ready')"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _reject_existing(_postgres_problem, now="clock_timestamp()")
        for column in TIMES:
            op.execute(
                f"ALTER TABLE tracker_batches ADD CONSTRAINT ck_tracker_batches_{column}_finite "
                f"CHECK ({column} IS NULL OR isfinite({column}))"
            )
        for column in COUNTS:
            op.execute(
                f"ALTER TABLE tracker_batches ADD CONSTRAINT ck_tracker_batches_{column}_range "
                f"CHECK ({column} >= 0 AND {column} < {INTEGER_MAX})"
            )
        op.execute(
            "ALTER TABLE tracker_batches ADD CONSTRAINT ck_tracker_batches_lease_token_range "
            "CHECK (lease_token >= 0)"
        )
        return
    _reject_existing(_sqlite_problem, now="strftime('%Y-%m-%d %H:%M:%f', 'now')")
    every = " OR ".join(_sqlite_bad(column, "NEW") for column in (*TIMES, *COUNTS, "lease_token"))
    op.execute(
        "CREATE TRIGGER tracker_batches_refuse_malformed_insert "
        f"AFTER INSERT ON tracker_batches WHEN {every} "
        "BEGIN SELECT RAISE(ABORT, 'tracker_batches: a timestamp column holds something that is "
        "not a UTC timestamp, or a counter is not a whole number >= 0'); END"
    )
    for column in (*TIMES, *COUNTS, "lease_token"):
        op.execute(
            f"CREATE TRIGGER tracker_batches_refuse_malformed_{column} "
            f"AFTER UPDATE OF {column} ON tracker_batches WHEN {_sqlite_bad(column, 'NEW')} "
            f"BEGIN SELECT RAISE(ABORT, 'tracker_batches.{column}: not a valid value'); END"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for column in TIMES:
            op.execute(
                f"ALTER TABLE tracker_batches DROP CONSTRAINT ck_tracker_batches_{column}_finite"
            )
        for column in (*COUNTS, "lease_token"):
            op.execute(
                f"ALTER TABLE tracker_batches DROP CONSTRAINT ck_tracker_batches_{column}_range"
            )
        return
    op.execute("DROP TRIGGER tracker_batches_refuse_malformed_insert")
    for column in (*TIMES, *COUNTS, "lease_token"):
        op.execute(f"DROP TRIGGER tracker_batches_refuse_malformed_{column}")


def _sqlite_bad(column: str, row: str) -> str:
    value = f"{row}.{column}"
    if column in COUNTS or column == "lease_token":
        # No upper bound on UPDATE: a claim leaves a token at its maximum as it is.
        return f"(typeof({value}) != 'integer' OR {value} < 0)"
    return (
        f"({value} IS NOT NULL AND (typeof({value}) != 'text' "
        f"OR {value} NOT GLOB '{TIMESTAMP_GLOB}' OR julianday({value}) IS NULL))"
    )


def _sqlite_problem(column: str) -> tuple[str, str]:
    """(the condition, the phrase naming the raw value) for one column, on SQLite."""
    bad = _sqlite_bad(column, "tracker_batches")
    if column in COUNTS:
        bad = f"({bad} OR {column} >= {INTEGER_MAX})"
    kind = "is not a timestamp" if column in TIMES else "is not a count the tracker can keep"
    return bad, f"'{column}=' || quote({column}) || ' {kind}'"


def _postgres_problem(column: str) -> tuple[str, str]:
    if column in TIMES:
        bad = f"({column} IS NOT NULL AND NOT isfinite({column}))"
        return bad, f"'{column}=' || quote_literal({column}::text) || ' is not a timestamp'"
    bad = f"({column} < 0 OR {column} >= {INTEGER_MAX})"
    return bad, f"'{column}=' || {column} || ' is not a count the tracker can keep'"


def _reject_existing(problem_of: Callable[[str], tuple[str, str]], *, now: str) -> None:
    """Reject the unfinished rows that already break the new rules, naming each bad value,
    and make every such row readable (the constraints below must hold for all rows)."""
    problems = [problem_of(column) for column in (*TIMES, *COUNTS)]
    any_bad = " OR ".join(bad for bad, _ in problems)
    phrases = (
        "rtrim("
        + " || ".join(
            f"CASE WHEN {bad} THEN {phrase} || '; ' ELSE '' END" for bad, phrase in problems
        )
        + ", '; ')"
    )
    rejected = "CASE WHEN state = 'ready' THEN 'failed' ELSE 'rejected' END"
    op.execute(
        "INSERT INTO tracker_transitions (batch_id, request_id, from_state, to_state, at, detail) "  # noqa: S608
        f"SELECT id, request_id, state, {rejected}, {now}, 'malformed row: ' || {phrases} "
        f"FROM tracker_batches WHERE state IN {ACTIVE} AND ({any_bad})"
    )
    # A rejected row is final: no next check, finished now. Elsewhere a bad time is dropped
    # (or, where one is required, replaced by now); the raw value is in last_error.
    final = {"next_check_at": "NULL", "finished_at": now, "lease_expires_at": "NULL"}
    fixes = [
        f"{column} = CASE "
        + (f"WHEN state IN {ACTIVE} THEN {final[column]} " if column in final else "")
        + f"WHEN {bad} THEN {'NULL' if column not in REQUIRED_TIMES else now} ELSE {column} END"
        for column, (bad, _) in zip(TIMES, problems, strict=False)
    ] + [
        f"{column} = CASE WHEN {bad} THEN 0 ELSE {column} END"
        for column, (bad, _) in zip(COUNTS, problems[len(TIMES) :], strict=True)
    ]
    op.execute(
        "UPDATE tracker_batches SET "  # noqa: S608
        f"last_error = CASE WHEN state IN {ACTIVE} THEN 'malformed row: ' || {phrases} "
        "ELSE last_error END, "
        f"state = CASE WHEN state IN {ACTIVE} THEN {rejected} ELSE state END, "
        "lease_owner = NULL, " + ", ".join(fixes) + f" WHERE {any_bad}"
    )
