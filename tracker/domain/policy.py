"""What an answer, a failed download or the clock means for a batch: a Decision to write.

Pure, and total: no function raises, a Decision moves a batch only along the state machine,
and no check is planned past created_at + max_age (docs/polling.md, "What the policy
promises"). The sweep only carries out its Decisions and download plans.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace
from datetime import datetime, timedelta

from tracker.domain.answers import Outcome, StatusAnswer
from tracker.domain.model import Decision, DownloadPlan, DownloadProblem, PollPolicy, Tracked
from tracker.domain.request_ids import request_id_problem
from tracker.domain.schedule import BudgetView, processing_delay
from tracker.domain.states import TERMINAL_STATES, State, can_transition

# 2.0 ** 1023 is the largest power of two a float holds: more doublings change nothing.
_MAX_DOUBLINGS = 1023


def fault_ceiling(policy: PollPolicy) -> float:
    """The longest a fault backoff waits (a server's Retry-After may ask for longer)."""
    return min(policy.max_interval, policy.fault_cap)


def honoured_retry_after(policy: PollPolicy, retry_after: float | None) -> float | None:
    """A server's Retry-After as the tracker obeys it: up to policy.max_retry_after."""
    if retry_after is None or math.isnan(retry_after):
        return None
    return min(max(retry_after, 0.0), policy.max_retry_after)


def fault_delay(
    policy: PollPolicy, faults: int, rng: random.Random, retry_after: float | None = None
) -> float:
    """Exponential backoff from fault_base with full jitter, capped at `fault_ceiling`.

    The server's Retry-After wins if longer, up to policy.max_retry_after.
    """
    cap = fault_ceiling(policy)
    doublings = min(max(faults - 1, 0), _MAX_DOUBLINGS)
    # A float product: at worst inf, which the cap takes care of.
    ceiling = min(cap, policy.fault_base * 2.0**doublings)
    # A floor of one second keeps full jitter from turning into an immediate retry loop,
    # unless the configured intervals are shorter than that.
    delay = max(min(1.0, cap), rng.uniform(0, ceiling))
    honoured = honoured_retry_after(policy, retry_after)
    if honoured is not None:
        delay = max(delay, honoured)
    return delay


def _seconds(value: float) -> timedelta:
    """`value` seconds as a timedelta: nan and negatives are 0, the huge are clamped."""
    if not value > 0:
        return timedelta(0)
    try:
        return timedelta(seconds=value)
    except OverflowError:
        return timedelta.max


def _time_left(batch: Tracked, policy: PollPolicy, now: datetime) -> timedelta:
    """How long the batch may still be tracked: 0 once created_at + max_age has passed."""
    age = now - batch.created_at
    limit = _seconds(policy.max_age)
    if age >= limit:
        return timedelta(0)
    try:
        return limit - age
    except OverflowError:  # a batch created after `now` with an enormous max_age
        return timedelta.max


def next_check_time(batch: Tracked, policy: PollPolicy, now: datetime, seconds: float) -> datetime:
    """`seconds` after now, but never past the batch's deadline (created_at + max_age).

    A batch past its deadline is due at once (now): the sweep then expires it.
    """
    wait = min(_seconds(seconds), _time_left(batch, policy, now))
    try:
        return now + wait
    except OverflowError:  # the end of the calendar
        return datetime.max.replace(tzinfo=now.tzinfo)


def is_too_old(batch: Tracked, policy: PollPolicy, now: datetime) -> bool:
    return now - batch.created_at > _seconds(policy.max_age)


def _unchanged(batch: Tracked, why: str, answer: StatusAnswer | None = None) -> Decision:
    """A terminal batch stays where it is, whatever happened (only `tracker retry` moves it)."""
    return Decision(
        to_state=batch.state,
        next_check_at=None,
        checked=answer is not None and answer.http_status is not None,
        faults=batch.faults,
        rejections=batch.rejections,
        download_attempts=batch.download_attempts,
        api_status=None if answer is None else answer.api_status,
        api_message=None if answer is None else answer.api_message,
        last_error=f"the batch is already {batch.state}: {why} changes nothing",
    )


def decide_before_call(batch: Tracked, policy: PollPolicy, now: datetime) -> Decision | None:
    """The decision for a claimed batch that needs no status call, or None if it needs one.

    A malformed request_id is never sent: the batch is rejected (a ready batch, which may not
    become rejected, fails). A batch older than policy.max_age expires. A terminal batch
    stays as it is (there is nothing to ask).
    """
    if batch.state in TERMINAL_STATES:
        return _unchanged(batch, "a status call")
    problem = request_id_problem(batch.request_id)
    if batch.problems:
        # Quarantined: nothing about the row can be trusted, so it is not polled; the raw
        # values are in the message for whoever inserted it.
        problem = "malformed row: " + "; ".join(batch.problems)
    if problem is not None:
        to_state = State.REJECTED if can_transition(batch.state, State.REJECTED) else State.FAILED
        return Decision(
            to_state,
            None,
            download_attempts=batch.download_attempts,
            last_error=problem,
            detail=problem,
        )
    if is_too_old(batch, policy, now):
        reason = f"not finished within the maximum tracking age of {policy.max_age:g} s"
        return Decision(
            State.EXPIRED,
            None,
            download_attempts=batch.download_attempts,
            last_error=reason,
            detail=reason,
        )
    return None


def decide_on_download_done(batch: Tracked, size: int, sha256: str) -> Decision:
    """The decision for a ready batch whose output is now on disk, verified."""
    if batch.state is not State.READY:
        if batch.state in TERMINAL_STATES:
            return _unchanged(batch, "a finished download")
        # Only a ready batch is downloaded; anything else is checked again at once.
        return Decision(
            to_state=batch.state,
            next_check_at=None,
            faults=batch.faults,
            rejections=batch.rejections,
            download_attempts=batch.download_attempts,
            last_error=f"a download finished while the batch was {batch.state}, not ready",
        )
    return Decision(
        State.DOWNLOADED,
        None,
        download_attempts=batch.download_attempts + 1,
        detail=f"saved {size} bytes, sha256 {sha256}",
    )


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
    if batch.state in TERMINAL_STATES:
        return _unchanged(batch, f"an answer ({answer.outcome})", answer)
    seen = Decision(
        to_state=batch.state,
        next_check_at=None,
        checked=True,
        download_attempts=batch.download_attempts,
        api_status=answer.api_status,
        api_message=answer.api_message,
    )

    def later(seconds: float) -> datetime:
        return next_check_time(batch, policy, now, seconds)

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
            if rejections >= policy.max_rejections and batch.state is State.READY:
                # Ready may not become rejected: Deepvue has said the batch completed.
                why = (
                    "Deepvue reported the batch completed, then stopped accepting its "
                    f"request_id ({rejections} answers in a row): {reason}"
                )
                return replace(
                    seen, to_state=State.FAILED, rejections=rejections, last_error=why, detail=why
                )
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
                # Without a Retry-After, a short pause (fault_base, within the fault ceiling).
                next_check_at=later(
                    max(
                        honoured_retry_after(policy, answer.retry_after) or 0.0,
                        min(policy.fault_base, fault_ceiling(policy)),
                    )
                ),
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


def plan_download(batch: Tracked, decision: Decision) -> DownloadPlan | None:
    """How to fetch the output `decision` found for `batch`; None when there is none to fetch.

    The "ready" write comes first and keeps the lease, so that no other instance takes the
    batch while its file downloads; the URL itself is never stored.
    """
    url = decision.download_url
    if url is None:
        return None
    return DownloadPlan(
        ready=replace(decision, download_url=None),
        # Ready, one check more, and the counters it was claimed with: the ready write
        # resets the row's fault streak (Deepvue answered), but a download problem counts
        # on from the claimed one, so that a full disk's backoff grows over the attempts.
        batch=replace(batch, state=State.READY, checks=batch.checks + 1),
        url=url,
        # Only a batch that was already ready can have a fetch that died without cleaning
        # up (kill -9 mid-download): every fetch starts with a "ready" write.
        leftovers_possible=batch.state is State.READY,
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
    if batch.state in TERMINAL_STATES:
        return _unchanged(batch, f"a download problem ({problem})")
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
            next_check_at=next_check_time(
                batch, policy, now, fault_delay(policy, batch.faults + 1, rng)
            ),
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
        next_check_at=next_check_time(batch, policy, now, wait),
        download_attempts=attempts,
        last_error=message,
    )
