"""Sliding-window quota arithmetic, on a clock we pass in."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracker.domain.quota import PLANS, SlidingWindowQuota, Window, plan_windows


def test_single_window_allows_limit_then_waits_for_the_oldest() -> None:
    quota = SlidingWindowQuota([Window(limit=2, seconds=1.0, name="second")])
    assert quota.wait_time(0.0) == 0.0
    quota.record(0.0)
    quota.record(0.25)
    assert quota.capacity(0.5) == 0
    assert quota.wait_time(0.5) == pytest.approx(0.5)  # the start at 0.0 leaves at 1.0
    assert quota.wait_time(1.0) == 0.0
    assert quota.capacity(1.0) == 1
    quota.record(1.0)
    assert quota.wait_time(1.0) == pytest.approx(0.25)  # now the start at 0.25 is oldest


def test_window_is_sliding_not_fixed() -> None:
    # A fixed per-minute window would allow 2 calls at 59 s and 2 more at 61 s; sliding must not.
    quota = SlidingWindowQuota([Window(limit=2, seconds=60.0, name="minute")])
    quota.record(59.0)
    quota.record(59.5)
    assert quota.wait_time(61.0) == pytest.approx(58.0)
    assert quota.wait_time(119.0) == 0.0


def test_starts_exactly_a_window_apart_do_not_share_it() -> None:
    quota = SlidingWindowQuota([Window(limit=1, seconds=1.0, name="second")])
    quota.record(10.0)
    assert quota.wait_time(10.999) > 0
    assert quota.wait_time(11.0) == 0.0


def test_each_window_is_checked_on_its_own() -> None:
    quota = SlidingWindowQuota(plan_windows(2, 3, 1000))
    quota.record(0.0)
    quota.record(0.1)
    assert quota.wait_time(0.2) == pytest.approx(0.8)  # second window full
    quota.record(1.0)
    # per second has room again at 1.1, but the minute window (3) is full until 60.0
    assert quota.usage(1.1) == {"second": (1, 2), "minute": (3, 3), "day": (3, 1000)}
    assert quota.capacity(1.1) == 0
    assert quota.wait_time(1.1) == pytest.approx(58.9)
    assert quota.wait_time(60.0) == 0.0
    assert quota.capacity(60.0) == 1  # 0.1 and 1.0 still in the minute window


def test_day_window() -> None:
    quota = SlidingWindowQuota(plan_windows(1000, 1000, 3))
    for t in (0.0, 100.0, 200.0):
        quota.record(t)
    assert quota.capacity(300.0) == 0
    assert quota.wait_time(300.0) == pytest.approx(86400.0 - 300.0)
    assert quota.usage(86400.0) == {"second": (0, 1000), "minute": (0, 1000), "day": (2, 3)}
    assert quota.capacity(86400.0) == 1


def test_capacity_is_the_tightest_window() -> None:
    quota = SlidingWindowQuota(plan_windows(*PLANS["growth"]))
    assert quota.capacity(0.0) == 5
    quota.record(0.0)
    quota.record(0.0)
    assert quota.capacity(0.5) == 3
    assert quota.usage(0.5)["second"] == (2, 5)


def test_memory_is_bounded_by_the_limit() -> None:
    quota = SlidingWindowQuota([Window(limit=3, seconds=86400.0, name="day")])
    for i in range(1000):  # recorded regardless of the quota: the server counts them too
        quota.record(float(i))
    assert quota.usage(1000.0) == {"day": (3, 3)}
    assert quota.wait_time(1000.0) == pytest.approx(997.0 + 86400.0 - 1000.0)


def test_plans_match_the_published_table() -> None:
    assert PLANS["starter"] == (1, 30, 1000)
    assert PLANS["enterprise"] == (17, 1000, 50000)
    windows = plan_windows(*PLANS["business"])
    assert [(w.name, w.limit, w.seconds) for w in windows] == [
        ("second", 2, 1.0),
        ("minute", 100, 60.0),
        ("day", 10000, 86400.0),
    ]


@pytest.mark.parametrize(("limit", "seconds"), [(0, 1.0), (-1, 1.0), (1, 0.0), (1, -5.0)])
def test_nonsense_windows_are_refused(limit: int, seconds: float) -> None:
    with pytest.raises(ValueError, match="window"):
        Window(limit=limit, seconds=seconds, name="w")


def test_quota_needs_distinct_windows() -> None:
    with pytest.raises(ValueError, match="at least one"):
        SlidingWindowQuota([])
    with pytest.raises(ValueError, match="unique"):
        SlidingWindowQuota([Window(1, 1.0, "a"), Window(2, 2.0, "a")])


@settings(max_examples=100, deadline=None)
@given(
    limit=st.integers(min_value=1, max_value=5),
    seconds=st.sampled_from([0.5, 1.0, 3.0]),
    gaps=st.lists(st.floats(min_value=0.0, max_value=2.0), min_size=1, max_size=40),
)
def test_following_wait_time_never_overfills_any_interval(
    limit: int, seconds: float, gaps: list[float]
) -> None:
    # Whatever the arrival pattern, a caller that waits as told never starts more than
    # `limit` calls within any interval shorter than `seconds`.
    quota = SlidingWindowQuota([Window(limit=limit, seconds=seconds, name="w")])
    now = 0.0
    starts: list[float] = []
    for gap in gaps:
        now += gap
        now += quota.wait_time(now)
        assert quota.wait_time(now) == 0.0
        quota.record(now)
        starts.append(now)
    for i, start in enumerate(starts):
        inside = [s for s in starts[i:] if s - start < seconds - 1e-9]
        assert len(inside) <= limit
