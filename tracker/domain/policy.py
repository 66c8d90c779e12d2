"""When to look at a batch next, and what an answer or a failed download means for it.

Everything here is pure: a batch's counters, an answer and a clock go in; a Decision comes
out. The sweep turns Decisions into guarded writes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

from tracker.domain.answers import Outcome, StatusAnswer
from tracker.domain.schedule import BudgetView, processing_delay
from tracker.domain.states import State


@dataclass(frozen=True)
class PollPolicy:
    min_interval: float = 30.0
    max_interval: float = 900.0
    # Each check of a still-processing batch waits `growth` times longer than the last.
    growth: float = 1.5
    fault_base: float = 5.0
    fault_cap: float = 600.0
    max_age: float = 7 * 86400.0
    max_rejections: int = 3
    max_download_attempts: int = 5
    # A server's Retry-After is honoured up to this; beyond it, it is clamped.
    max_retry_after: float = 3600.0

    def __post_init__(self) -> None:
        if not 0 < self.min_interval <= self.max_interval:
            raise ValueError("poll intervals need 0 < min <= max")
        if self.growth < 1:
            raise ValueError("growth must be >= 1")


@dataclass(frozen=True)
class Tracked:
    """What the policy needs to know about one claimed batch."""

    id: int
    request_id: str
    state: State
    lease_token: int
    checks: int
    faults: int
    rejections: int
    download_attempts: int
    created_at: datetime


@dataclass(frozen=True)
class Decision:
    """What to write back for a batch after looking at it."""

    to_state: State
    next_check_at: datetime | None
    checked: bool = False
    faults: int = 0
    rejections: int = 0
    download_attempts: int = 0
    api_status: int | None = None
    api_message: str | None = None
    last_error: str | None = None
    # Why the state changed; stored on the transition row.
    detail: str | None = None
    # Set when the output should be fetched now. Never stored: it may be a presigned URL.
    download_url: str | None = None


class DownloadProblem(StrEnum):
    REFUSED = "refused"  # the URL is not one we may fetch: permanent
    URL_EXPIRED = "url_expired"  # the file host refused the URL: ask Deepvue for a fresh one
    INTERRUPTED = "interrupted"  # network, 5xx, truncation, deadline: try again later
    UNWRITABLE = "unwritable"  # our disk is full or read-only: not the batch's fault


def poll_delay(policy: PollPolicy, checks: int, rng: random.Random) -> float:
    """Geometric backoff from min to max with 'equal jitter'.

    Keeping half of the delay fixed means a batch is never looked at much sooner than
    planned; the random half spreads batches enqueued together across the window.
    """
    ceiling = min(policy.max_interval, policy.min_interval * policy.growth ** max(checks, 0))
    return max(policy.min_interval, ceiling / 2 + rng.uniform(0, ceiling / 2))


def fault_delay(
    policy: PollPolicy, faults: int, rng: random.Random, retry_after: float | None = None
) -> float:
    """Capped exponential backoff with full jitter; the server's Retry-After wins if longer."""
    ceiling = min(policy.fault_cap, policy.fault_base * 2 ** max(faults - 1, 0))
    # A floor of one second keeps full jitter from turning into an immediate retry loop.
    delay = max(1.0, rng.uniform(0, ceiling))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def is_too_old(batch: Tracked, policy: PollPolicy, now: datetime) -> bool:
    return now - batch.created_at > timedelta(seconds=policy.max_age)


def decide_on_answer(
    batch: Tracked,
    answer: StatusAnswer,
    policy: PollPolicy,
    now: datetime,
    rng: random.Random,
    budget: BudgetView | None = None,
) -> Decision:
    """The decision for `batch` after Deepvue answered its status call with `answer`.

    With a `budget`, a batch still in progress is rescheduled by the budget-aware schedule
    (tracker.domain.schedule); without one, by plain geometric backoff.
    """
    seen = Decision(
        to_state=batch.state,
        next_check_at=None,
        checked=True,
        download_attempts=batch.download_attempts,
        api_status=answer.api_status,
        api_message=answer.api_message,
    )

    def later(seconds: float) -> datetime:
        return now + timedelta(seconds=seconds)

    match answer.outcome:
        case Outcome.COMPLETED:
            # The check after this one is a fallback only: the download that follows
            # either finishes the batch or reschedules it itself.
            return replace(
                seen,
                to_state=State.READY,
                next_check_at=later(policy.min_interval),
                detail="Deepvue reports the batch completed",
                download_url=answer.output_url,
            )
        case Outcome.FAILED:
            return replace(
                seen,
                to_state=State.FAILED,
                last_error=f"Deepvue reports the batch failed: {answer.api_message or answer.api_status}",
                detail=answer.detail or answer.api_message,
            )
        case Outcome.PROCESSING:
            # A ready batch stays ready even if Deepvue wobbles: we already know it finished.
            to_state = State.PROCESSING if batch.state is State.PENDING else batch.state
            return replace(
                seen,
                to_state=to_state,
                next_check_at=later(
                    processing_delay(
                        policy,
                        age=(now - batch.created_at).total_seconds(),
                        checks=batch.checks,
                        budget=budget,
                        rng=rng,
                    )
                ),
                detail="Deepvue reports the batch in progress" if to_state != batch.state else None,
            )
        case Outcome.INVALID:
            rejections = batch.rejections + 1
            reason = f"Deepvue does not accept this request_id (HTTP {answer.http_status}): {answer.api_message}"
            if rejections >= policy.max_rejections:
                return replace(
                    seen,
                    to_state=State.REJECTED,
                    rejections=rejections,
                    last_error=reason,
                    detail=f"{reason}; {rejections} answers in a row",
                )
            return replace(
                seen,
                rejections=rejections,
                faults=batch.faults,
                last_error=reason,
                next_check_at=later(fault_delay(policy, rejections, rng)),
            )
        case Outcome.RATE_LIMITED:
            # The client as a whole slows down; the batch is not at fault and keeps its counters.
            return replace(
                seen,
                faults=batch.faults,
                rejections=batch.rejections,
                last_error="rate limited by Deepvue",
                next_check_at=later(max(answer.retry_after or 0.0, policy.fault_base)),
            )
        case Outcome.TRANSIENT | Outcome.AUTH:
            faults = batch.faults + 1
            return replace(
                seen,
                checked=answer.http_status is not None,
                faults=faults,
                rejections=batch.rejections,
                last_error=answer.detail or answer.api_message or "transient fault",
                next_check_at=later(fault_delay(policy, faults, rng, answer.retry_after)),
            )


def decide_on_download_problem(
    batch: Tracked,
    problem: DownloadProblem,
    message: str,
    policy: PollPolicy,
    now: datetime,
    rng: random.Random,
) -> Decision:
    """The decision for a ready batch whose output could not be fetched."""
    if problem is DownloadProblem.REFUSED:
        return Decision(
            to_state=State.FAILED,
            next_check_at=None,
            download_attempts=batch.download_attempts,
            last_error=message,
            detail=message,
        )
    if problem is DownloadProblem.UNWRITABLE:
        # Our own disk is the problem: never count it against the batch.
        return Decision(
            to_state=State.READY,
            next_check_at=now + timedelta(seconds=fault_delay(policy, batch.faults + 1, rng)),
            faults=batch.faults + 1,
            download_attempts=batch.download_attempts,
            last_error=message,
        )
    attempts = batch.download_attempts + 1
    if attempts >= policy.max_download_attempts:
        reason = f"output could not be fetched after {attempts} attempts: {message}"
        return Decision(
            to_state=State.FAILED,
            next_check_at=None,
            download_attempts=attempts,
            last_error=reason,
            detail=reason,
        )
    # An expired URL is replaced by asking Deepvue again straight away.
    wait = 0.0 if problem is DownloadProblem.URL_EXPIRED else fault_delay(policy, attempts, rng)
    return Decision(
        to_state=State.READY,
        next_check_at=now + timedelta(seconds=wait),
        download_attempts=attempts,
        last_error=message,
    )
