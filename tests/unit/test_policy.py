"""The pure polling policy and state machine."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tracker.domain.answers import Outcome, StatusAnswer
from tracker.domain.policy import (
    DownloadProblem,
    PollPolicy,
    Tracked,
    decide_on_answer,
    decide_on_download_problem,
    fault_delay,
    is_too_old,
    poll_delay,
)
from tracker.domain.request_ids import request_id_problem
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
POLICY = PollPolicy(min_interval=30, max_interval=900, growth=1.5, fault_base=5, fault_cap=600)


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
def test_fault_delay_is_capped_and_never_zero(faults: int, seed: int) -> None:
    delay = fault_delay(POLICY, faults, random.Random(seed))
    assert 1.0 <= delay <= POLICY.fault_cap


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
