"""Every database operation of the tracker, on SQLite and PostgreSQL alike.

Writes by a worker are guarded by the lease token it claimed with and by the state it
read: zero rows updated means someone else (another instance, an operator, a hand edit)
changed the batch meanwhile, and the write is dropped as a conflict, never forced.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from tracker.db import describe_db_error
from tracker.domain.model import Decision, Tracked
from tracker.domain.states import (
    ACTIVE_STATES,
    POLLED_STATES,
    TERMINAL_STATES,
    State,
    can_transition,
)
from tracker.schema import UnreadableTimestamp, batches, instances, transitions

_ACTIVE = sorted(s.value for s in ACTIVE_STATES)
_TERMINAL = sorted(s.value for s in TERMINAL_STATES)
_POLLED = sorted(s.value for s in POLLED_STATES)


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
    # When a webhook delivery last brought this batch's check forward.
    hinted_at: datetime | None = None


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
    brought_forward: bool = False


class OperatorResult(StrEnum):
    DONE = "done"
    NOT_FOUND = "not_found"
    WRONG_STATE = "wrong_state"


class WriteRefused(Exception):
    """One write of a group could not be applied (a forbidden transition, a value the
    database refused). The rest of its group was committed; its batch was handed back with
    this message as its last_error."""


@dataclass(frozen=True)
class InstanceRow:
    owner: str
    host: str
    pid: int
    boot_id: str | None
    heartbeat_at: datetime | None


@dataclass(frozen=True)
class InstanceReport:
    """One daemon as the console shows it: who, where, since when, last heard from."""

    owner: str
    host: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime | None
    last_sweep_at: datetime | None
    stopped_at: datetime | None
    # When its webhook listener last took a delivery with the right secret.
    last_delivery_at: datetime | None = None


def connection_lost(error: sa.exc.DBAPIError) -> bool:
    """The connection failed (the server went away, a lock wait timed out), as opposed to
    the database refusing one statement's values: the whole transaction is worth retrying."""
    return error.connection_invalidated or isinstance(error, sa.exc.OperationalError)


class Store:
    def __init__(
        self, engine: sa.Engine, *, final_hook: bool = False, refused_retry: float = 900.0
    ) -> None:
        self.engine = engine
        self._dialect = engine.dialect.name
        # With TRACKER_ON_FINAL configured, every batch that becomes final is queued for it.
        self.final_hook = final_hook
        # A write the database refused would be refused again: its batch is looked at again
        # after this long (the longest poll interval), not at sweep speed, each time
        # spending a status call.
        self.refused_retry = refused_retry
        self._batch_update = _batch_update()
        self._claim = _claim(self._dialect)
        self._count_due = _count_due(self._dialect)
        self._lease_update = _lease_update()
        self._hand_back = _hand_back()
        self._heartbeat = _heartbeat()
        self._bring_forward = _bring_forward(self._dialect)

    def database_now(self) -> datetime:
        """The database's clock (PostgreSQL's; on SQLite, one host, the host's)."""
        with self.engine.begin() as connection:
            return self._now_in(connection)

    def _now_in(self, connection: sa.Connection) -> datetime:
        if self._dialect == "postgresql":
            now: datetime = connection.execute(
                sa.select(sa.func.clock_timestamp(type_=sa.DateTime(timezone=True)))
            ).scalar_one()
            return now.astimezone(UTC)
        return datetime.now(UTC)

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

    def batch_page(
        self,
        *,
        limit: int,
        before_id: int | None = None,
        state: str | None = None,
        label: str | None = None,
        request_id_prefix: str | None = None,
    ) -> list[BatchRow]:
        """Up to `limit` batches, newest (highest id) first, below `before_id` if given."""
        query = batch_page_query(
            self._dialect,
            limit=limit,
            before_id=before_id,
            state=state,
            label=label,
            request_id_prefix=request_id_prefix,
        )
        with self.engine.begin() as connection:
            return [BatchRow(**row._mapping) for row in connection.execute(query)]

    def count_unfinished_created_before(self, cutoffs: Sequence[datetime]) -> list[int]:
        """For each cutoff, how many unfinished batches were created before it (one scan)."""
        if not cutoffs:
            return []
        c = batches.c
        query = sa.select(
            *(
                sa.func.coalesce(sa.func.sum(sa.case((c.created_at < cutoff, 1), else_=0)), 0)
                for cutoff in cutoffs
            )
        ).where(_unfinished())
        with self.engine.begin() as connection:
            return [int(count) for count in connection.execute(query).one()]

    def instance_reports(self, limit: int) -> list[InstanceReport]:
        """The instances not known to have stopped, then the most recently started others."""
        c = instances.c
        query = (
            sa.select(
                c.owner,
                c.host,
                c.pid,
                c.started_at,
                c.heartbeat_at,
                c.last_sweep_at,
                c.stopped_at,
                c.last_delivery_at,
            )
            .order_by(c.stopped_at.is_not(None), c.started_at.desc(), c.owner)
            .limit(limit)
        )
        with self.engine.begin() as connection:
            return [InstanceReport(**row._mapping) for row in connection.execute(query)]

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

    def next_check_due(self, now: datetime, max_age: float | None = None) -> datetime | None:
        """When the next unfinished batch can be claimed (None: none is scheduled).

        A batch leased by someone else counts from its lease's end, not from its due time:
        waking for a batch that cannot be claimed would only spin. A batch counts from its
        deadline (created_at + max_age) when that comes before its next check.
        """
        c = batches.c
        leased = c.lease_expires_at >= now
        free = sa.or_(c.lease_expires_at.is_(None), c.lease_expires_at < now)
        query = sa.select(
            sa.func.min(sa.case((free, c.next_check_at))),
            sa.func.min(sa.case((leased, c.lease_expires_at))),
            sa.func.min(sa.case((free, c.created_at))),
        ).where(_unfinished())
        with self.engine.begin() as connection:
            next_free, lease_ends, oldest_free = connection.execute(query).one()
        # A value no clock can reach ('soon', 'infinity') is left to the next interval sweep,
        # which claims the row and rejects it as malformed.
        times: list[datetime] = [
            t for t in (next_free, lease_ends) if t is not None and _readable(t)
        ]
        if max_age is not None and oldest_free is not None and _readable(oldest_free):
            times.append(oldest_free + timedelta(seconds=max_age))
        return min(times, default=None)

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
        unfinished = sa.select(sa.func.count()).where(_unfinished())
        with self.engine.begin() as connection:
            lifetimes = [(row.created_at, row.finished_at) for row in connection.execute(recent)]
            first_seen: datetime | None = connection.execute(first).scalar_one_or_none()
            open_batches = int(connection.execute(unfinished).scalar_one())
        return lifetimes, first_seen, open_batches

    def oldest_unfinished(self) -> BatchRow | None:
        query = (
            sa.select(batches)
            .where(_unfinished())
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
                # The hook runs for final states only: one not yet run for the state left
                # behind is dropped, and the next final transition sets it again.
                "hook_pending": False,
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

    def bring_forward(
        self, request_ids: Collection[str], now: datetime, spacing: float
    ) -> set[str]:
        """Move the next check of the named tracked, unfinished batches to `now`; the
        request_ids moved.

        A webhook delivery is only a hint: state, counters, file and lease stay as they are
        (a leased batch is moved too: its lease still keeps every other worker off it). A
        batch brought forward less than `spacing` seconds ago, or already due, is left
        alone, so however many deliveries name it, it gets one early check per `spacing`.
        Unknown ids are ignored. One statement whatever the number of ids.
        """
        if not request_ids:
            return set()
        parameters = {
            "ids": sorted(set(request_ids)),
            "now": now,
            "hinted_before": _hinted_before(now, spacing),
        }
        with self.engine.begin() as connection:
            moved = set(connection.execute(self._bring_forward, parameters).scalars())
            if moved and self._dialect == "postgresql":
                # Every instance sweeps at once, as for a new batch (LISTEN tracker_wakeup).
                connection.execute(sa.text("SELECT pg_notify('tracker_wakeup', '')"))
        return moved

    # --- workers -----------------------------------------------------------------

    def claim_due(
        self,
        owner: str,
        limit: int,
        lease_seconds: float,
        now: datetime | None = None,
        *,
        max_age: float | None = None,
    ) -> list[Tracked]:
        """Lease up to `limit` due, unfinished, unleased batches to `owner`.

        A batch is due when its next check has come, or when it is older than `max_age`
        (so that it expires whatever its next_check_at says). Times are the database's
        unless `now` is given. The same short transaction refreshes the owner's heartbeat:
        an instance found silent is freed while its row is locked (`free_silent_instances`),
        so a claim is never made by an owner being declared dead at that very moment.
        PostgreSQL skips rows another instance is claiming right now; SQLite's BEGIN
        IMMEDIATE makes claims take turns.
        """
        if limit <= 0:
            return []
        with self.engine.begin() as connection:
            now = self._now_in(connection) if now is None else now
            connection.execute(self._heartbeat, _heartbeat_parameters(owner, now, None))
            parameters = {
                "owner": owner,
                "limit": limit,
                "now": now,
                "expired_before": _expired_before(now, max_age),
                "expires_at": now + timedelta(seconds=lease_seconds),
            }
            rows = connection.execute(self._claim, parameters).all()
        claimed = [_tracked(row, now) for row in rows]
        claimed.sort(key=lambda batch: batch.id)
        return claimed

    def count_due(self, limit: int, now: datetime, *, max_age: float | None = None) -> int:
        """How many batches `claim_due` would find now, up to `limit`; reads, never writes.

        Lets a sweep with nothing to do end without reserving call permits.
        """
        parameters = {"limit": limit, "now": now, "expired_before": _expired_before(now, max_age)}
        with self.engine.begin() as connection:
            return int(connection.execute(self._count_due, parameters).scalar_one())

    def apply(
        self, writes: Sequence[BatchWrite | LeaseExtension], now: datetime
    ) -> list[bool | WriteRefused]:
        """Write many decisions (and lease keep-alives) in one transaction.

        Per item: True when applied, False when it no longer held its lease, WriteRefused
        when it could not be applied at all; such a write fails alone, the rest of the group
        commits, and its batch is handed back. Lost connections raise, for the whole group
        to be retried. The statements are built once per Store and only their parameters
        change: building and cache-keying a fresh UPDATE for every write cost more CPU than
        executing it.
        """
        decisions = [item for item in writes if isinstance(item, BatchWrite)]
        with self.engine.begin() as connection:
            outcomes = self._apply_decisions(connection, decisions, now)
            new_transitions = [
                _transition_row(write, now)
                for write, outcome in zip(decisions, outcomes, strict=True)
                if outcome is True and write.decision.to_state is not write.batch.state
            ]
            if new_transitions:
                connection.execute(transitions.insert(), new_transitions)
            for write, outcome in zip(decisions, outcomes, strict=True):
                if isinstance(outcome, WriteRefused):
                    self._hand_back_refused(connection, write, str(outcome), now)
            decided = iter(outcomes)
            return [
                next(decided)
                if isinstance(item, BatchWrite)
                else self._extend_one(connection, item, now)
                for item in writes
            ]

    def _apply_decisions(
        self, connection: sa.Connection, writes: Sequence[BatchWrite], now: datetime
    ) -> list[bool | WriteRefused]:
        outcomes: list[bool | WriteRefused] = [
            WriteRefused(
                f"a batch cannot go from {write.batch.state} to {write.decision.to_state}; "
                "the result was not recorded"
            )
            if not _allowed(write)
            else False
            for write in writes
        ]
        valid = [i for i, outcome in enumerate(outcomes) if outcome is False]
        if len(valid) > 1:
            # One executemany when every write holds its lease and is accepted, the usual
            # case; should any miss or fail, undo it and find out which, one statement each.
            parameters = [self._decision_parameters(writes[i], now) for i in valid]
            try:
                with connection.begin_nested() as savepoint:
                    if connection.execute(self._batch_update, parameters).rowcount == len(valid):
                        for i in valid:
                            outcomes[i] = True
                        return outcomes
                    savepoint.rollback()
            except sa.exc.DBAPIError as error:
                if connection_lost(error):
                    raise
        for i in valid:
            outcomes[i] = self._apply_one(connection, writes[i], now)
        return outcomes

    def _apply_one(
        self, connection: sa.Connection, write: BatchWrite, now: datetime
    ) -> bool | WriteRefused:
        parameters = self._decision_parameters(write, now)
        try:
            with connection.begin_nested():
                return bool(connection.execute(self._batch_update, parameters).rowcount == 1)
        except sa.exc.DBAPIError as error:
            if connection_lost(error):
                raise
            return WriteRefused(
                f"the database refused the result: {describe_db_error(error)}; it was not recorded"
            )

    def _hand_back_refused(
        self, connection: sa.Connection, write: BatchWrite, reason: str, now: datetime
    ) -> None:
        batch = write.batch
        parameters = {
            "w_id": batch.id,
            "w_lease_token": batch.lease_token,
            "n_now": now,
            "n_last_error": reason,
            "n_next_check_at": now + timedelta(seconds=self.refused_retry),
        }
        try:
            with connection.begin_nested():
                connection.execute(self._hand_back, parameters)
        except sa.exc.DBAPIError as error:
            if connection_lost(error):
                raise
            # Even the hand-back was refused: the lease simply runs out.

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
            "w_claimed_at": batch.claimed_at,
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
        several instances; a crash while the hook runs loses that run (documented). Only
        final batches are taken: a flag left on an open one (an older version's retry kept
        it) is cleared without running the hook.
        """
        stale = (
            batches.update()
            .where(batches.c.hook_pending.is_(True), batches.c.state.not_in(_TERMINAL))
            .values(hook_pending=False)
        )
        pending = (
            sa.select(batches.c.id)
            .where(batches.c.hook_pending.is_(True), batches.c.state.in_(_TERMINAL))
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
            connection.execute(stale)
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

    def leased_request_ids(self, request_ids: Collection[str]) -> set[str]:
        """Which of these batches hold a live lease now (on the database's clock).

        A leased batch may be downloading into its temp file: tracker/leftovers.py keeps
        such files. Ids the table does not hold are simply not leased.
        """
        wanted = sorted(set(request_ids))
        leased: set[str] = set()
        if not wanted:
            return leased
        with self.engine.begin() as connection:
            now = self._now_in(connection)
            for start in range(0, len(wanted), 500):
                query = sa.select(batches.c.request_id).where(
                    batches.c.request_id.in_(wanted[start : start + 500]),
                    batches.c.lease_expires_at >= now,
                )
                leased.update(connection.execute(query).scalars())
        return leased

    # --- instances and health ------------------------------------------------------

    def register_instance(self, owner: str, host: str, pid: int, boot_id: str | None) -> datetime:
        """Record a starting daemon, heartbeating from now on; the database's now."""
        with self.engine.begin() as connection:
            now = self._now_in(connection)
            connection.execute(
                instances.insert().values(
                    owner=owner,
                    host=host,
                    pid=pid,
                    boot_id=boot_id,
                    started_at=now,
                    heartbeat_at=now,
                )
            )
        return now

    def heartbeat(
        self,
        owner: str,
        last_sweep_at: datetime | None = None,
        last_delivery_at: datetime | None = None,
    ) -> datetime:
        """This instance is alive (and swept at `last_sweep_at`, heard a webhook delivery at
        `last_delivery_at`); the database's now.

        A heartbeat also revives an instance that another one had presumed dead (it was
        paused for longer than the timeout): its old leases are gone, its new work is its own.
        """
        with self.engine.begin() as connection:
            now = self._now_in(connection)
            connection.execute(
                self._heartbeat,
                _heartbeat_parameters(owner, now, last_sweep_at, last_delivery_at),
            )
        return now

    def mark_stopped(self, owner: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                instances.update()
                .where(instances.c.owner == owner)
                .values(stopped_at=self._now_in(connection))
            )

    def running_instances(self, host: str) -> list[InstanceRow]:
        """The instances on `host` not known to have stopped."""
        c = instances.c
        query = sa.select(c.owner, c.host, c.pid, c.boot_id, c.heartbeat_at).where(
            c.host == host, c.stopped_at.is_(None)
        )
        with self.engine.begin() as connection:
            return [InstanceRow(**row._mapping) for row in connection.execute(query)]

    def free_silent_instances(self, timeout: float) -> dict[str, int]:
        """Presume dead every instance whose heartbeat is older than `timeout` seconds (on
        the database's clock) and free its leases; per owner freed, the batches it held.

        Instances that never heartbeat (an older version) are left to their lease expiry.
        Rows being heartbeated right now are skipped: that instance is alive.
        """
        return self._free_where(
            lambda now: instances.c.heartbeat_at < now - timedelta(seconds=timeout)
        )

    def free_instances(self, owners: Sequence[str]) -> dict[str, int]:
        """Mark these instances stopped (they are known to be dead) and free their leases."""
        if not owners:
            return {}
        return self._free_where(lambda _now: instances.c.owner.in_(owners))

    def _free_where(self, which: Callable[[datetime], sa.ColumnElement[bool]]) -> dict[str, int]:
        """Lock the running instances `which` selects (given the database's now), skipping
        any row being heartbeated at this very moment, and free them."""
        c = instances.c
        with self.engine.begin() as connection:
            now = self._now_in(connection)
            locked = (
                connection.execute(
                    sa.select(c.owner)
                    .where(c.stopped_at.is_(None), which(now))
                    .order_by(c.owner)
                    .with_for_update(skip_locked=True)
                )
                .scalars()
                .all()
            )
            return self._free(connection, locked, now)

    def _free(
        self, connection: sa.Connection, owners: Sequence[str], now: datetime
    ) -> dict[str, int]:
        # The lease token stays: the dead owner's writes are still fenced out by the
        # released lease (lease_owner IS NULL), and by the next claim's new token.
        freed: dict[str, int] = {}
        for owner in owners:
            connection.execute(
                instances.update().where(instances.c.owner == owner).values(stopped_at=now)
            )
            freed[owner] = connection.execute(
                batches.update()
                .where(batches.c.lease_owner == owner)
                .values(lease_owner=None, lease_expires_at=None)
            ).rowcount
        if any(freed.values()) and self._dialect == "postgresql":
            # Every instance sweeps at once, as for a new batch (LISTEN tracker_wakeup).
            connection.execute(sa.text("SELECT pg_notify('tracker_wakeup', '')"))
        return freed

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

    def last_delivery(self) -> datetime | None:
        """When any instance's webhook listener last took a delivery with the right secret,
        as told by its latest heartbeat (so up to a third of the heartbeat timeout late)."""
        query = sa.select(sa.func.max(instances.c.last_delivery_at))
        with self.engine.begin() as connection:
            last: datetime | None = connection.execute(query).scalar_one_or_none()
        return last


def batch_page_query(
    dialect: str,
    *,
    limit: int,
    before_id: int | None = None,
    state: str | None = None,
    label: str | None = None,
    request_id_prefix: str | None = None,
) -> sa.Select[Any]:
    """The statement behind Store.batch_page (public for its query-plan test and the bench).

    Keyset pagination: each page starts where the last one ended, through the primary key
    (or the state index, whose SQLite entries end with the id), so a page deep in a table
    of millions of rows costs what the first one does. A label's page walks (label, id),
    a state and a label together (state, label, id); a prefix narrows the unique index
    (SQLite's GLOB) or a text_pattern_ops index (PostgreSQL's LIKE) to its range, and sorts
    the matches (migration 0008).
    """
    c = batches.c
    query = sa.select(batches).order_by(c.id.desc()).limit(limit)
    if before_id is not None:
        query = query.where(c.id < before_id)
    if state is not None:
        query = query.where(c.state == state)
    if label is not None:
        query = query.where(c.label == label)
    if request_id_prefix:
        query = query.where(_starts_with(c.request_id, request_id_prefix, dialect))
    if label is not None and dialect == "postgresql":
        # PostgreSQL takes a label's rows as spread over the ids: for a common label it
        # walks the primary key and filters, which passes every newer row first when that
        # label's rows are all old (a label no longer used). Taking the page's ids from the
        # index alone (an index-only scan of (label, id) or (state, label, id)) costs less
        # in its own estimate than any walk of the table once autovacuum has marked the
        # pages all-visible, as it does for a table of finished rows; then the rows by id.
        page_ids = query.with_only_columns(c.id).scalar_subquery()
        return sa.select(batches).where(c.id.in_(page_ids)).order_by(c.id.desc())
    return query


def _starts_with(
    column: sa.ColumnElement[str], prefix: str, dialect: str
) -> sa.ColumnElement[bool]:
    """`column` begins with `prefix`, taken literally (no wildcard), case-sensitively.

    SQLite's LIKE ignores case and cannot use the (binary) unique index; its GLOB can, with
    the pattern's own wildcards put in brackets. PostgreSQL's LIKE is case-sensitive.
    """
    if dialect == "sqlite":
        literal = "".join(f"[{char}]" if char in "*?[" else char for char in prefix)
        return column.op("GLOB", is_comparison=True)(literal + "*")
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return column.like(escaped + "%", escape="\\")


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
            _still_held(),
            c.request_id == sa.bindparam("w_request_id"),
            c.state == sa.bindparam("w_state"),
        )
        .values(
            state=sa.bindparam("n_state"),
            updated_at=sa.bindparam("n_now", type_=c.updated_at.type),
            next_check_at=_next_check_kept_early(),
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


def _next_check_kept_early() -> sa.Case[Any]:
    """The decision's next check, or the hint's moment when a webhook hint arrived during
    this claim.

    The hint then landed while the status call was in flight (see `bring_forward`), maybe
    just after Deepvue answered "still processing": the batch is due again at once, instead
    of after the polling interval the decision planned, and its next check is the hint's
    own moment, as for a hint between checks, so that the claim knows it was brought
    forward. Only a status call decides from a hint: a download's retry time (ready) and a
    final state are kept as planned.
    """
    c = batches.c
    planned = sa.bindparam("n_next_check_at", type_=c.next_check_at.type)
    claimed_at = sa.bindparam("w_claimed_at", type_=c.hinted_at.type)
    return sa.case(
        (
            sa.and_(
                # A list of literals, not an expanding parameter: executemany takes none.
                sa.bindparam("n_state", type_=c.state.type).in_([sa.literal(v) for v in _POLLED]),
                c.hinted_at > claimed_at,
                planned > c.hinted_at,
            ),
            c.hinted_at,
        ),
        else_=planned,
    )


def _unreadable(column: sa.ColumnElement[Any], dialect: str) -> sa.ColumnElement[bool]:
    """The stored value is not a timestamp the tracker can compare or read.

    Another application may write anything: SQLite keeps any text ('soon', 'now'),
    PostgreSQL takes 'infinity'. Such a row is claimed at once, to be rejected as malformed
    (see `_row_problems`), instead of lying in wait or breaking every comparison.
    """
    if dialect == "postgresql":
        return sa.and_(column.is_not(None), sa.not_(sa.func.isfinite(column)))
    text = sa.type_coerce(column, sa.Text)
    return sa.and_(
        column.is_not(None),
        sa.or_(
            sa.func.typeof(column) != "text",
            text.op("NOT GLOB", is_comparison=True)(sa.literal(_TIMESTAMP_GLOB, sa.Text)),
            sa.func.julianday(text).is_(None),
        ),
    )


_TIMESTAMP_GLOB = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]*"
# The largest values the columns hold: a counter there cannot grow, a token cannot advance.
INTEGER_MAX = 2**31 - 1
BIGINT_MAX = 2**63 - 1


def _unfinished() -> sa.ColumnElement[bool]:
    """The batch is unfinished, in the words of ix_tracker_batches_due's own predicate.

    SQLite uses a partial index only when the query repeats the index's WHERE term, and a
    bound parameter never matches one: `state IN (?, ?, ?)` made the claim read every
    finished row too. So the states are written in as literals, in the index's order; the
    column keeps its table, so a query naming no other column still reads tracker_batches.
    """
    return batches.c.state.in_(
        [sa.literal_column(f"'{state.value}'") for state in sorted(ACTIVE_STATES)]
    )


def _due(dialect: str) -> sa.ColumnElement[bool]:
    """Unfinished, unleased, and either due for a check, past its maximum age, or holding a
    time the tracker cannot read (to be rejected as malformed)."""
    c = batches.c
    now = sa.bindparam("now", type_=c.next_check_at.type)
    expired_before = sa.bindparam("expired_before", type_=c.created_at.type)
    return sa.and_(
        _unfinished(),
        sa.or_(
            c.next_check_at.is_(None),
            c.next_check_at <= now,
            c.created_at < expired_before,
            _unreadable(c.next_check_at, dialect),
            _unreadable(c.created_at, dialect),
        ),
        sa.or_(
            c.lease_expires_at.is_(None),
            c.lease_expires_at < now,
            _unreadable(c.lease_expires_at, dialect),
        ),
    )


def _claim(dialect: str) -> sa.Update:
    """Lease the due, unfinished, unleased batches, oldest due first."""
    c = batches.c
    due = (
        sa.select(c.id)
        .where(_due(dialect))
        .order_by(c.next_check_at.nulls_first(), c.id)
        .limit(sa.bindparam("limit", type_=sa.Integer))
        .with_for_update(skip_locked=True)
    )
    return (
        batches.update()
        .where(c.id.in_(due.scalar_subquery()))
        .values(
            lease_owner=sa.bindparam("owner"),
            # A token at its maximum (written by hand) stays: the row is then rejected as
            # malformed, where an overflow would fail the whole claim.
            lease_token=sa.case(
                (c.lease_token < BIGINT_MAX, c.lease_token + 1), else_=c.lease_token
            ),
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
            c.next_check_at,
            c.hinted_at,
        )
    )


_COUNTERS = ("checks", "faults", "rejections", "download_attempts")


def _tracked(row: sa.Row[Any], claimed_at: datetime) -> Tracked:
    """A claimed row as the policy sees it; values it cannot use are listed as problems and
    replaced by harmless ones, so that nothing downstream trips over them."""
    problems = _row_problems(row)
    counters = {
        name: getattr(row, name) if _is_count(getattr(row, name)) else 0 for name in _COUNTERS
    }
    return Tracked(
        id=row.id,
        request_id=row.request_id if isinstance(row.request_id, str) else repr(row.request_id),
        state=State(row.state),
        lease_token=row.lease_token,
        created_at=row.created_at,
        problems=problems,
        claimed_at=claimed_at,
        # A hint sets the next check to its own moment (see `bring_forward`); any other
        # next check was planned by a decision.
        brought_forward=row.hinted_at is not None and row.hinted_at == row.next_check_at,
        **counters,
    )


def _row_problems(row: sa.Row[Any]) -> tuple[str, ...]:
    problems = [
        f"{name}={_shown(value.raw)} is not a timestamp"
        # (An unreadable lease_expires_at is no problem: the claim has just replaced it.)
        for name in ("created_at", "next_check_at")
        if isinstance(value := getattr(row, name), UnreadableTimestamp)
    ]
    problems += [
        f"{name}={_shown(value)} is not a count the tracker can keep"
        for name in _COUNTERS
        if not _is_count(value := getattr(row, name))
    ]
    if not (isinstance(row.lease_token, int) and 0 <= row.lease_token < BIGINT_MAX):
        problems.append(f"lease_token={_shown(row.lease_token)} cannot advance")
    if not isinstance(row.request_id, str):
        problems.append(f"request_id={_shown(row.request_id)} is not text")
    return tuple(problems)


def _readable(moment: datetime) -> bool:
    return not isinstance(moment, UnreadableTimestamp)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < INTEGER_MAX


def _shown(value: object, limit: int = 80) -> str:
    """A raw value for a message: quoted and escaped (repr), and cut short."""
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _count_due(dialect: str) -> sa.Select[Any]:
    due = (
        sa.select(batches.c.id).where(_due(dialect)).limit(sa.bindparam("limit", type_=sa.Integer))
    )
    return sa.select(sa.func.count()).select_from(due.subquery())


def _expired_before(now: datetime, max_age: float | None) -> datetime:
    """Batches created before this are past their maximum age."""
    if max_age is None:
        return datetime.min.replace(tzinfo=UTC)
    try:
        return now - timedelta(seconds=max_age)
    except OverflowError:  # a maximum age reaching back past year 1: nothing is that old
        return datetime.min.replace(tzinfo=UTC)


def _still_held() -> sa.ColumnElement[bool]:
    """The worker's claim still holds: the row, the token it claimed with, and a lease.

    A released lease (lease_owner NULL) fails it too: a write that already committed
    released it, so retrying after a lost connection cannot count a check twice, and a
    lease freed because its owner was presumed dead is not revived by that owner.
    """
    c = batches.c
    return sa.and_(
        c.id == sa.bindparam("w_id"),
        c.lease_token == sa.bindparam("w_lease_token"),
        c.lease_owner.is_not(None),
    )


def _lease_update() -> sa.Update:
    c = batches.c
    return (
        batches.update()
        .where(_still_held())
        .values(lease_expires_at=sa.bindparam("n_expires_at", type_=c.lease_expires_at.type))
    )


def _hand_back() -> sa.Update:
    """Release a claimed batch, saying why its result could not be recorded."""
    c = batches.c
    return (
        batches.update()
        .where(_still_held())
        .values(
            lease_owner=None,
            lease_expires_at=None,
            updated_at=sa.bindparam("n_now", type_=c.updated_at.type),
            last_error=sa.bindparam("n_last_error", type_=c.last_error.type),
            next_check_at=sa.bindparam("n_next_check_at", type_=c.next_check_at.type),
        )
    )


def _bring_forward(dialect: str) -> sa.Update:
    """Bring the named unfinished batches' next check to now, at most once per spacing.

    A batch not yet due is moved to now. A batch due and leased has its call in flight:
    only the hint's time is stamped, and the worker's write-back keeps the next check at
    once (`_next_check_kept_early`). A batch due and not leased is left: it is claimed
    next anyway. An unreadable time is the claim's to reject.
    """
    c = batches.c
    now = sa.bindparam("now", type_=c.next_check_at.type)
    not_yet_due = sa.and_(c.next_check_at > now, sa.not_(_unreadable(c.next_check_at, dialect)))
    in_flight = sa.and_(
        c.lease_owner.is_not(None),
        c.lease_expires_at > now,
        sa.not_(_unreadable(c.lease_expires_at, dialect)),
    )
    return (
        batches.update()
        .where(
            c.request_id.in_(sa.bindparam("ids", expanding=True)),
            c.state.in_(_ACTIVE),
            sa.or_(not_yet_due, in_flight),
            sa.or_(
                c.hinted_at.is_(None),
                c.hinted_at <= sa.bindparam("hinted_before", type_=c.hinted_at.type),
            ),
        )
        .values(next_check_at=sa.case((not_yet_due, now), else_=c.next_check_at), hinted_at=now)
        .returning(c.request_id)
    )


def _hinted_before(now: datetime, spacing: float) -> datetime:
    """A batch last brought forward at or before this may be brought forward again."""
    try:
        return now - timedelta(seconds=max(spacing, 0.0))
    except OverflowError:
        return datetime.min.replace(tzinfo=UTC)


def _heartbeat() -> sa.Update:
    c = instances.c
    return (
        instances.update()
        .where(c.owner == sa.bindparam("i_owner"))
        .values(
            heartbeat_at=sa.bindparam("i_now", type_=c.heartbeat_at.type),
            stopped_at=None,
            last_sweep_at=sa.func.coalesce(
                sa.bindparam("i_last_sweep", type_=c.last_sweep_at.type), c.last_sweep_at
            ),
            last_delivery_at=sa.func.coalesce(
                sa.bindparam("i_last_delivery", type_=c.last_delivery_at.type),
                c.last_delivery_at,
            ),
        )
    )


def _heartbeat_parameters(
    owner: str,
    now: datetime,
    last_sweep_at: datetime | None,
    last_delivery_at: datetime | None = None,
) -> dict[str, Any]:
    return {
        "i_owner": owner,
        "i_now": now,
        "i_last_sweep": last_sweep_at,
        "i_last_delivery": last_delivery_at,
    }


def _allowed(write: BatchWrite) -> bool:
    to_state = write.decision.to_state
    return to_state is write.batch.state or can_transition(write.batch.state, to_state)


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
        "brought_forward": batch.brought_forward and decision.checked,
    }
