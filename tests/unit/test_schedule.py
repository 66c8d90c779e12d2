"""The budget-aware polling schedule, and a small run of the quota simulation."""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from collections.abc import Callable
from pathlib import Path
from statistics import NormalDist, mean
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracker.domain import schedule
from tracker.domain.model import PollPolicy
from tracker.domain.quota import PLANS, QuotaLedger, plan_windows
from tracker.domain.schedule import (
    BudgetView,
    LoadHistory,
    budget_interval,
    poll_delay,
    processing_delay,
    releases_per_slot,
)

POLICY = PollPolicy(min_interval=30, max_interval=900)
DAY = 86400.0
MEDIAN = 1200.0


def steady_load(per_day: int = 150, mean_open: float = MEDIAN * math.exp(0.5)) -> LoadHistory:
    """A day of history: `per_day` arrivals, each open `mean_open` seconds on average."""
    busy_seconds = per_day * mean_open
    return LoadHistory(
        span=DAY,
        arrivals=per_day,
        open_seconds=busy_seconds,
        recent_span=6 * 3600.0,
        recent_open_seconds=busy_seconds / 4,
    )


def view(
    calls_left: int,
    day_limit: int = 1000,
    open_batches: int = 4,
    load: LoadHistory | None = None,
    releases: tuple[int, ...] = (),
) -> BudgetView:
    return BudgetView(
        calls_left=calls_left,
        day_limit=day_limit,
        open_batches=open_batches,
        releases=releases,
        load=load if load is not None else steady_load(),
    )


def delays(budget: BudgetView | None, age: float, checks: int = 3, n: int = 200) -> list[float]:
    rng = random.Random(7)
    return [
        processing_delay(POLICY, age=age, checks=checks, budget=budget, rng=rng) for _ in range(n)
    ]


# --------------------------------------------------------------------------- no budget


@given(checks=st.integers(0, 40), age=st.floats(0, 7 * DAY), seed=st.integers(0, 2**32))
def test_without_a_budget_it_is_the_old_backoff(checks: int, age: float, seed: int) -> None:
    old = poll_delay(POLICY, checks, random.Random(seed))
    new = processing_delay(POLICY, age=age, checks=checks, budget=None, rng=random.Random(seed))
    assert new == old


# --------------------------------------------------------------------------- with a budget


def test_plentiful_budget_checks_batches_near_the_median_at_the_minimum() -> None:
    enterprise = view(calls_left=49_000, day_limit=50_000, open_batches=5)
    for age in (0.5 * MEDIAN, MEDIAN, 2 * MEDIAN):
        got = delays(enterprise, age)
        assert min(got) >= POLICY.min_interval
        assert max(got) <= POLICY.min_interval * (1 + schedule.JITTER)


def test_scarce_budget_stretches_intervals() -> None:
    # Starter, a normal day's load: the window affords roughly six calls a batch.
    starter = view(calls_left=300, releases=(40,) * 24)
    plentiful = view(calls_left=49_000, day_limit=50_000, releases=(40,) * 24)
    scarce = mean(delays(starter, MEDIAN))
    assert scarce > 2 * mean(delays(plentiful, MEDIAN))
    # A heavier load (twice the batches open for twice as long) stretches them further.
    heavy = view(calls_left=300, releases=(40,) * 24, load=steady_load(150, 2 * MEDIAN * 1.65))
    assert mean(delays(heavy, MEDIAN)) > 1.5 * scarce


def test_the_plan_spends_the_day_on_the_load_of_the_last_day() -> None:
    load = steady_load()
    budget = view(calls_left=300, releases=(40,) * 24, load=load)
    busy = load.open_seconds / DAY
    reserve = schedule.RESERVE_SHARE * budget.day_limit
    for_checks = budget.calls_left + budget.released_within(DAY) - reserve - load.arrivals
    expected = schedule.HEADROOM * busy * DAY / for_checks
    assert budget_interval(budget) == pytest.approx(expected)


def test_the_plan_ignores_the_open_count_of_the_moment() -> None:
    # Two or six open batches: the same interval, so busy hours are not starved.
    few = budget_interval(view(calls_left=300, open_batches=2, releases=(40,) * 24))
    many = budget_interval(view(calls_left=300, open_batches=6, releases=(40,) * 24))
    assert few == many


def test_a_burst_is_braked_by_the_next_hour_and_may_exceed_max_interval() -> None:
    budget = view(calls_left=40, open_batches=100, releases=(5,) * 24)
    available = 40 - schedule.BURST_RESERVE_SHARE * 1000 + 5
    expected_arrivals = 150 / 24
    arriving = expected_arrivals + schedule.ARRIVAL_SPREAD * math.sqrt(expected_arrivals)
    assert budget_interval(budget) == pytest.approx(
        min(100 * 3600 / (available - arriving), schedule.FORCED_CEILING)
    )
    got = delays(budget, MEDIAN)
    assert min(got) > POLICY.max_interval
    assert max(got) <= schedule.FORCED_CEILING


def test_an_exhausted_budget_waits_at_most_the_ceiling() -> None:
    budget = view(calls_left=0, open_batches=10, releases=(0,) * 24)
    assert budget_interval(budget) == schedule.FORCED_CEILING
    got = delays(budget, MEDIAN, n=20)
    assert POLICY.max_interval < min(got)
    assert max(got) <= schedule.FORCED_CEILING


def test_calls_returning_within_the_hour_lift_the_brake() -> None:
    starved = view(calls_left=20, open_batches=8, releases=(0,) * 24)
    refilled = view(calls_left=20, open_batches=8, releases=(60,) + (0,) * 23)
    assert budget_interval(refilled) < budget_interval(starved)


def test_a_fresh_budget_must_last_until_the_window_gives_back() -> None:
    # Six hours into a fresh install, 250 calls spent: nothing comes back for 18 hours.
    fresh_load = LoadHistory(span=6 * 3600.0, arrivals=40, open_seconds=6 * 3600.0 * 3.5)
    spent = view(calls_left=750, open_batches=3, load=fresh_load)
    busy = 3.5
    arrivals = 40 / (6 * 3600.0) * 18 * 3600.0
    reserve = schedule.RESERVE_SHARE * 1000
    until_refill = busy * schedule.HEADROOM * 18 * 3600.0 / (750 - reserve - arrivals)
    assert budget_interval(spent) == pytest.approx(until_refill)
    # The same calls left with a full day of history would be planned over a day instead.
    steady = view(calls_left=750, load=steady_load())
    assert budget_interval(steady) < budget_interval(spent)


def test_young_and_long_running_batches_wait_longer_than_those_near_the_median() -> None:
    budget = view(calls_left=300, releases=(40,) * 24)
    base = budget_interval(budget)
    young = mean(delays(budget, age=10.0))
    near_median = mean(delays(budget, age=MEDIAN))
    long_running = mean(delays(budget, age=8 * MEDIAN))
    assert young > base > near_median
    assert long_running > near_median
    # Across the plateau the weight is 1: the interval is the plan times the mean weight.
    assert near_median == pytest.approx(base * schedule._shape().mean_weight, rel=0.03)


@settings(max_examples=200, deadline=None)
@given(
    calls_left=st.integers(0, 1000),
    open_batches=st.integers(0, 300),
    arrivals=st.integers(0, 2000),
    open_hours=st.floats(0, 5000),
    span=st.floats(0, DAY),
    age=st.floats(0, 7 * DAY),
    release=st.integers(0, 50),
    seed=st.integers(0, 2**32),
)
def test_always_between_min_and_the_forced_ceiling(
    calls_left: int,
    open_batches: int,
    arrivals: int,
    open_hours: float,
    span: float,
    age: float,
    release: int,
    seed: int,
) -> None:
    load = LoadHistory(span=span, arrivals=arrivals, open_seconds=open_hours * 3600.0)
    budget = view(calls_left, open_batches=open_batches, load=load, releases=(release,) * 24)
    got = processing_delay(POLICY, age=age, checks=5, budget=budget, rng=random.Random(seed))
    assert POLICY.min_interval <= got <= max(POLICY.max_interval, schedule.FORCED_CEILING)
    assert math.isfinite(got)


@settings(max_examples=300, deadline=None)
@given(
    calls_left=st.integers(0, 1000),
    open_batches=st.integers(1, 60),
    arrivals=st.integers(0, 600),
    open_hours=st.floats(0, 200),
    releases=st.lists(st.integers(0, 80), min_size=24, max_size=24),
)
def test_the_plan_never_promises_more_calls_than_the_budget_holds(
    calls_left: int, open_batches: int, arrivals: int, open_hours: float, releases: list[int]
) -> None:
    # A full day of history, nothing recent to weigh in: the load is plain to compute here.
    load = LoadHistory(span=DAY, arrivals=arrivals, open_seconds=open_hours * 3600.0)
    budget = view(calls_left, open_batches=open_batches, load=load, releases=tuple(releases))
    interval = budget_interval(budget)
    if interval >= schedule.FORCED_CEILING:
        return  # nothing affordable: the ceiling only bounds how long a batch is parked
    hour, limit = 3600.0, 1000
    arriving = arrivals / DAY * hour
    arriving += schedule.ARRIVAL_SPREAD * math.sqrt(arriving)
    next_hour = open_batches * hour / interval + arriving
    assert next_hour <= calls_left - schedule.BURST_RESERVE_SHARE * limit + releases[0] + 1e-6
    busy = max(open_hours * 3600.0 / DAY, 1.0)
    next_day = schedule.HEADROOM * busy * DAY / interval + arrivals
    assert next_day <= limit - schedule.RESERVE_SHARE * limit + 1e-6


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    per_day=st.integers(20, 200),
    median_minutes=st.floats(5, 60),
    days=st.integers(1, 2),
)
def test_simulated_days_never_overrun_the_quota(
    seed: int, per_day: int, median_minutes: float, days: int
) -> None:
    # Any load the Starter quota can serve at all: batches arrive at random, lognormal
    # durations, every call through the real ledger; no check may wait for a full window.
    sim = load_quota_sim()
    rng = random.Random(seed)
    batches = sorted(
        (
            sim.Batch(
                inserted=day * DAY + rng.uniform(0, DAY),
                duration=median_minutes * 60 * math.exp(rng.gauss(0, 1)),
            )
            for day in range(days)
            for _ in range(per_day)
        ),
        key=lambda batch: batch.inserted,
    )
    run = sim.simulate(batches, "starter", sim.tracker_policy(seed), measured=(0.0, days * DAY))
    assert run.overruns == 0
    assert run.batches == len(batches)


def test_deterministic_for_a_seeded_rng() -> None:
    budget = view(calls_left=300, releases=(40,) * 24)
    first = [
        processing_delay(POLICY, age=a, checks=2, budget=budget, rng=random.Random(3))
        for a in (10.0, 600.0, 5000.0)
    ]
    again = [
        processing_delay(POLICY, age=a, checks=2, budget=budget, rng=random.Random(3))
        for a in (10.0, 600.0, 5000.0)
    ]
    assert first == again


def test_the_weight_table_follows_the_lognormal_hazard() -> None:
    # Computed here independently, on a finer grid, from the lognormal's definition.
    normal = NormalDist()

    def hazard(x: float) -> float:
        z = math.log(x) / schedule.SHAPE_SIGMA
        return normal.pdf(z) / (x * schedule.SHAPE_SIGMA) / (1 - normal.cdf(z))

    grid = [i / 2000 for i in range(1, 20_000)]
    peak_at = max(grid, key=hazard)
    peak = hazard(peak_at)
    shape = schedule._shape()
    assert shape.peak_at == pytest.approx(peak_at, abs=0.01)
    assert peak_at == pytest.approx(0.618, abs=0.002)  # the lognormal's, sigma 1

    def weight(x: float) -> float:
        return min(1.0, hazard(x) / (schedule.SHAPE_CLIP * peak))

    for x in (0.05, 0.1, 0.15, 0.3, 1.0, 3.0, 5.0, 10.0, 20.0):
        cell = int(x / schedule.SHAPE_STEP)
        midpoint = (cell + 0.5) * schedule.SHAPE_STEP
        assert shape.weights[cell] == pytest.approx(weight(midpoint), abs=0.005)
    # Flat where most batches finish, lower for the first minutes and the long tail.
    assert all(w == 1.0 for w in shape.weights[int(0.2 / 0.01) : int(3.0 / 0.01)])
    assert shape.weights[int(0.05 / 0.01)] < 0.3
    assert shape.weights[int(10 / 0.01)] < 0.7
    # The mean weight over open batch-time (the survival function is its density).
    weighted = total = 0.0
    for i in range(1, 80_000):
        x = i / 2000
        survival = 1 - normal.cdf(math.log(x) / schedule.SHAPE_SIGMA)
        weighted += survival * weight(x)
        total += survival
    assert shape.mean_weight == pytest.approx(weighted / total, abs=0.003)


def test_the_accumulated_weight_and_its_inverse_agree() -> None:
    shape = schedule._shape()
    for x in (0.0, 0.004, 0.5, 1.234, 39.99, 40.0, 55.5):
        assert shape.age_reaching(shape.accumulated(x)) == pytest.approx(x, abs=1e-9)


# --------------------------------------------------------------------------- where the calls go


LOOSE = PollPolicy(min_interval=1, max_interval=20 * 3600)  # bounds that never bind here


def lifetimes_polled(
    next_delay: Callable[[float, random.Random], float], durations: list[float]
) -> tuple[float, list[float]]:
    """Calls per batch and detection delays when every batch is checked at insertion and
    then after `next_delay(age)` until a check finds it finished."""
    rng = random.Random(1)
    calls = 0
    found_late = []
    for duration in durations:
        age = 0.0
        calls += 1
        while age < duration:
            age += next_delay(age, rng)
            calls += 1
        found_late.append(age - duration)
    return calls / len(durations), sorted(found_late)


def lognormal_durations(n: int = 4000) -> list[float]:
    rng = random.Random(5)
    return [MEDIAN * math.exp(rng.gauss(0, 1)) for _ in range(n)]


def test_checks_concentrate_where_completion_is_likely() -> None:
    load = steady_load()
    rng = random.Random(2)
    # One long batch followed through its life: count its checks per age band.
    ages = [0.0]
    while ages[-1] < 10 * MEDIAN:
        age = ages[-1]
        ages.append(
            age + schedule.age_shaped_delay(LOOSE, age=age, interval=400, load=load, rng=rng)
        )

    def checks_per_hour(low: float, high: float) -> float:
        # The check at insertion is the sweep's, not the schedule's: leave it out.
        inside = sum(1 for age in ages[1:] if low * MEDIAN <= age < high * MEDIAN)
        return inside / ((high - low) * MEDIAN / 3600)

    first_minutes = checks_per_hour(0.0, 0.3)
    around_median = checks_per_hour(0.3, 2.0)
    tail = checks_per_hour(5.0, 10.0)
    assert around_median > 1.4 * first_minutes
    assert around_median > 1.4 * tail


def test_reshaping_moves_calls_without_adding_any() -> None:
    durations = lognormal_durations()
    load = steady_load()
    fixed_calls, _ = lifetimes_polled(lambda age, rng: 400.0, durations)
    shaped_calls, _ = lifetimes_polled(
        lambda age, rng: schedule.age_shaped_delay(
            LOOSE, age=age, interval=400.0, load=load, rng=rng
        ),
        durations,
    )
    assert shaped_calls == pytest.approx(fixed_calls, rel=0.02)


def test_reshaping_lowers_the_p95_delay_for_the_same_calls() -> None:
    # The design goal of the weight, in isolation from the budget plan: the same durations
    # polled at a fixed 400 s and by age around a 400 s plan.
    durations = lognormal_durations()
    load = steady_load()
    fixed_calls, fixed_late = lifetimes_polled(lambda age, rng: 400.0, durations)
    shaped_calls, shaped_late = lifetimes_polled(
        lambda age, rng: schedule.age_shaped_delay(
            POLICY, age=age, interval=400.0, load=load, rng=rng
        ),
        durations,
    )
    p95 = int(0.95 * len(durations))
    assert shaped_calls <= 1.01 * fixed_calls
    assert shaped_late[p95] < 0.96 * fixed_late[p95]
    assert mean(shaped_late) < mean(fixed_late)


def test_no_reshaping_without_a_duration_to_go_by() -> None:
    unknown = LoadHistory(span=DAY, arrivals=0, open_seconds=0.0)
    got = schedule.age_shaped_delay(
        POLICY, age=600.0, interval=400.0, load=unknown, rng=random.Random(1)
    )
    assert 400 * (1 - schedule.JITTER) <= got <= 400 * (1 + schedule.JITTER)


# --------------------------------------------------------------------------- inputs


def test_released_within_counts_whole_slots_only() -> None:
    budget = view(calls_left=100, releases=(10, 20, 30) + (0,) * 21)
    assert budget.released_within(1800) == 0
    assert budget.released_within(3600) == 10
    assert budget.released_within(3 * 3600) == 60
    assert budget.released_within(DAY) == 900  # everything counted leaves within a day
    unknown = view(calls_left=100)
    assert unknown.released_within(12 * 3600) == 0


def test_releases_follow_the_ledger() -> None:
    ledger = QuotaLedger(plan_windows(*PLANS["starter"]))
    day = next(w for w in ledger.windows if w.name == "day")
    for at, calls in ((0.0, 3), (1800.0, 2), (5 * 3600.0, 4)):
        for i in range(calls):
            assert ledger.reserve(at + 2 * i, 1).granted == 1
    now = DAY - 3000.0  # 51 minutes before the first calls stop counting
    releases = releases_per_slot(day, ledger.usage["day"], now)
    assert sum(releases) == ledger.used(now)["day"][0] == 9
    assert releases[0] == 3  # the calls at 0 s leave within the hour
    assert releases[1] == 2  # those at 1800 s, 81 minutes from now
    assert releases[5] == 4
    # Exactly when the ledger stops counting them.
    first_gone = ledger.used(DAY + 60.2)["day"][0]
    assert first_gone == 6
    budget = BudgetView.from_ledger(ledger, now, open_batches=3, load=None)
    assert (budget.calls_left, budget.day_limit, budget.window) == (991, 1000, DAY)
    assert budget.releases == releases
    assert budget.released_within(2 * 3600.0) == 5


def test_load_history_from_lifetimes() -> None:
    now = 2 * DAY
    lifetimes = [
        (now - DAY - 3600.0, now - DAY + 1800.0),  # began before the window: half an hour in it
        (now - 7200.0, now - 3600.0),  # an hour, two hours ago
        (now - 600.0, None),  # still open, ten minutes
        (now - 3 * DAY, now - 2 * DAY),  # long gone
    ]
    load = LoadHistory.from_lifetimes(lifetimes, now=now)
    assert load.span == DAY
    assert load.arrivals == 2
    assert load.open_seconds == pytest.approx(1800 + 3600 + 600)
    assert load.recent_span == 6 * 3600.0
    assert load.recent_open_seconds == pytest.approx(3600 + 600)
    young = LoadHistory.from_lifetimes([(now - 600.0, None)], now=now, first_seen=now - 3600.0)
    assert young.span == 3600.0


# --------------------------------------------------------------------------- the simulation


def load_quota_sim() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "quota_sim.py"
    spec = importlib.util.spec_from_file_location("quota_sim", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("quota_sim", module)
    spec.loader.exec_module(module)
    return module


def test_a_simulated_starter_day_stays_within_the_quota() -> None:
    sim = load_quota_sim()
    batches = sim.make_batches(seed=11, days=1)
    day = (0.0, DAY)
    tracker = sim.simulate(batches, "starter", sim.tracker_policy(11), measured=day)
    assert tracker.overruns == 0
    assert tracker.batches == len(batches)  # every batch was seen finished
    assert tracker.quantile(0.95) < POLICY.max_interval
    # The same day polled every 60 s regardless of the quota runs into it many times over.
    naive = sim.simulate(batches, "starter", sim.fixed(60.0), measured=day, naive=True)
    assert naive.rejected_per_day > 1000


# --------------------------------------------------------------------------- with webhooks on


def test_webhooks_off_plans_exactly_as_before() -> None:
    for budget in (
        view(calls_left=300, releases=(40,) * 24),
        view(calls_left=40, open_batches=100, releases=(5,) * 24),
        view(calls_left=0, open_batches=10, releases=(0,) * 24),
    ):
        assert budget_interval(budget, webhook_share=0.0) == budget_interval(budget)
    budget = view(calls_left=300, releases=(40,) * 24)
    off = PollPolicy(min_interval=30, max_interval=900, webhook_share=0.0)
    for age in (60.0, MEDIAN, 10 * MEDIAN):
        rng = random.Random(7)
        got = [processing_delay(off, age=age, checks=3, budget=budget, rng=rng) for _ in range(200)]
        assert got == delays(budget, age)


@settings(max_examples=200, deadline=None)
@given(
    calls_left=st.integers(0, 1000),
    open_batches=st.integers(1, 500),
    arrivals=st.integers(0, 2000),
    open_hours=st.floats(0, 5000),
    span=st.floats(0, DAY),
    release=st.integers(0, 50),
    share=st.floats(0, 1),
)
def test_webhooks_never_poll_more_often_and_stay_within_the_ceiling(
    calls_left: int,
    open_batches: int,
    arrivals: int,
    open_hours: float,
    span: float,
    release: int,
    share: float,
) -> None:
    load = LoadHistory(span=span, arrivals=arrivals, open_seconds=open_hours * 3600.0)
    budget = view(calls_left, open_batches=open_batches, load=load, releases=(release,) * 24)
    alone = budget_interval(budget)
    hooked = budget_interval(budget, webhook_share=share)
    assert alone <= hooked <= min(schedule.MAX_WEBHOOK_STRETCH * alone, schedule.FORCED_CEILING)


def test_webhooks_plan_the_interval_polling_alone_would_have_chosen() -> None:
    # With webhooks, found batches close at once instead of about half an interval after
    # they finish. The plan must be the one polling alone makes on the load it would have
    # seen: each of `share` of the arrivals open half an interval longer.
    share = 0.9
    load = steady_load()
    budget = view(calls_left=300, releases=(40,) * 24, load=load)
    hooked = budget_interval(budget, webhook_share=share)
    polled_load = LoadHistory(
        span=load.span,
        arrivals=load.arrivals,
        open_seconds=load.open_seconds + share * load.arrivals * hooked / 2,
        recent_span=load.recent_span,
        recent_open_seconds=load.recent_open_seconds,
    )
    alone = budget_interval(view(calls_left=300, releases=(40,) * 24, load=polled_load))
    assert hooked == pytest.approx(alone)
    assert hooked > budget_interval(budget)


def test_the_webhook_stretch_grows_with_the_share_and_is_capped() -> None:
    budget = view(calls_left=300, releases=(40,) * 24)
    shares = [0.0, 0.25, 0.5, 0.9, 1.0]
    intervals = [budget_interval(budget, webhook_share=share) for share in shares]
    assert intervals == sorted(intervals) and len(set(intervals)) == len(intervals)
    # So many arrivals for so few calls that polling alone's extra open time would exceed
    # the budget: the stretch stops at its cap instead of diverging.
    scarce = view(calls_left=300, releases=(40,) * 24, load=steady_load(per_day=700))
    assert budget_interval(scarce, webhook_share=1.0) == pytest.approx(
        min(schedule.MAX_WEBHOOK_STRETCH * budget_interval(scarce), schedule.FORCED_CEILING)
    )


def test_the_burst_brake_is_not_stretched_by_webhooks() -> None:
    # The batches open now are open whatever the webhooks do: the hour's brake holds as is.
    budget = view(calls_left=40, open_batches=100, releases=(5,) * 24)
    assert budget_interval(budget, webhook_share=1.0) == budget_interval(budget)


def test_the_policy_passes_its_webhook_share_to_the_plan() -> None:
    budget = view(calls_left=300, releases=(40,) * 24)
    hooked = PollPolicy(min_interval=30, max_interval=3600, webhook_share=0.9)
    plain = PollPolicy(min_interval=30, max_interval=3600)
    for age in (60.0, MEDIAN, 5 * MEDIAN):
        longer = processing_delay(hooked, age=age, checks=3, budget=budget, rng=random.Random(3))
        shorter = processing_delay(plain, age=age, checks=3, budget=budget, rng=random.Random(3))
        assert longer > shorter
    # Without a budget there is nothing to save: the same geometric backoff.
    assert processing_delay(
        hooked, age=60.0, checks=3, budget=None, rng=random.Random(3)
    ) == processing_delay(plain, age=60.0, checks=3, budget=None, rng=random.Random(3))


@pytest.mark.parametrize("share", [-0.1, 1.5, math.nan, math.inf])
def test_a_webhook_share_outside_0_to_1_is_refused(share: float) -> None:
    with pytest.raises(ValueError, match="webhook_share"):
        PollPolicy(webhook_share=share)


def test_a_simulated_starter_day_with_webhooks_stays_within_the_quota() -> None:
    sim = load_quota_sim()
    batches = sim.make_batches(seed=11, days=1)
    day = (0.0, DAY)
    hooks = sim.make_webhooks(11, batches)
    run = sim.simulate(
        batches, "starter", sim.tracker_policy(11, sim.WEBHOOK_POLICY), measured=day, webhooks=hooks
    )
    assert run.overruns == 0
    assert run.batches == len(batches)
    assert len(run.arrived_delays) + len(run.lost_delays) == len(batches)
    assert len(run.lost_delays) == sum(hook is None for hook in hooks)
    # An arrived webhook's check comes at the next sweep tick, or min_interval after the
    # last check: never later than that after the webhook itself.
    assert max(run.arrived_delays) <= sim.WEBHOOK_CAP + POLICY.min_interval + sim.SWEEP_INTERVAL
