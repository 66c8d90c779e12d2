"""Every database operation of the tracker, on SQLite and PostgreSQL alike.

Writes by a worker are guarded by the lease token it claimed with and by the state it
read: zero rows updated means someone else (another instance, an operator, a hand edit)
changed the batch meanwhile, and the write is dropped as a conflict, never forced.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from tracker.domain.policy import Decision, Tracked
from tracker.domain.states import ACTIVE_STATES, TERMINAL_STATES, State, check_transition
from tracker.schema import batches, instances, transitions

_ACTIVE = sorted(s.value for s in ACTIVE_STATES)
_TERMINAL = sorted(s.value for s in TERMINAL_STATES)


@dataclass(frozen=True)
class StoredFile:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class BatchWrite:
    """A worker's decision about a batch it claimed, ready to be written back."""

    batch: Tracked
    decision: Decision
    file: StoredFile | None = None
    # Keep the lease while a download that follows this write is still running.
    keep_lease: bool = False


@dataclass(frozen=True)
class LeaseExtension:
    """A keep-alive for a batch whose download is still running."""

    batch: Tracked
    lease_seconds: float


@dataclass(frozen=True)
class BatchRow:
    id: int
    request_id: str
    label: str | None
    state: str
    created_at: datetime
    updated_at: datetime
    next_check_at: datetime | None
    checks: int
    api_status: int | None
    api_message: str | None
    file_path: str | None
    file_size: int | None
    file_sha256: str | None
    last_error: str | None
    finished_at: datetime | None
    faults: int
    rejections: int
    download_attempts: int
    lease_owner: str | None
    lease_token: int
    lease_expires_at: datetime | None
    hook_pending: bool


@dataclass(frozen=True)
class TransitionRow:
    id: int
    batch_id: int
    request_id: str
    from_state: str
    to_state: str
    at: datetime
    api_status: int | None
    api_message: str | None
    detail: str | None


class OperatorResult(StrEnum):
    DONE = "done"
    NOT_FOUND = "not_found"
    WRONG_STATE = "wrong_state"


class Store:
    def __init__(self, engine: sa.Engine, *, final_hook: bool = False) -> None:
        self.engine = engine
        self._dialect = engine.dialect.name
        # With TRACKER_ON_FINAL configured, every batch that becomes final is queued for it.
        self.final_hook = final_hook
        self._batch_update = _batch_update()
        self._claim = _claim()
        self._lease_update = _lease_update()

    # --- producers and operators -------------------------------------------------

    def enqueue(self, request_id: str, label: str | None = None) -> bool:
        """Track `request_id`; False when it was already tracked (not an error)."""
        insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        statement = (
            insert(batches)
            .values(request_id=request_id, label=label)
            .on_conflict_do_nothing(index_elements=["request_id"])
            # rowcount is not reliable for inserts on every driver; a returned id is.
            .returning(batches.c.id)
        )
        with self.engine.begin() as connection:
            return connection.execute(statement).first() is not None

    def enqueue_many(self, request_ids: Sequence[str], label: str | None = None) -> set[str]:
        """Track many ids in one statement; the ids that were new."""
        if not request_ids:
            return set()
        insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        statement = (
            insert(batches)
            .values([{"request_id": request_id, "label": label} for request_id in request_ids])
            .on_conflict_do_nothing(index_elements=["request_id"])
            .returning(batches.c.request_id)
        )
        with self.engine.begin() as connection:
            return set(connection.execute(statement).scalars())

    def get(self, request_id: str) -> BatchRow | None:
        with self.engine.begin() as connection:
            row = connection.execute(
                sa.select(batches).where(batches.c.request_id == request_id)
            ).first()
        return BatchRow(**row._mapping) if row is not None else None

    def list_batches(self, state: State | None = None, limit: int | None = None) -> list[BatchRow]:
        query = sa.select(batches).order_by(batches.c.id)
        if state is not None:
            query = query.where(batches.c.state == state.value)
        if limit is not None:
            query = query.limit(limit)
        with self.engine.begin() as connection:
            return [BatchRow(**row._mapping) for row in connection.execute(query)]

    def history(self, batch_id: int) -> list[TransitionRow]:
        query = (
            sa.select(transitions)
            .where(transitions.c.batch_id == batch_id)
            .order_by(transitions.c.id)
        )
        with self.engine.begin() as connection:
            return [TransitionRow(**row._mapping) for row in connection.execute(query)]

    def count_by_state(self, label: str | None = None) -> dict[str, int]:
        query = sa.select(batches.c.state, sa.func.count()).group_by(batches.c.state)
        if label is not None:
            query = query.where(batches.c.label == label)
        with self.engine.begin() as connection:
            return {state: count for state, count in connection.execute(query)}

    def next_check_due(self) -> datetime | None:
        """The earliest scheduled check among unfinished batches (None: none scheduled)."""
        query = sa.select(sa.func.min(batches.c.next_check_at)).where(batches.c.state.in_(_ACTIVE))
        with self.engine.begin() as connection:
            due: datetime | None = connection.execute(query).scalar_one_or_none()
        return due

    def recent_transitions(self, limit: int, label: str | None = None) -> list[TransitionRow]:
        """The latest transitions, newest first (ids grow with every write)."""
        query = sa.select(transitions).order_by(transitions.c.id.desc()).limit(limit)
        if label is not None:
            query = query.join(batches, batches.c.id == transitions.c.batch_id).where(
                batches.c.label == label
            )
        with self.engine.begin() as connection:
            return [TransitionRow(**row._mapping) for row in connection.execute(query)]

    def load_history(
        self, since: datetime
    ) -> tuple[list[tuple[datetime, datetime | None]], datetime | None, int]:
        """What the budget-aware schedule learns the load from.

        The (created_at, finished_at) of every batch that is unfinished, or was created or
        finished since `since`; when the oldest batch was created; how many are unfinished.
        """
        recent = sa.select(batches.c.created_at, batches.c.finished_at).where(
            sa.or_(
                batches.c.state.in_(_ACTIVE),
                batches.c.created_at >= since,
                batches.c.finished_at >= since,
            )
        )
        first = sa.select(sa.func.min(batches.c.created_at))
        unfinished = sa.select(sa.func.count()).where(batches.c.state.in_(_ACTIVE))
        with self.engine.begin() as connection:
            lifetimes = [(row.created_at, row.finished_at) for row in connection.execute(recent)]
            first_seen: datetime | None = connection.execute(first).scalar_one_or_none()
            open_batches = int(connection.execute(unfinished).scalar_one())
        return lifetimes, first_seen, open_batches

    def oldest_unfinished(self) -> BatchRow | None:
        query = (
            sa.select(batches)
            .where(batches.c.state.in_(_ACTIVE))
            .order_by(batches.c.created_at, batches.c.id)
            .limit(1)
        )
        with self.engine.begin() as connection:
            row = connection.execute(query).first()
        return BatchRow(**row._mapping) if row is not None else None

    def recent_errors(self, limit: int = 10) -> list[BatchRow]:
        """Batches with a last_error, most recently updated first."""
        query = (
            sa.select(batches)
            .where(batches.c.last_error.is_not(None))
            .order_by(batches.c.updated_at.desc(), batches.c.id.desc())
            .limit(limit)
        )
        with self.engine.begin() as connection:
            return [BatchRow(**row._mapping) for row in connection.execute(query)]

    def retry(self, request_id: str, now: datetime) -> tuple[OperatorResult, str | None]:
        """Put a terminal batch back to pending, as an operator asked."""
        return self._operator_move(
            request_id,
            allowed_from=_TERMINAL,
            to_state=State.PENDING,
            now=now,
            detail="retried by an operator",
            values={
                "next_check_at": None,
                "finished_at": None,
                "last_error": None,
                "faults": 0,
                "rejections": 0,
                "download_attempts": 0,
                "file_path": None,
                "file_size": None,
                "file_sha256": None,
            },
        )

    def cancel(self, request_id: str, now: datetime) -> tuple[OperatorResult, str | None]:
        return self._operator_move(
            request_id,
            allowed_from=_ACTIVE,
            to_state=State.CANCELLED,
            now=now,
            detail="cancelled by an operator",
            values={"finished_at": now, "next_check_at": None, "hook_pending": self.final_hook},
        )

    def _operator_move(
        self,
        request_id: str,
        *,
        allowed_from: list[str],
        to_state: State,
        now: datetime,
        detail: str,
        values: dict[str, Any],
    ) -> tuple[OperatorResult, str | None]:
        with self.engine.begin() as connection:
            row = connection.execute(
                sa.select(batches.c.id, batches.c.state).where(batches.c.request_id == request_id)
            ).first()
            if row is None:
                return OperatorResult.NOT_FOUND, None
            if row.state not in allowed_from:
                return OperatorResult.WRONG_STATE, row.state
            # Bumping the token fences out any worker still holding a lease on the batch.
            updated = connection.execute(
                batches.update()
                .where(batches.c.id == row.id, batches.c.state == row.state)
                .values(
                    state=to_state.value,
                    updated_at=now,
                    lease_owner=None,
                    lease_expires_at=None,
                    lease_token=batches.c.lease_token + 1,
                    **values,
                )
            ).rowcount
            if updated != 1:
                return OperatorResult.WRONG_STATE, None
            connection.execute(
                transitions.insert().values(
                    batch_id=row.id,
                    request_id=request_id,
                    from_state=row.state,
                    to_state=to_state.value,
                    at=now,
                    detail=detail,
                )
            )
        return OperatorResult.DONE, row.state

    # --- workers -----------------------------------------------------------------

    def claim_due(
        self, owner: str, limit: int, lease_seconds: float, now: datetime
    ) -> list[Tracked]:
        """Lease up to `limit` due, unfinished, unleased batches to `owner`.

        One statement in one short transaction. PostgreSQL skips rows another instance
        is claiming at this very moment; SQLite's BEGIN IMMEDIATE makes claims take turns.
        """
        if limit <= 0:
            return []
        parameters = {
            "owner": owner,
            "limit": limit,
            "now": now,
            "expires_at": now + timedelta(seconds=lease_seconds),
        }
        with self.engine.begin() as connection:
            rows = connection.execute(self._claim, parameters).all()
        claimed = [
            Tracked(
                id=row.id,
                request_id=row.request_id,
                state=State(row.state),
                lease_token=row.lease_token,
                checks=row.checks,
                faults=row.faults,
                rejections=row.rejections,
                download_attempts=row.download_attempts,
                created_at=row.created_at,
            )
            for row in rows
        ]
        claimed.sort(key=lambda batch: batch.id)
        return claimed

    def apply(self, writes: Sequence[BatchWrite | LeaseExtension], now: datetime) -> list[bool]:
        """Write many decisions (and lease keep-alives) in one transaction.

        Per item, whether it still held its lease. The statements are built once per Store
        and only their parameters change: building and cache-keying a fresh UPDATE for
        every write cost more CPU than executing it.
        """
        decisions = [item for item in writes if isinstance(item, BatchWrite)]
        with self.engine.begin() as connection:
            applied = self._apply_decisions(connection, decisions, now)
            new_transitions = [
                _transition_row(write, now)
                for write, ok in zip(decisions, applied, strict=True)
                if ok and write.decision.to_state is not write.batch.state
            ]
            if new_transitions:
                connection.execute(transitions.insert(), new_transitions)
            decided = iter(applied)
            return [
                next(decided)
                if isinstance(item, BatchWrite)
                else self._extend_one(connection, item, now)
                for item in writes
            ]

    def _apply_decisions(
        self, connection: sa.Connection, writes: Sequence[BatchWrite], now: datetime
    ) -> list[bool]:
        """Per write, whether it still held its lease."""
        for write in writes:
            if write.decision.to_state is not write.batch.state:
                check_transition(write.batch.state, write.decision.to_state)
        if len(writes) > 1:
            # One executemany when every write holds its lease, the usual case; should any
            # miss, undo it and find out which, one statement each.
            parameters = [self._decision_parameters(write, now) for write in writes]
            with connection.begin_nested() as savepoint:
                if connection.execute(self._batch_update, parameters).rowcount == len(writes):
                    return [True] * len(writes)
                savepoint.rollback()
        return [self._apply_one(connection, write, now) for write in writes]

    def _apply_one(self, connection: sa.Connection, write: BatchWrite, now: datetime) -> bool:
        parameters = self._decision_parameters(write, now)
        return connection.execute(self._batch_update, parameters).rowcount == 1

    def _decision_parameters(self, write: BatchWrite, now: datetime) -> dict[str, Any]:
        batch, decision = write.batch, write.decision
        final = decision.to_state in TERMINAL_STATES
        checked = decision.checked
        file = write.file
        return {
            "w_id": batch.id,
            "w_request_id": batch.request_id,
            "w_lease_token": batch.lease_token,
            "w_state": batch.state.value,
            "n_state": decision.to_state.value,
            "n_now": now,
            "n_next_check_at": None if final else decision.next_check_at,
            "n_checked": 1 if checked else 0,
            "n_faults": decision.faults,
            "n_rejections": decision.rejections,
            "n_download_attempts": decision.download_attempts,
            "n_last_error": decision.last_error,
            # NULL keeps the stored value: see _batch_update.
            "n_api_status": decision.api_status if checked else None,
            "n_api_message": decision.api_message if checked else None,
            "n_finished_at": now if final else None,
            "n_hook_pending": self.final_hook if final else None,
            "n_file_path": None if file is None else file.path,
            "n_file_size": None if file is None else file.size,
            "n_file_sha256": None if file is None else file.sha256,
            "n_release": not write.keep_lease,
        }

    def _extend_one(self, connection: sa.Connection, item: LeaseExtension, now: datetime) -> bool:
        parameters = {
            "w_id": item.batch.id,
            "w_lease_token": item.batch.lease_token,
            "n_expires_at": now + timedelta(seconds=item.lease_seconds),
        }
        return connection.execute(self._lease_update, parameters).rowcount == 1

    def release_owned(self, owner: str) -> int:
        """Hand back every lease `owner` holds; only when none of its work is in flight."""
        with self.engine.begin() as connection:
            return connection.execute(
                batches.update()
                .where(batches.c.lease_owner == owner)
                .values(lease_owner=None, lease_expires_at=None)
            ).rowcount

    def release(self, claimed: Sequence[Tracked]) -> int:
        """Hand batches back untouched (shutdown, service-wide auth failure)."""
        if not claimed:
            return 0
        released = 0
        with self.engine.begin() as connection:
            for batch in claimed:
                released += connection.execute(
                    batches.update()
                    .where(batches.c.id == batch.id, batches.c.lease_token == batch.lease_token)
                    .values(lease_owner=None, lease_expires_at=None)
                ).rowcount
        return released

    def claim_final_hooks(self, limit: int) -> list[BatchRow]:
        """Take up to `limit` batches whose on-final hook has not run yet.

        The flag is cleared as the batch is taken, so each hook runs at most once even with
        several instances; a crash while the hook runs loses that run (documented).
        """
        pending = (
            sa.select(batches.c.id)
            .where(batches.c.hook_pending.is_(True))
            .order_by(batches.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        claim = (
            batches.update()
            .where(batches.c.id.in_(pending.scalar_subquery()))
            .values(hook_pending=False)
            .returning(*batches.c)
        )
        with self.engine.begin() as connection:
            rows = [BatchRow(**row._mapping) for row in connection.execute(claim)]
        return sorted(rows, key=lambda row: row.id)

    def prune(self, finished_before: datetime, chunk: int = 500) -> Iterator[list[BatchRow]]:
        """Delete final batches (and their transitions) finished before the cutoff.

        One short transaction per chunk, so a daemon working on the same tables is never
        blocked for long. Yields each deleted chunk (for removing files).
        """
        while True:
            doomed = (
                sa.select(batches.c.id)
                .where(batches.c.state.in_(_TERMINAL), batches.c.finished_at < finished_before)
                .order_by(batches.c.id)
                .limit(chunk)
                .with_for_update(skip_locked=True)
            )
            with self.engine.begin() as connection:
                rows = [
                    BatchRow(**row._mapping)
                    for row in connection.execute(
                        sa.select(batches).where(batches.c.id.in_(doomed.scalar_subquery()))
                    )
                ]
                if not rows:
                    return
                ids = [row.id for row in rows]
                # Explicit rather than relying on ON DELETE CASCADE, which SQLite honours
                # only on connections that enabled foreign keys.
                connection.execute(transitions.delete().where(transitions.c.batch_id.in_(ids)))
                connection.execute(
                    batches.delete().where(batches.c.id.in_(ids), batches.c.state.in_(_TERMINAL))
                )
            yield rows

    # --- instances and health ------------------------------------------------------

    def register_instance(self, owner: str, host: str, pid: int, now: datetime) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                instances.insert().values(owner=owner, host=host, pid=pid, started_at=now)
            )

    def record_sweep(self, owner: str, now: datetime) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                instances.update().where(instances.c.owner == owner).values(last_sweep_at=now)
            )

    def mark_stopped(self, owner: str, now: datetime) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                instances.update().where(instances.c.owner == owner).values(stopped_at=now)
            )

    def last_sweep(self, host: str | None = None) -> datetime | None:
        """When a running instance (on `host`, if given) last finished a sweep."""
        query = sa.select(sa.func.max(instances.c.last_sweep_at)).where(
            instances.c.stopped_at.is_(None)
        )
        if host is not None:
            query = query.where(instances.c.host == host)
        with self.engine.begin() as connection:
            last: datetime | None = connection.execute(query).scalar_one_or_none()
        return last


def _batch_update() -> sa.Update:
    """The one UPDATE every worker write uses, guarded by what the worker claimed and read.

    Optional columns take `coalesce(:new, column)`: a NULL parameter keeps what is stored,
    so one statement shape serves every kind of decision.
    """
    c = batches.c
    keep = sa.func.coalesce
    return (
        batches.update()
        .where(
            c.id == sa.bindparam("w_id"),
            c.request_id == sa.bindparam("w_request_id"),
            c.lease_token == sa.bindparam("w_lease_token"),
            c.state == sa.bindparam("w_state"),
            # A write that already committed released the lease: retrying it after a
            # lost connection must not count the same check twice.
            c.lease_owner.is_not(None),
        )
        .values(
            state=sa.bindparam("n_state"),
            updated_at=sa.bindparam("n_now", type_=c.updated_at.type),
            next_check_at=sa.bindparam("n_next_check_at", type_=c.next_check_at.type),
            checks=c.checks + sa.bindparam("n_checked", type_=sa.Integer),
            faults=sa.bindparam("n_faults"),
            rejections=sa.bindparam("n_rejections"),
            download_attempts=sa.bindparam("n_download_attempts"),
            last_error=sa.bindparam("n_last_error", type_=c.last_error.type),
            api_status=keep(sa.bindparam("n_api_status", type_=c.api_status.type), c.api_status),
            api_message=keep(
                sa.bindparam("n_api_message", type_=c.api_message.type), c.api_message
            ),
            finished_at=keep(
                sa.bindparam("n_finished_at", type_=c.finished_at.type), c.finished_at
            ),
            hook_pending=keep(
                sa.bindparam("n_hook_pending", type_=c.hook_pending.type), c.hook_pending
            ),
            file_path=keep(sa.bindparam("n_file_path", type_=c.file_path.type), c.file_path),
            file_size=keep(sa.bindparam("n_file_size", type_=c.file_size.type), c.file_size),
            file_sha256=keep(
                sa.bindparam("n_file_sha256", type_=c.file_sha256.type), c.file_sha256
            ),
            lease_owner=sa.case(
                (sa.bindparam("n_release", type_=sa.Boolean), sa.null()), else_=c.lease_owner
            ),
            lease_expires_at=sa.case(
                (sa.bindparam("n_release", type_=sa.Boolean), sa.null()),
                else_=c.lease_expires_at,
            ),
        )
    )


def _claim() -> sa.Update:
    """Lease the due, unfinished, unleased batches, oldest due first."""
    c = batches.c
    now = sa.bindparam("now", type_=c.next_check_at.type)
    due = (
        sa.select(c.id)
        .where(
            c.state.in_(_ACTIVE),
            sa.or_(c.next_check_at.is_(None), c.next_check_at <= now),
            sa.or_(c.lease_expires_at.is_(None), c.lease_expires_at < now),
        )
        .order_by(c.next_check_at.nulls_first(), c.id)
        .limit(sa.bindparam("limit", type_=sa.Integer))
        .with_for_update(skip_locked=True)
    )
    return (
        batches.update()
        .where(c.id.in_(due.scalar_subquery()))
        .values(
            lease_owner=sa.bindparam("owner"),
            lease_token=c.lease_token + 1,
            lease_expires_at=sa.bindparam("expires_at", type_=c.lease_expires_at.type),
        )
        .returning(
            c.id,
            c.request_id,
            c.state,
            c.lease_token,
            c.checks,
            c.faults,
            c.rejections,
            c.download_attempts,
            c.created_at,
        )
    )


def _lease_update() -> sa.Update:
    c = batches.c
    return (
        batches.update()
        .where(c.id == sa.bindparam("w_id"), c.lease_token == sa.bindparam("w_lease_token"))
        .values(lease_expires_at=sa.bindparam("n_expires_at", type_=c.lease_expires_at.type))
    )


def _transition_row(write: BatchWrite, now: datetime) -> dict[str, Any]:
    batch, decision = write.batch, write.decision
    return {
        "batch_id": batch.id,
        "request_id": batch.request_id,
        "from_state": batch.state.value,
        "to_state": decision.to_state.value,
        "at": now,
        "api_status": decision.api_status,
        "api_message": decision.api_message,
        "detail": decision.detail,
    }
