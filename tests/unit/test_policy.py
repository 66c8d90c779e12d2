"""The pure polling policy and state machine."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tracker.domain.answers import Outcome, StatusAnswer
from tracker.domain.model import Decision, DownloadProblem, PollPolicy, Tracked
from tracker.domain.policy import (
    decide_before_call,
    decide_on_answer,
    decide_on_download_done,
    decide_on_download_problem,
    fault_delay,
    is_too_old,
    plan_download,
)
from tracker.domain.request_ids import request_id_problem
from tracker.domain.schedule import poll_delay
from tracker.domain.states import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    IllegalTransition,
    State,
    can_transition,
    check_transition,
    parse_state,
)

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
POLICY = PollPolicy(min_interval=30, max_interval=900, growth=1.5, fault_base=5)


def tracked(state: State = State.PENDING, **counters: int) -> Tracked:
    values = {"checks": 0, "faults": 0, "rejections": 0, "download_attempts": 0} | counters
    return Tracked(
        id=1,
        request_id="abc",
        state=state,
        lease_token=1,
        created_at=NOW - timedelta(hours=1),
        **values,
    )


def answer(outcome: Outcome, **fields: object) -> StatusAnswer:
    return StatusAnswer(outcome=outcome, http_status=fields.pop("http_status", 200), **fields)  # type: ignore[arg-type]


@given(checks=st.integers(0, 60), seed=st.integers(0, 2**32))
def test_poll_delay_stays_between_min_and_max(checks: int, seed: int) -> None:
    delay = poll_delay(POLICY, checks, random.Random(seed))
    assert POLICY.min_interval <= delay <= POLICY.max_interval


def test_poll_delay_grows_geometrically() -> None:
    rng = random.Random(1)
    means = [sum(poll_delay(POLICY, c, rng) for _ in range(200)) / 200 for c in (0, 3, 6, 20)]
    assert means[0] < means[1] < means[2] < means[3]
    assert means[3] > 0.7 * POLICY.max_interval


@given(faults=st.integers(1, 40), seed=st.integers(0, 2**32))
def test_fault_delay_is_capped_at_max_interval_and_never_zero(faults: int, seed: int) -> None:
    delay = fault_delay(POLICY, faults, random.Random(seed))
    assert 1.0 <= delay <= POLICY.max_interval
    # Doubling from fault_base: the n-th fault in a row waits at most 5 * 2**(n-1) s.
    assert delay <= max(1.0, 5.0 * 2 ** (faults - 1))


def test_fault_delay_uses_full_jitter_up_to_max_interval() -> None:
    # The old fixed 600 s cap is gone: the ceiling is max_interval (the budget guards the quota).
    rng = random.Random(3)
    delays = [fault_delay(POLICY, 30, rng) for _ in range(2000)]
    assert max(delays) > 0.95 * POLICY.max_interval
    assert min(delays) < 0.05 * POLICY.max_interval
    assert 0.45 * POLICY.max_interval < sum(delays) / len(delays) < 0.55 * POLICY.max_interval


def test_fault_cap_can_only_tighten_the_ceiling() -> None:
    rng = random.Random(0)
    tight = PollPolicy(min_interval=0.5, max_interval=2.0, fault_base=0.3, fault_cap=1.0)
    assert all(fault_delay(tight, faults, rng) <= 1.0 for faults in range(1, 50))
    loose = PollPolicy(min_interval=30, max_interval=60, fault_cap=600)
    assert max(fault_delay(loose, 20, rng) for _ in range(500)) <= 60


def test_rate_limited_without_retry_after_waits_fault_base_within_max_interval() -> None:
    batch = tracked(State.PROCESSING)
    limited = answer(Outcome.RATE_LIMITED, http_status=429)
    decision = decide_on_answer(batch, limited, POLICY, NOW, random.Random(0))
    assert decision.next_check_at == NOW + timedelta(seconds=5)
    short = PollPolicy(min_interval=1, max_interval=2)
    decision = decide_on_answer(batch, limited, short, NOW, random.Random(0))
    assert decision.next_check_at == NOW + timedelta(seconds=2)
    # A server asking for longer than max_interval is obeyed (up to max_retry_after).
    slow = answer(Outcome.RATE_LIMITED, http_status=429, retry_after=30.0)
    decision = decide_on_answer(batch, slow, short, NOW, random.Random(0))
    assert decision.next_check_at == NOW + timedelta(seconds=30)


def test_fault_delay_honours_a_longer_retry_after() -> None:
    assert fault_delay(POLICY, 1, random.Random(0), retry_after=120.0) == 120.0


def test_first_in_progress_answer_moves_pending_to_processing() -> None:
    decision = decide_on_answer(
        tracked(), answer(Outcome.PROCESSING, api_status=201), POLICY, NOW, random.Random(0)
    )
    assert decision.to_state is State.PROCESSING
    assert decision.checked and decision.api_status == 201
    assert decision.next_check_at is not None and decision.next_check_at >= NOW + timedelta(
        seconds=30
    )


def test_completed_answer_makes_the_batch_ready_with_a_url() -> None:
    decision = decide_on_answer(
        tracked(State.PROCESSING, faults=2),
        answer(Outcome.COMPLETED, output_url="https://x.s3.amazonaws.com/a.csv"),
        POLICY,
        NOW,
        random.Random(0),
    )
    assert decision.to_state is State.READY
    assert decision.download_url == "https://x.s3.amazonaws.com/a.csv"
    assert decision.faults == 0


def test_failed_answer_is_terminal() -> None:
    decision = decide_on_answer(
        tracked(State.PROCESSING),
        answer(Outcome.FAILED, api_status=500, api_message="batch processing failed"),
        POLICY,
        NOW,
        random.Random(0),
    )
    assert decision.to_state is State.FAILED
    assert decision.to_state in TERMINAL_STATES
    assert "failed" in (decision.last_error or "")


def test_transient_fault_keeps_state_and_backs_off() -> None:
    batch = tracked(State.PROCESSING, faults=3, checks=5)
    decision = decide_on_answer(
        batch,
        answer(Outcome.TRANSIENT, http_status=503, detail="Source Unavailable"),
        POLICY,
        NOW,
        random.Random(0),
    )
    assert decision.to_state is State.PROCESSING
    assert decision.faults == 4
    assert decision.last_error == "Source Unavailable"
    assert decision.next_check_at is not None and decision.next_check_at > NOW


def test_invalid_answers_reject_only_after_several_in_a_row() -> None:
    rng = random.Random(0)
    invalid = answer(Outcome.INVALID, http_status=404, api_message="request_id not found")
    first = decide_on_answer(tracked(), invalid, POLICY, NOW, rng)
    assert first.to_state is State.PENDING and first.rejections == 1
    third = decide_on_answer(tracked(rejections=2), invalid, POLICY, NOW, rng)
    assert third.to_state is State.REJECTED
    assert "404" in (third.last_error or "")


def test_an_in_progress_answer_resets_the_rejection_streak() -> None:
    decision = decide_on_answer(
        tracked(rejections=2), answer(Outcome.PROCESSING), POLICY, NOW, random.Random(0)
    )
    assert decision.rejections == 0


def test_rate_limited_does_not_count_against_the_batch() -> None:
    batch = tracked(State.PROCESSING, faults=2, rejections=1)
    decision = decide_on_answer(
        batch,
        answer(Outcome.RATE_LIMITED, http_status=429, retry_after=42.0),
        POLICY,
        NOW,
        random.Random(0),
    )
    assert (decision.to_state, decision.faults, decision.rejections) == (State.PROCESSING, 2, 1)
    assert decision.next_check_at == NOW + timedelta(seconds=42)


def test_ready_batch_stays_ready_if_deepvue_wobbles() -> None:
    decision = decide_on_answer(
        tracked(State.READY), answer(Outcome.PROCESSING), POLICY, NOW, random.Random(0)
    )
    assert decision.to_state is State.READY


@pytest.mark.parametrize(
    ("problem", "attempts_before", "expected_state", "expected_attempts"),
    [
        (DownloadProblem.REFUSED, 0, State.FAILED, 0),
        (DownloadProblem.UNWRITABLE, 4, State.READY, 4),
        (DownloadProblem.INTERRUPTED, 0, State.READY, 1),
        (DownloadProblem.URL_EXPIRED, 1, State.READY, 2),
        (DownloadProblem.INTERRUPTED, 4, State.FAILED, 5),
    ],
)
def test_download_problems(
    problem: DownloadProblem, attempts_before: int, expected_state: State, expected_attempts: int
) -> None:
    batch = tracked(State.READY, download_attempts=attempts_before)
    decision = decide_on_download_problem(batch, problem, "boom", POLICY, NOW, random.Random(0))
    assert decision.to_state is expected_state
    assert decision.download_attempts == expected_attempts
    if expected_state is State.READY:
        assert decision.next_check_at is not None
        if problem is DownloadProblem.URL_EXPIRED:
            assert decision.next_check_at == NOW  # ask for a fresh URL straight away


def test_age_limit() -> None:
    policy = PollPolicy(max_age=3600)
    young = tracked()
    old = Tracked(**{**young.__dict__, "created_at": NOW - timedelta(hours=2)})
    assert not is_too_old(young, policy, NOW - timedelta(minutes=1))
    assert is_too_old(old, policy, NOW)


def test_state_machine() -> None:
    assert can_transition(State.PENDING, State.PROCESSING)
    assert can_transition(State.READY, State.DOWNLOADED)
    assert not can_transition(State.READY, State.PROCESSING)
    assert not can_transition(State.PENDING, State.DOWNLOADED)
    for terminal in TERMINAL_STATES:
        assert can_transition(terminal, State.PENDING)
        for active in ACTIVE_STATES - {State.PENDING}:
            assert not can_transition(terminal, active)
    for state in State:
        assert not can_transition(state, state)
    with pytest.raises(IllegalTransition):
        check_transition(State.DOWNLOADED, State.READY)
    assert parse_state("ready") is State.READY
    with pytest.raises(ValueError, match="one of"):
        parse_state("done")


@pytest.mark.parametrize("good", ["a", "06d0d7c340ed460d96103aaa0b26f0de", "fail-x_1", "A" * 128])
def test_request_id_accepted(good: str) -> None:
    assert request_id_problem(good) is None


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "-lead",
        "_lead",
        "../etc/passwd",
        "a/b",
        "a.b",
        "a b",
        "a\x00b",
        "é",
        "A" * 129,
        "x'; DROP TABLE t;--",
    ],
)
def test_request_id_refused(bad: str) -> None:
    problem = request_id_problem(bad)
    assert problem is not None
    assert "\x00" not in problem


@given(st.text())
def test_request_id_check_never_raises_and_accepts_only_safe_names(text: str) -> None:
    if request_id_problem(text) is None:
        assert "/" not in text and "." not in text and 1 <= len(text) <= 128
        assert text.isascii() and text.replace("-", "").replace("_", "").isalnum()


# --------------------------------------------------------------------------- regressions

INVALID_404 = answer(Outcome.INVALID, http_status=404, api_message="request_id not found")


def test_repeated_invalid_answers_fail_a_ready_batch_instead_of_rejecting_it() -> None:
    # ready -> rejected is forbidden by the state machine: Deepvue said it completed.
    decision = decide_on_answer(
        tracked(State.READY, rejections=2), INVALID_404, POLICY, NOW, random.Random(0)
    )
    assert decision.to_state is State.FAILED
    assert can_transition(State.READY, decision.to_state)
    assert decision.rejections == 3 and decision.next_check_at is None
    assert "completed" in (decision.last_error or "") and "404" in (decision.last_error or "")


def test_a_ready_batch_refused_fewer_times_stays_ready() -> None:
    decision = decide_on_answer(
        tracked(State.READY, rejections=0), INVALID_404, POLICY, NOW, random.Random(0)
    )
    assert decision.to_state is State.READY and decision.rejections == 1


@pytest.mark.parametrize("state", sorted(TERMINAL_STATES))
@pytest.mark.parametrize("outcome", list(Outcome))
def test_an_answer_never_moves_a_terminal_batch(state: State, outcome: Outcome) -> None:
    batch = tracked(state, rejections=5, faults=2, download_attempts=1)
    decision = decide_on_answer(
        batch, answer(outcome, output_url="https://x/a.csv"), POLICY, NOW, random.Random(0)
    )
    assert decision.to_state is state
    assert decision.download_url is None and decision.next_check_at is None


@pytest.mark.parametrize("state", sorted(TERMINAL_STATES))
@pytest.mark.parametrize("problem", list(DownloadProblem))
def test_a_download_problem_never_moves_a_terminal_batch(
    state: State, problem: DownloadProblem
) -> None:
    batch = tracked(state, download_attempts=10)
    decision = decide_on_download_problem(batch, problem, "boom", POLICY, NOW, random.Random(0))
    assert decision.to_state is state and decision.next_check_at is None


def test_huge_fault_counters_do_not_overflow() -> None:
    rng = random.Random(0)
    for faults in (1025, 2**40, 2**63):
        assert 1.0 <= fault_delay(POLICY, faults, rng) <= POLICY.max_interval
    batch = tracked(State.PROCESSING, faults=2**63)
    decision = decide_on_answer(batch, answer(Outcome.TRANSIENT, http_status=503), POLICY, NOW, rng)
    assert decision.next_check_at is not None
    assert NOW < decision.next_check_at <= NOW + timedelta(seconds=POLICY.max_interval)


def test_huge_check_counters_do_not_overflow() -> None:
    rng = random.Random(0)
    for checks in (1760, 2**40, 2**63):
        assert POLICY.max_interval / 2 <= poll_delay(POLICY, checks, rng) <= POLICY.max_interval
    decision = decide_on_answer(
        tracked(State.PROCESSING, checks=2**63), answer(Outcome.PROCESSING), POLICY, NOW, rng
    )
    assert decision.next_check_at is not None


@pytest.mark.parametrize("outcome", [Outcome.TRANSIENT, Outcome.AUTH, Outcome.RATE_LIMITED])
@pytest.mark.parametrize("retry_after", [1e12, 1e18, math.inf, math.nan])
def test_an_absurd_retry_after_is_clamped(outcome: Outcome, retry_after: float) -> None:
    batch = tracked(State.PROCESSING)
    decision = decide_on_answer(
        batch,
        answer(outcome, http_status=503, retry_after=retry_after),
        POLICY,
        NOW,
        random.Random(0),
    )
    assert decision.next_check_at is not None
    assert NOW <= decision.next_check_at <= NOW + timedelta(seconds=POLICY.max_retry_after)


def test_a_retry_after_is_honoured_up_to_max_retry_after() -> None:
    policy = PollPolicy(max_retry_after=600)
    batch = tracked(State.PROCESSING)
    for retry_after, expected in ((120.0, 120.0), (600.0, 600.0), (5000.0, 600.0)):
        for outcome in (Outcome.TRANSIENT, Outcome.RATE_LIMITED):
            decision = decide_on_answer(
                batch, answer(outcome, retry_after=retry_after), policy, NOW, random.Random(0)
            )
            assert decision.next_check_at == NOW + timedelta(seconds=expected)


def test_fault_backoff_is_capped_at_max_interval() -> None:
    # The reported case: max_interval 1 s, calls failing half the time.
    policy = PollPolicy(min_interval=1, max_interval=1)
    rng = random.Random(0)
    for faults in range(1, 60):
        assert fault_delay(policy, faults, rng) <= 1.0
    batch = tracked(State.PROCESSING, faults=30, rejections=1)
    for outcome, http_status in (
        (Outcome.TRANSIENT, 503),
        (Outcome.AUTH, 401),
        (Outcome.RATE_LIMITED, 429),
        (Outcome.INVALID, 404),
    ):
        decision = decide_on_answer(
            batch, answer(outcome, http_status=http_status), policy, NOW, rng
        )
        assert decision.next_check_at is not None
        assert decision.next_check_at <= NOW + timedelta(seconds=1), outcome
    for problem in (DownloadProblem.INTERRUPTED, DownloadProblem.UNWRITABLE):
        decision = decide_on_download_problem(
            tracked(State.READY, faults=30, download_attempts=2), problem, "x", policy, NOW, rng
        )
        assert decision.next_check_at is not None
        assert decision.next_check_at <= NOW + timedelta(seconds=1), problem


def test_the_one_second_floor_never_exceeds_max_interval() -> None:
    policy = PollPolicy(min_interval=0.1, max_interval=0.25, fault_base=0.01)
    rng = random.Random(0)
    delays = [fault_delay(policy, faults, rng) for faults in range(1, 200)]
    assert all(0 < delay <= 0.25 for delay in delays)


def test_no_check_is_scheduled_past_the_maximum_age() -> None:
    policy = PollPolicy(min_interval=30, max_interval=900, max_age=3600)
    # 10 s of tracking left.
    batch = Tracked(
        **{
            **tracked(State.PROCESSING, checks=50, faults=9).__dict__,
            "created_at": NOW - timedelta(seconds=3590),
        }
    )
    deadline = NOW + timedelta(seconds=10)
    rng = random.Random(0)
    for outcome in Outcome:
        decision = decide_on_answer(
            batch,
            answer(outcome, output_url="https://x/a.csv", retry_after=300.0),
            policy,
            NOW,
            rng,
        )
        assert decision.next_check_at is None or NOW <= decision.next_check_at <= deadline, outcome
    ready = replace(batch, state=State.READY)
    for problem in DownloadProblem:
        decision = decide_on_download_problem(ready, problem, "x", policy, NOW, rng)
        assert decision.next_check_at is None or NOW <= decision.next_check_at <= deadline, problem
    # Past the deadline: due at once (the sweep then expires it before calling).
    late = replace(batch, created_at=NOW - timedelta(hours=2))
    decision = decide_on_answer(late, answer(Outcome.PROCESSING), policy, NOW, rng)
    assert decision.next_check_at == NOW


# --------------------------------------------------------------------------- before the call


def test_before_call_rejects_a_malformed_request_id() -> None:
    batch = replace(tracked(State.PENDING), request_id="../etc/passwd")
    decision = decide_before_call(batch, POLICY, NOW)
    assert decision is not None
    assert decision.to_state is State.REJECTED and decision.next_check_at is None
    assert decision.last_error == decision.detail == request_id_problem("../etc/passwd")


def test_before_call_fails_a_ready_batch_with_a_malformed_request_id() -> None:
    batch = replace(tracked(State.READY), request_id="")
    decision = decide_before_call(batch, POLICY, NOW)
    assert decision is not None and decision.to_state is State.FAILED
    assert decision.last_error == decision.detail == "request_id is empty"


@pytest.mark.parametrize("state", sorted(ACTIVE_STATES))
def test_before_call_rejects_a_malformed_row_naming_its_values(state: State) -> None:
    problems = ("created_at='yesterday' is not a timestamp", "checks='abc' is not a count")
    batch = replace(tracked(state), problems=problems)
    decision = decide_before_call(batch, POLICY, NOW)
    assert decision is not None
    # Quarantined, not polled: rejected, or failed where rejected is no transition (ready).
    assert decision.to_state is (State.FAILED if state is State.READY else State.REJECTED)
    assert decision.last_error == decision.detail == "malformed row: " + "; ".join(problems)
    assert (decision.next_check_at, decision.checked) == (None, False)


@pytest.mark.parametrize("state", sorted(ACTIVE_STATES))
def test_before_call_expires_a_batch_past_the_maximum_age(state: State) -> None:
    policy = PollPolicy(max_age=3600)
    batch = replace(tracked(state), created_at=NOW - timedelta(seconds=3601))
    decision = decide_before_call(batch, policy, NOW)
    assert decision is not None and decision.to_state is State.EXPIRED
    reason = "not finished within the maximum tracking age of 3600 s"
    assert decision.last_error == decision.detail == reason
    assert decide_before_call(batch, policy, NOW - timedelta(seconds=2)) is None


def test_before_call_a_malformed_id_wins_over_the_age() -> None:
    batch = replace(tracked(), request_id="a b", created_at=NOW - timedelta(days=30))
    decision = decide_before_call(batch, POLICY, NOW)
    assert decision is not None and decision.to_state is State.REJECTED


@pytest.mark.parametrize("state", sorted(ACTIVE_STATES))
def test_before_call_a_sound_young_batch_needs_a_status_call(state: State) -> None:
    assert decide_before_call(tracked(state), POLICY, NOW) is None


@pytest.mark.parametrize("state", sorted(TERMINAL_STATES))
def test_before_call_never_moves_a_terminal_batch(state: State) -> None:
    batch = replace(tracked(state), request_id="", created_at=NOW - timedelta(days=365))
    decision = decide_before_call(batch, POLICY, NOW)
    assert decision is not None and decision.to_state is state


def test_download_done() -> None:
    decision = decide_on_download_done(tracked(State.READY, download_attempts=2), 1234, "ab" * 32)
    assert decision.to_state is State.DOWNLOADED and decision.next_check_at is None
    assert decision.download_attempts == 3
    assert decision.detail == f"saved 1234 bytes, sha256 {'ab' * 32}"


@pytest.mark.parametrize("state", sorted(set(State) - {State.READY}))
def test_download_done_never_makes_a_forbidden_move(state: State) -> None:
    decision = decide_on_download_done(tracked(state), 1, "00")
    assert decision.to_state is state


# --------------------------------------------------------------------------- the download plan

URL = "https://x.s3.amazonaws.com/a.csv"


def completed(batch: Tracked) -> Decision:
    return decide_on_answer(
        batch, answer(Outcome.COMPLETED, output_url=URL), POLICY, NOW, random.Random(0)
    )


@pytest.mark.parametrize("state", [State.PENDING, State.PROCESSING])
def test_a_complete_batch_is_planned_ready_first_then_fetched(state: State) -> None:
    batch = tracked(state, checks=4, faults=2, rejections=1, download_attempts=1)
    decision = completed(batch)
    plan = plan_download(batch, decision)
    assert plan is not None
    assert plan.url == URL
    # The "ready" write is the decision without its URL: the URL is never stored.
    assert plan.ready == replace(decision, download_url=None)
    assert plan.ready.to_state is State.READY
    assert not plan.leftovers_possible


def test_the_planned_batch_keeps_the_counters_it_was_claimed_with() -> None:
    batch = tracked(State.PROCESSING, checks=4, faults=2, rejections=1, download_attempts=1)
    plan = plan_download(batch, completed(batch))
    assert plan is not None
    # One check more, the lease kept (same id, same token); the fault streak is the claimed
    # one, though the ready write itself resets the row's.
    assert plan.batch == replace(batch, state=State.READY, checks=5)
    assert plan.ready.faults == 0


def test_a_full_disk_counts_on_from_the_claimed_faults_so_its_backoff_grows() -> None:
    batch = tracked(State.READY, checks=6, faults=3, download_attempts=1)
    plan = plan_download(batch, completed(batch))
    assert plan is not None
    decision = decide_on_download_problem(
        plan.batch, DownloadProblem.UNWRITABLE, "disk full", POLICY, NOW, random.Random(0)
    )
    assert decision.faults == 4
    assert decision.download_attempts == 1  # never counted against the batch


def test_only_an_already_ready_batch_may_have_left_a_temp_file() -> None:
    batch = tracked(State.READY, checks=7, download_attempts=2)
    plan = plan_download(batch, completed(batch))
    assert plan is not None
    assert plan.leftovers_possible
    assert plan.batch.state is State.READY and plan.batch.checks == 8
    assert plan.batch.download_attempts == 2


@pytest.mark.parametrize("outcome", sorted(set(Outcome) - {Outcome.COMPLETED}))
def test_no_plan_without_an_output_url(outcome: Outcome) -> None:
    batch = tracked(State.PROCESSING)
    decision = decide_on_answer(
        batch, answer(outcome, output_url=URL), POLICY, NOW, random.Random(0)
    )
    assert plan_download(batch, decision) is None


def test_no_plan_for_a_terminal_batch() -> None:
    batch = tracked(State.DOWNLOADED)
    assert plan_download(batch, completed(batch)) is None
