"""What the views show, read from the store into plain data: a status report, a watch
snapshot."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from tracker.domain.states import ACTIVE_STATES, TERMINAL_STATES, State
from tracker.store import BatchRow, Store, TransitionRow

RECENT_ERRORS = 10


class CallBudget(Protocol):
    """The shared call budget, as `tracker status` reads it (tracker/budget.py)."""

    def usage_now(self) -> dict[str, tuple[int, int]]: ...


@dataclass(frozen=True)
class StatusReport:
    now: datetime
    host: str
    counts: dict[str, int]  # every state, zeros included, in the state machine's order
    quota: dict[str, tuple[int, int]]  # window name -> (used, limit)
    oldest_unfinished: BatchRow | None
    last_sweep_any_host: datetime | None
    last_sweep_this_host: datetime | None
    recent_errors: list[BatchRow]
    # When a webhook delivery with the right secret last reached any instance.
    last_delivery: datetime | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def unfinished(self) -> int:
        return sum(self.counts[state] for state in ACTIVE_STATES)


def collect_status(
    store: Store,
    budget: CallBudget,
    *,
    host: str | None = None,
    now: datetime | None = None,
) -> StatusReport:
    counted = store.count_by_state()
    host = host or socket.gethostname()
    return StatusReport(
        now=now or datetime.now(UTC),
        host=host,
        counts={state.value: counted.get(state.value, 0) for state in State},
        quota=budget.usage_now(),
        oldest_unfinished=store.oldest_unfinished(),
        last_sweep_any_host=store.last_sweep(),
        last_sweep_this_host=store.last_sweep(host),
        recent_errors=store.recent_errors(RECENT_ERRORS),
        last_delivery=store.last_delivery(),
    )


@dataclass(frozen=True)
class WatchSnapshot:
    at: datetime
    counts: dict[str, int]
    recent: list[TransitionRow]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> int:
        return sum(self.counts.get(state, 0) for state in TERMINAL_STATES)

    @property
    def unfinished(self) -> int:
        return self.total - self.finished


def take_snapshot(store: Store, label: str | None, recent: int) -> WatchSnapshot:
    counted = store.count_by_state(label)
    return WatchSnapshot(
        at=datetime.now(UTC),
        counts={state.value: counted.get(state.value, 0) for state in State},
        recent=store.recent_transitions(recent, label) if recent > 0 else [],
    )
