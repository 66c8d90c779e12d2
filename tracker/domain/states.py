"""The batch state machine: which states exist and which changes between them are allowed."""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    READY = "ready"
    DOWNLOADED = "downloaded"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


ACTIVE_STATES: frozenset[State] = frozenset({State.PENDING, State.PROCESSING, State.READY})
TERMINAL_STATES: frozenset[State] = frozenset(State) - ACTIVE_STATES
# The states whose next step is a status call (a ready batch's is a download).
POLLED_STATES: frozenset[State] = frozenset({State.PENDING, State.PROCESSING})

_ALLOWED: dict[State, frozenset[State]] = {
    # Deepvue may answer "completed" or "failed" on the very first look, so pending can
    # jump straight to any outcome.
    State.PENDING: frozenset(
        {
            State.PROCESSING,
            State.READY,
            State.FAILED,
            State.REJECTED,
            State.EXPIRED,
            State.CANCELLED,
        }
    ),
    State.PROCESSING: frozenset(
        {State.READY, State.FAILED, State.REJECTED, State.EXPIRED, State.CANCELLED}
    ),
    # A ready batch never goes back to processing: a fresh URL is fetched while staying ready.
    State.READY: frozenset({State.DOWNLOADED, State.FAILED, State.EXPIRED, State.CANCELLED}),
}
# An operator's `retry` is the only way out of a terminal state.
for _terminal in TERMINAL_STATES:
    _ALLOWED[_terminal] = frozenset({State.PENDING})


class IllegalTransition(ValueError):
    """A change of state the state machine does not allow."""


def can_transition(from_state: State, to_state: State) -> bool:
    return to_state in _ALLOWED[from_state]


def check_transition(from_state: State, to_state: State) -> None:
    if not can_transition(from_state, to_state):
        raise IllegalTransition(f"a batch cannot go from {from_state} to {to_state}")


def parse_state(text: str) -> State:
    """The State named by `text`, or ValueError naming the valid ones."""
    try:
        return State(text)
    except ValueError:
        valid = ", ".join(s.value for s in State)
        raise ValueError(f"unknown state {text!r} (one of: {valid})") from None
