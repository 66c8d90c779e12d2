"""What the pages show, read from the store and the call budget into plain data.

Blocking, like the store: the handlers run these in a thread. The list page is read by
keyset (tracker.store.Store.batch_page), one row more than a page to know whether another
page follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from tracker.console.cursor import encode_cursor
from tracker.domain.quota import QuotaLedger, calls_per_hour
from tracker.domain.states import TERMINAL_STATES, State
from tracker.schema import UnreadableTimestamp
from tracker.store import BatchRow, InstanceReport, OperatorResult, Store, TransitionRow

PAGE_SIZE = 50
RECENT_ERRORS = 10
SHOWN_INSTANCES = 20
# Unfinished batches by age: (label, the age it starts at, in seconds).
AGE_BUCKETS: tuple[tuple[str, float], ...] = (
    ("< 1 h", 0.0),
    ("1-6 h", 3600.0),
    ("6-24 h", 6 * 3600.0),
    ("1-7 d", 86400.0),
    ("> 7 d", 7 * 86400.0),
)
_TERMINAL = frozenset(state.value for state in TERMINAL_STATES)


class BudgetReader(Protocol):
    """The shared call budget as it stands (tracker.budget.DatabaseBudget)."""

    def snapshot_now(self) -> tuple[QuotaLedger, float]: ...


@dataclass(frozen=True)
class WindowUsage:
    name: str
    used: int
    limit: int

    @property
    def left(self) -> int:
        return max(0, self.limit - self.used)


@dataclass(frozen=True)
class InstanceStatus:
    report: InstanceReport
    alive: bool


@dataclass(frozen=True)
class Overview:
    now: datetime
    counts: dict[str, int]  # every state, in the state machine's order
    ages: list[tuple[str, int]]  # unfinished batches per age bucket, youngest first
    windows: list[WindowUsage]
    hourly_calls: list[tuple[datetime, int]]  # the last 24 hours, oldest first
    instances: list[InstanceStatus]
    recent_errors: list[BatchRow]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class ListFilters:
    state: str | None = None
    label: str | None = None
    request_id_prefix: str | None = None


@dataclass(frozen=True)
class BatchList:
    rows: list[BatchRow]
    next_cursor: str | None


@dataclass(frozen=True)
class BatchDetail:
    row: BatchRow
    history: list[TransitionRow]

    @property
    def finished(self) -> bool:
        return self.row.state in _TERMINAL


class ConsoleQueries:
    def __init__(self, store: Store, budget: BudgetReader, *, heartbeat_timeout: float) -> None:
        self._store = store
        self._budget = budget
        self._heartbeat_timeout = heartbeat_timeout

    def overview(self) -> Overview:
        now = self._store.database_now()
        counted = self._store.count_by_state()
        counts = {state.value: counted.get(state.value, 0) for state in State}
        unfinished = sum(count for state, count in counts.items() if state not in _TERMINAL)
        ledger, budget_now = self._budget.snapshot_now()
        return Overview(
            now=now,
            counts=counts,
            ages=self._ages(now, unfinished),
            windows=[
                WindowUsage(name, used, limit)
                for name, (used, limit) in ledger.used(budget_now).items()
            ],
            hourly_calls=_hourly_calls(ledger, budget_now),
            instances=[
                InstanceStatus(report, self._alive(report, now))
                for report in self._store.instance_reports(SHOWN_INSTANCES)
            ],
            recent_errors=self._store.recent_errors(RECENT_ERRORS),
        )

    def batch_list(self, filters: ListFilters, before_id: int | None) -> BatchList:
        rows = self._store.batch_page(
            limit=PAGE_SIZE + 1,
            before_id=before_id,
            state=filters.state,
            label=filters.label,
            request_id_prefix=filters.request_id_prefix,
        )
        more = len(rows) > PAGE_SIZE
        rows = rows[:PAGE_SIZE]
        return BatchList(rows, encode_cursor(rows[-1].id) if more else None)

    def batch(self, request_id: str) -> BatchDetail | None:
        row = self._store.get(request_id)
        if row is None:
            return None
        return BatchDetail(row, self._store.history(row.id))

    def retry(self, request_id: str) -> tuple[OperatorResult, str | None]:
        return self._store.retry(request_id, datetime.now(UTC))

    def cancel(self, request_id: str) -> tuple[OperatorResult, str | None]:
        return self._store.cancel(request_id, datetime.now(UTC))

    def _ages(self, now: datetime, unfinished: int) -> list[tuple[str, int]]:
        # How many are older than each bucket's start; the youngest bucket takes the rest
        # (a batch stamped a moment after the database's now included). Differences give
        # the count inside each bucket.
        cutoffs = [now - timedelta(seconds=start) for _, start in AGE_BUCKETS[1:]]
        older = [unfinished, *self._store.count_unfinished_created_before(cutoffs), 0]
        return [(label, older[i] - older[i + 1]) for i, (label, _) in enumerate(AGE_BUCKETS)]

    def _alive(self, report: InstanceReport, now: datetime) -> bool:
        beat = report.heartbeat_at
        if report.stopped_at is not None or beat is None or isinstance(beat, UnreadableTimestamp):
            return False
        return (now - beat).total_seconds() <= self._heartbeat_timeout


def _hourly_calls(ledger: QuotaLedger, now: float) -> list[tuple[datetime, int]]:
    day = next((window for window in ledger.windows if window.name == "day"), None)
    if day is None:
        return []
    return [
        (datetime.fromtimestamp(start, UTC), calls)
        for start, calls in calls_per_hour(day, ledger.usage.get("day", {}), now)
    ]
