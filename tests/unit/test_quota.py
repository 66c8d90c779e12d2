"""The bucketed quota arithmetic: never more than `limit` starts in any sliding window."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracker.domain.quota import (
    PLANS,
    QuotaLedger,
    Window,
    calls_per_hour,
    grantable,
    plan_windows,
)


def test_plan_windows() -> None:
    windows = plan_windows(*PLANS["business"])
    assert [(w.name, w.limit, w.seconds) for w in windows] == [
        ("second", 2, 1.0),
        ("minute", 100, 60.0),
        ("day", 10000, 86400.0),
    ]


def test_grants_up_to_the_tightest_window() -> None:
    ledger = QuotaLedger(plan_windows(5, 7, 1000))
    assert ledger.reserve(100.0, 10).granted == 5
    assert ledger.reserve(100.05, 10).granted == 0
    later = ledger.reserve(101.5, 10)
    assert later.granted == 2  # the minute window has 2 left
    assert ledger.used(101.5) == {"second": (2, 5), "minute": (7, 7), "day": (7, 1000)}


def test_nothing_granted_says_how_long_to_wait() -> None:
    ledger = QuotaLedger([Window("second", 1, 1.0, 0.1, 0.15)])
    assert ledger.reserve(10.02, 1).granted == 1
    refused = ledger.reserve(10.5, 1)
    assert refused.granted == 0
    # Bucket [10.0, 10.1) stops counting at 10.1 + 1.0 + 0.15.
    assert refused.wait == pytest.approx(11.25 - 10.5, abs=1e-3)
    assert ledger.reserve(10.5 + refused.wait, 1).granted == 1


def test_release_gives_back_unused_calls() -> None:
    ledger = QuotaLedger([Window("minute", 3, 60.0, 1.0)])
    grant = ledger.reserve(0.0, 3)
    ledger.release(grant, 2)
    assert ledger.used(0.5) == {"minute": (1, 3)}
    assert ledger.reserve(0.5, 5).granted == 2


def test_pause_blocks_and_is_never_shortened() -> None:
    ledger = QuotaLedger(plan_windows(10, 100, 1000))
    ledger.pause(50.0, 10.0)
    ledger.pause(50.0, 2.0)
    ledger.pause(50.0, float("inf"))
    refused = ledger.reserve(55.0, 1)
    assert (refused.granted, refused.wait) == (0, pytest.approx(5.0))
    assert ledger.reserve(60.0, 1).granted == 1


def test_old_buckets_are_forgotten() -> None:
    ledger = QuotaLedger(plan_windows(10, 100, 1000))
    for second in range(0, 200_000, 500):
        ledger.reserve(float(second), 1)
    assert len(ledger.usage["second"]) <= 20
    assert len(ledger.usage["day"]) <= 1500


def test_windows_are_validated() -> None:
    with pytest.raises(ValueError, match="limit"):
        Window("w", 0, 1.0, 0.1)
    with pytest.raises(ValueError, match="positive"):
        Window("w", 1, 0.0, 0.1)


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(1, 5),
    seconds=st.sampled_from([1.0, 60.0]),
    gaps=st.lists(st.floats(0.0, 3.0), min_size=1, max_size=80),
    wants=st.lists(st.integers(1, 4), min_size=1, max_size=80),
)
def test_no_sliding_window_ever_holds_more_than_the_limit(
    limit: int, seconds: float, gaps: list[float], wants: list[int]
) -> None:
    window = Window("w", limit, seconds, seconds / 10)
    ledger = QuotaLedger([window])
    now, starts = 0.0, []
    for gap, want in zip(gaps, wants, strict=False):
        now += gap
        starts += [now] * ledger.reserve(now, want).granted
    for index, start in enumerate(starts):
        in_window = [t for t in starts[index:] if t - start < seconds]
        assert len(in_window) <= limit


def test_grantable_with_no_usage() -> None:
    assert grantable(plan_windows(3, 30, 300), {}, 0.0, 10) == 3


def test_calls_per_hour_sums_a_days_buckets_by_the_hour() -> None:
    day = plan_windows(1, 30, 1000)[2]
    now = 100 * 3600 + 1800.0  # half past hour 100
    ledger = QuotaLedger([day])
    ledger.reserve(now, 3)  # this hour
    ledger.reserve(now - 3600, 2)  # the hour before
    ledger.reserve(now - 23 * 3600 - 1800, 4)  # the first second of the oldest hour shown
    ledger.reserve(now - 24 * 3600, 5)  # half past hour 76: before the 24 hours shown
    hourly = calls_per_hour(day, ledger.usage["day"], now)
    assert len(hourly) == 24
    assert hourly[0] == (77 * 3600.0, 4)
    assert hourly[-1] == (100 * 3600.0, 3)
    assert hourly[-2] == (99 * 3600.0, 2)
    assert sum(calls for _, calls in hourly) == 9
    assert [start for start, _ in hourly] == [hour * 3600.0 for hour in range(77, 101)]
