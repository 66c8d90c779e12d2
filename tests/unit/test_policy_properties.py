"""Properties of the polling policy that must hold for every input, however extreme.

Every decision function: never raises; moves a batch only along the state machine (and never
out of a terminal state); schedules no check before `now` or past created_at + max_age.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from tracker.domain.answers import Outcome, StatusAnswer
from tracker.domain.model import Decision, DownloadProblem, PollPolicy, Tracked
from tracker.domain.policy import (
    decide_before_call,
    decide_on_answer,
    decide_on_download_done,
    decide_on_download_problem,
    fault_delay,
    plan_download,
)
from tracker.domain.request_ids import REQUEST_ID_PATTERN, request_id_problem
from tracker.domain.schedule import (
    FORCED_CEILING,
    BudgetView,
    LoadHistory,
    poll_delay,
    processing_delay,
)
from tracker.domain.states import TERMINAL_STATES, State, can_transition

DAY = 86400.0
YEAR = 365 * DAY
# Small counts (where thresholds are crossed) as often as huge ones.
COUNTER = st.integers(0, 12) | st.integers(0, 2**63)
# A microsecond of slack for datetime rounding of float seconds.
TICK = timedelta(microseconds=1)
EXAMPLES = settings(max_examples=150, deadline=None)


@st.composite
def policies(draw: st.DrawFn) -> PollPolicy:
    # Typical values as often as arbitrary ones: short intervals (below fault_base and the
    # one-second floor) are where the fault backoff used to ignore max_interval.
    min_interval = draw(st.sampled_from([0.1, 1.0, 30.0]) | st.floats(0.001, 1e5))
    return PollPolicy(
        min_interval=min_interval,
        max_interval=min_interval + draw(st.sampled_from([0.0, 1.0, 870.0]) | st.floats(0, 1e6)),
        growth=draw(st.sampled_from([1.0, 1.5]) | st.floats(1, 10)),
        fault_base=draw(st.just(5.0) | st.floats(0.001, 1e4)),
        fault_cap=draw(st.just(math.inf) | st.floats(0.001, 1e6)),
        max_age=draw(st.floats(1, 100 * YEAR)),
        max_rejections=draw(st.integers(1, 10)),
        max_download_attempts=draw(st.integers(1, 10)),
        max_retry_after=draw(st.floats(0, 1e7)),
    )


NOWS = st.datetimes(datetime(2000, 1, 1), datetime(2100, 1, 1), timezones=st.just(UTC))
REQUEST_IDS = st.from_regex(REQUEST_ID_PATTERN, fullmatch=True) | st.text(max_size=140)


@st.composite
def batches(draw: st.DrawFn, now: datetime, states: st.SearchStrategy[State]) -> Tracked:
    # From slightly after `now` (clocks differ) to two centuries before it.
    age = draw(st.floats(-120, 200 * YEAR) | st.sampled_from([0.0, 1.0, 7 * DAY]))
    return Tracked(
        id=draw(st.integers(1, 2**63)),
        request_id=draw(REQUEST_IDS),
        state=draw(states),
        lease_token=draw(st.integers(1, 2**63)),
        checks=draw(COUNTER),
        faults=draw(COUNTER),
        rejections=draw(COUNTER),
        download_attempts=draw(COUNTER),
        created_at=now - timedelta(seconds=age),
    )


RETRY_AFTER = (
    st.none()
    | st.floats(0, 1e18)
    | st.sampled_from([0.0, 1e12, 1e18])
    # parse_retry_after never produces these, but the policy must not trust that.
    | st.sampled_from([math.inf, math.nan, -1.0])
)


@st.composite
def answers(draw: st.DrawFn) -> StatusAnswer:
    """Shaped like tracker.domain.answers builds them: a URL only when completed."""
    outcome = draw(st.sampled_from(Outcome))
    http_status = {
        Outcome.COMPLETED: st.just(200),
        Outcome.FAILED: st.just(200),
        Outcome.PROCESSING: st.just(200),
        Outcome.TRANSIENT: st.none() | st.just(200) | st.integers(100, 599),
        Outcome.AUTH: st.sampled_from([200, 401, 403]),
        Outcome.RATE_LIMITED: st.sampled_from([200, 429]),
        Outcome.INVALID: st.sampled_from([200, 400, 404, 422]),
    }[outcome]
    return StatusAnswer(
        outcome=outcome,
        http_status=draw(http_status),
        api_status=draw(st.none() | st.integers(-(2**63), 2**63)),
        api_message=draw(st.none() | st.text(max_size=40)),
        output_url=(
            draw(st.sampled_from(["https://x.s3.amazonaws.com/a.csv", "https://h/b"]))
            if outcome is Outcome.COMPLETED
            else None
        ),
        retry_after=draw(RETRY_AFTER),
        detail=draw(st.none() | st.text(max_size=40)),
    )


@st.composite
def budgets(draw: st.DrawFn) -> BudgetView:
    """Built as in test_schedule: a day window, its releases and (maybe) a load history."""
    day_limit = draw(st.integers(1, 1_000_000))
    load = draw(
        st.none()
        | st.builds(
            LoadHistory,
            span=st.floats(0, DAY),
            arrivals=st.integers(0, 1_000_000),
            open_seconds=st.floats(0, 1e10),
            recent_span=st.floats(0, 6 * 3600.0),
            recent_open_seconds=st.floats(0, 1e10),
        )
    )
    return BudgetView(
        calls_left=draw(st.integers(0, day_limit)),
        day_limit=day_limit,
        open_batches=draw(st.integers(0, 100_000)),
        releases=tuple(draw(st.lists(st.integers(0, day_limit), max_size=25))),
        load=load,
    )


def deadline(batch: Tracked, policy: PollPolicy, now: datetime) -> datetime:
    return max(now, batch.created_at + timedelta(seconds=policy.max_age))


def check_invariants(batch: Tracked, decision: Decision, policy: PollPolicy, now: datetime) -> None:
    assert decision.to_state is batch.state or can_transition(batch.state, decision.to_state)
    if batch.state in TERMINAL_STATES:
        assert decision.to_state is batch.state
        assert decision.next_check_at is None and decision.download_url is None
    if decision.next_check_at is not None:
        assert now <= decision.next_check_at <= deadline(batch, policy, now)


def delay_of(decision: Decision, now: datetime) -> float:
    assert decision.next_check_at is not None
    return (decision.next_check_at - now).total_seconds()


def time_left(batch: Tracked, policy: PollPolicy, now: datetime) -> float:
    return (deadline(batch, policy, now) - now).total_seconds()


def fault_ceiling(policy: PollPolicy) -> float:
    """The documented cap of every fault backoff: max_interval (or a tighter fault_cap)."""
    return min(policy.max_interval, policy.fault_cap)


def honoured(policy: PollPolicy, retry_after: float | None) -> float:
    if retry_after is None or math.isnan(retry_after):
        return 0.0
    return min(max(retry_after, 0.0), policy.max_retry_after)


# --------------------------------------------------------------------------- decide_on_answer


@EXAMPLES
@given(
    data=st.data(),
    now=NOWS,
    policy=policies(),
    answer=answers(),
    budget=st.none() | budgets(),
    seed=st.integers(0, 2**32),
)
def test_an_answer_never_breaks_the_invariants(
    data: st.DataObject,
    now: datetime,
    policy: PollPolicy,
    answer: StatusAnswer,
    budget: BudgetView | None,
    seed: int,
) -> None:
    batch = data.draw(batches(now, st.sampled_from(State)))
    decision = decide_on_answer(batch, answer, policy, now, random.Random(seed), budget=budget)
    check_invariants(batch, decision, policy, now)
    if batch.state in TERMINAL_STATES:
        return
    final = decision.to_state in TERMINAL_STATES
    assert final == (decision.next_check_at is None)
    assert (decision.download_url is not None) == (answer.outcome is Outcome.COMPLETED)
    if final:
        return
    # How long the batch waits, whatever its counters: within the configured bounds.
    delay = delay_of(decision, now)
    left = time_left(batch, policy, now)
    slack = 1e-6
    match answer.outcome:
        case Outcome.PROCESSING:
            assert min(policy.min_interval, left) - slack <= delay
            assert delay <= max(policy.max_interval, FORCED_CEILING) + slack
        case Outcome.TRANSIENT | Outcome.AUTH:
            longest = max(fault_ceiling(policy), honoured(policy, answer.retry_after))
            assert delay <= longest + slack
            assert delay >= min(honoured(policy, answer.retry_after), left) - slack
        case Outcome.RATE_LIMITED:
            assert decision.faults == batch.faults and decision.rejections == batch.rejections
            wait = max(
                honoured(policy, answer.retry_after), min(policy.fault_base, fault_ceiling(policy))
            )
            assert abs(delay - min(wait, left)) <= slack
        case Outcome.INVALID:
            assert decision.rejections == batch.rejections + 1
            assert delay <= fault_ceiling(policy) + slack
        case Outcome.COMPLETED:
            assert decision.to_state is State.READY
            assert abs(delay - min(policy.min_interval, left)) <= slack
        case Outcome.FAILED:  # pragma: no cover - always final
            raise AssertionError("a failed answer is final")


@EXAMPLES
@given(
    data=st.data(),
    now=NOWS,
    policy=policies(),
    answer=answers(),
    budget=st.none() | budgets(),
    seed=st.integers(0, 2**32),
)
def test_a_download_is_planned_exactly_when_an_answer_brings_a_url(
    data: st.DataObject,
    now: datetime,
    policy: PollPolicy,
    answer: StatusAnswer,
    budget: BudgetView | None,
    seed: int,
) -> None:
    batch = data.draw(batches(now, st.sampled_from(State)))
    decision = decide_on_answer(batch, answer, policy, now, random.Random(seed), budget=budget)
    plan = plan_download(batch, decision)
    if decision.download_url is None:
        assert plan is None
        return
    assert plan is not None and plan.url == decision.download_url
    # The "ready" write stores no URL and is a move the state machine allows.
    assert plan.ready.download_url is None
    check_invariants(batch, plan.ready, policy, now)
    assert plan.ready.to_state is State.READY
    # The planned batch is the claimed one, ready and checked once more: same lease, and the
    # counters it was claimed with (a download problem counts on from them).
    assert plan.ready.checked
    assert plan.batch == replace(batch, state=State.READY, checks=batch.checks + 1)
    assert plan.ready.download_attempts == batch.download_attempts
    assert plan.leftovers_possible == (batch.state is State.READY)


@EXAMPLES
@given(
    data=st.data(),
    now=NOWS,
    policy=policies(),
    http_status=st.sampled_from([400, 404, 422]),
    seed=st.integers(0, 2**32),
)
def test_repeated_invalid_answers_end_where_the_state_machine_allows(
    data: st.DataObject, now: datetime, policy: PollPolicy, http_status: int, seed: int
) -> None:
    batch = data.draw(batches(now, st.sampled_from(sorted(State))))
    invalid = StatusAnswer(outcome=Outcome.INVALID, http_status=http_status, api_message="no")
    decision = decide_on_answer(batch, invalid, policy, now, random.Random(seed))
    check_invariants(batch, decision, policy, now)
    if batch.state in TERMINAL_STATES or batch.rejections + 1 < policy.max_rejections:
        assert decision.to_state is batch.state
    elif batch.state is State.READY:
        assert decision.to_state is State.FAILED
        assert str(http_status) in (decision.last_error or "")
    else:
        assert decision.to_state is State.REJECTED


# --------------------------------------------------------------------------- downloads


@EXAMPLES
@given(
    data=st.data(),
    now=NOWS,
    policy=policies(),
    problem=st.sampled_from(DownloadProblem),
    message=st.text(max_size=40),
    seed=st.integers(0, 2**32),
)
def test_a_download_problem_never_breaks_the_invariants(
    data: st.DataObject,
    now: datetime,
    policy: PollPolicy,
    problem: DownloadProblem,
    message: str,
    seed: int,
) -> None:
    batch = data.draw(batches(now, st.sampled_from(State)))
    decision = decide_on_download_problem(batch, problem, message, policy, now, random.Random(seed))
    check_invariants(batch, decision, policy, now)
    if batch.state in TERMINAL_STATES:
        return
    if decision.to_state in TERMINAL_STATES:
        assert decision.next_check_at is None
        return
    assert decision.to_state is State.READY
    if problem is DownloadProblem.URL_EXPIRED:
        assert decision.next_check_at == now
    else:
        assert delay_of(decision, now) <= fault_ceiling(policy) + 1e-6


@EXAMPLES
@given(
    data=st.data(),
    now=NOWS,
    size=st.integers(0, 2**63),
    sha256=st.text("0123456789abcdef", min_size=64, max_size=64),
)
def test_a_finished_download_never_breaks_the_invariants(
    data: st.DataObject, now: datetime, size: int, sha256: str
) -> None:
    batch = data.draw(batches(now, st.sampled_from(State)))
    decision = decide_on_download_done(batch, size, sha256)
    check_invariants(batch, decision, PollPolicy(), now)
    if batch.state is State.READY:
        assert decision.to_state is State.DOWNLOADED
        assert decision.download_attempts == batch.download_attempts + 1
        assert decision.detail == f"saved {size} bytes, sha256 {sha256}"
    else:
        assert decision.to_state is batch.state


# --------------------------------------------------------------------------- before the call


@EXAMPLES
@given(data=st.data(), now=NOWS, policy=policies())
def test_before_the_call_never_breaks_the_invariants(
    data: st.DataObject, now: datetime, policy: PollPolicy
) -> None:
    batch = data.draw(batches(now, st.sampled_from(State)))
    decision = decide_before_call(batch, policy, now)
    problem = request_id_problem(batch.request_id)
    too_old = now - batch.created_at > timedelta(seconds=policy.max_age)
    if batch.state in TERMINAL_STATES:
        assert decision is not None and decision.to_state is batch.state
    elif problem is not None:
        assert decision is not None
        assert decision.to_state in {State.REJECTED, State.FAILED}
        assert decision.last_error == decision.detail == problem
    elif too_old:
        assert decision is not None and decision.to_state is State.EXPIRED
    else:
        assert decision is None
    if decision is not None:
        check_invariants(batch, decision, policy, now)
        assert decision.next_check_at is None and not decision.checked


# --------------------------------------------------------------------------- delays alone


@EXAMPLES
@given(policy=policies(), counter=COUNTER, seed=st.integers(0, 2**32), retry_after=RETRY_AFTER)
def test_delays_stay_within_their_bounds_for_any_counter(
    policy: PollPolicy, counter: int, seed: int, retry_after: float | None
) -> None:
    poll = poll_delay(policy, counter, random.Random(seed))
    assert policy.min_interval <= poll <= policy.max_interval
    fault = fault_delay(policy, counter, random.Random(seed), retry_after)
    assert 0 < fault <= max(fault_ceiling(policy), honoured(policy, retry_after))
    assert fault >= min(1.0, fault_ceiling(policy))


@EXAMPLES
@given(
    policy=policies(),
    age=st.floats(0, 1e300) | st.sampled_from([0.0, 1e12, 1e18, math.inf]),
    checks=COUNTER,
    budget=st.none() | budgets(),
    seed=st.integers(0, 2**32),
)
def test_processing_delay_stays_within_its_bounds_for_any_age(
    policy: PollPolicy, age: float, checks: int, budget: BudgetView | None, seed: int
) -> None:
    delay = processing_delay(policy, age=age, checks=checks, budget=budget, rng=random.Random(seed))
    assert policy.min_interval <= delay <= max(policy.max_interval, FORCED_CEILING)


def tail_budget(calls_left: int) -> BudgetView:
    """A day of steady history (150 batches, median 20 min), as in test_schedule."""
    open_seconds = 150 * 1200.0 * math.exp(0.5)
    load = LoadHistory(
        span=DAY,
        arrivals=150,
        open_seconds=open_seconds,
        recent_span=6 * 3600.0,
        recent_open_seconds=open_seconds / 4,
    )
    return BudgetView(calls_left=calls_left, day_limit=1000, open_batches=4, load=load)


@settings(max_examples=60, deadline=None)
@given(
    calls_left=st.integers(0, 1000),
    age=st.floats(1e6, 1e300) | st.sampled_from([1e12, 1e18, math.inf]),
    seed=st.integers(0, 2**32),
)
def test_far_in_the_tail_the_age_no_longer_matters(calls_left: int, age: float, seed: int) -> None:
    # Past the tabulated shape (40 medians of 20 min) the check weight is constant: any
    # older age, however absurd, is scheduled like one at 50 medians.
    policy = PollPolicy()
    budget = tail_budget(calls_left)

    def delay(at: float) -> float:
        return processing_delay(policy, age=at, checks=3, budget=budget, rng=random.Random(seed))

    assert math.isclose(delay(age), delay(50 * 1200.0), rel_tol=1e-9)
