"""Quota economy: status calls against Deepvue's daily quota, on a virtual clock.

Each simulated day, 150 batches arrive at uniformly random times and take a lognormal time
to finish (median 20 minutes, sigma 1). Every status call goes through the real
`QuotaLedger` of the plan (per second, minute and sliding day), and the tracker's next
check comes from the real `processing_delay`, fed the same BudgetView the sweep would
build. Nothing sleeps: the clock is a number.

Three ways of polling, each on the same days:
- fixed 60 s: a generic sensor. It knows nothing of the quota: a call the plan would
  refuse is a 429, and it tries again at its next poll.
- best fixed: the sweep with a fixed interval, the shortest (5 s steps) for which the plan
  never has to hold back a call because the day's quota is spent. Found by search over the
  whole simulated run, so it knows the load in advance.
- tracker: the sweep with the budget-aware schedule.

One more row, for information, splits the tracker's result in two: its age shaping fed the
base interval chosen with hindsight (the shortest, in 5 s steps from the best fixed one,
with no quota overrun), instead of the interval it estimates from the trailing day. Its
ratio to the best fixed is what spending the calls by age buys; the rest of the gap
between the tracker and the best fixed is the price of not knowing the day's load.

The sweep is modelled as the daemon runs it: a batch is looked at on the first sweep tick
(every 5 s) at or after it is due; its first check is at insertion; a check the ledger
refuses waits until the ledger says a call fits. A check held back because the day window
was full is a quota overrun.

On the Starter steady scenario the tracker also runs with webhooks on, on the same days
and seeds: when a batch completes, its webhook arrives with probability WEBHOOK_ARRIVES
after an exponential delay (mean WEBHOOK_MEAN_DELAY, capped at WEBHOOK_CAP), else never;
it brings the next check forward to the next sweep tick, at most one early check per
min_interval, through the same ledger. Its rows: p95 delay of the batches whose webhook
arrived and of those whose webhook was lost (against polling alone), calls per batch and
quota overruns.

The measured day is the second of three days of the same load: the ledger already holds
the previous day's calls (as it does in production, where the window slides and survives
restarts), and batches keep arriving after it. The first day of a fresh install (empty
ledger, no history) is reported too, for information.

Run alone: `python bench/quota_sim.py [--quick]`; exit status 1 when a target is missed.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Figure, ratio_of, run_alone, say

from tracker.domain.model import PollPolicy
from tracker.domain.quota import PLANS, QuotaLedger, plan_windows
from tracker.domain.schedule import (
    BudgetView,
    LoadHistory,
    age_shaped_delay,
    processing_delay,
)

DAY = 86400.0
BATCHES_PER_DAY = 150
MEDIAN_DURATION = 20 * 60.0
DURATION_SIGMA = 1.0
SWEEP_INTERVAL = 5.0  # TRACKER_SWEEP_INTERVAL's default
NAIVE_INTERVAL = 60.0
SEARCH_STEP = 5.0
POLICY = PollPolicy()
# Webhooks: each arrives with this probability, after an exponential delay with this mean,
# capped at WEBHOOK_CAP; otherwise never. WEBHOOK_POLICY expects that share.
WEBHOOK_ARRIVES = 0.9
WEBHOOK_MEAN_DELAY = 6.0
WEBHOOK_CAP = 30.0
WEBHOOK_POLICY = PollPolicy(webhook_share=WEBHOOK_ARRIVES)

# next_delay(age, checks, budget_view) -> seconds; budget_view builds the view on demand.
NextDelay = Callable[[float, int, Callable[[], BudgetView]], float]


@dataclass(frozen=True)
class Batch:
    inserted: float
    duration: float

    @property
    def done_at(self) -> float:
        return self.inserted + self.duration


@dataclass(frozen=True)
class Scenario:
    name: str
    plan: str
    days: int
    measured_day: int

    @property
    def measured(self) -> tuple[float, float]:
        return self.measured_day * DAY, (self.measured_day + 1) * DAY


STEADY = Scenario("starter", "starter", days=3, measured_day=1)
FRESH = Scenario("starter, first day", "starter", days=1, measured_day=0)
ENTERPRISE = Scenario("enterprise", "enterprise", days=2, measured_day=1)


def make_webhooks(seed: int, batches: Sequence[Batch]) -> list[float | None]:
    """Per batch, when its webhook arrives (None: never), drawn from its own seeded stream."""
    rng = random.Random(f"webhooks {seed}")
    arrivals: list[float | None] = []
    for batch in batches:
        arrives = rng.random() < WEBHOOK_ARRIVES
        delay = min(rng.expovariate(1 / WEBHOOK_MEAN_DELAY), WEBHOOK_CAP)
        arrivals.append(batch.done_at + delay if arrives else None)
    return arrivals


def make_batches(seed: int, days: int) -> list[Batch]:
    rng = random.Random(seed)
    batches = [
        Batch(
            inserted=day * DAY + rng.uniform(0, DAY),
            duration=MEDIAN_DURATION * math.exp(rng.gauss(0, DURATION_SIGMA)),
        )
        for day in range(days)
        for _ in range(BATCHES_PER_DAY)
    ]
    return sorted(batches, key=lambda batch: batch.inserted)


@dataclass
class Run:
    """One policy on one simulated run; counts cover the measured day's batches."""

    delays: list[float] = field(default_factory=list)
    batches: int = 0
    calls: int = 0
    # Calls the plan refused that a quota-blind poller made anyway (429s), per day.
    rejected_per_day: float = 0.0
    # Checks held back because the day's quota was spent, over the whole run.
    overruns: int = 0
    # With webhooks: the detection delays of batches whose webhook arrived, and of the lost.
    arrived_delays: list[float] = field(default_factory=list)
    lost_delays: list[float] = field(default_factory=list)

    def add(self, other: Run) -> None:
        self.delays += other.delays
        self.arrived_delays += other.arrived_delays
        self.lost_delays += other.lost_delays
        self.batches += other.batches
        self.calls += other.calls
        self.rejected_per_day += other.rejected_per_day
        self.overruns += other.overruns

    @property
    def calls_per_batch(self) -> float:
        return self.calls / self.batches if self.batches else math.nan

    def quantile(self, q: float, delays: Sequence[float] | None = None) -> float:
        ordered = sorted(self.delays if delays is None else delays)
        if not ordered:
            return math.nan
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Load:
    """The trailing-day record the sweep would read from the store, kept incrementally."""

    def __init__(self) -> None:
        self.first_seen: float | None = None
        self.open: dict[int, float] = {}
        self.finished: deque[tuple[float, float | None]] = deque()

    def inserted(self, index: int, at: float) -> None:
        if self.first_seen is None:
            self.first_seen = at
        self.open[index] = at

    def stopped(self, index: int, at: float) -> None:
        self.finished.append((self.open.pop(index), at))

    def history(self, now: float) -> LoadHistory:
        while self.finished and (self.finished[0][1] or now) <= now - DAY:
            self.finished.popleft()
        lifetimes = itertools.chain(
            self.finished, ((inserted, None) for inserted in self.open.values())
        )
        return LoadHistory.from_lifetimes(lifetimes, now=now, first_seen=self.first_seen)


def simulate(
    batches: Sequence[Batch],
    plan: str,
    next_delay: NextDelay,
    *,
    measured: tuple[float, float],
    naive: bool = False,
    webhooks: Sequence[float | None] | None = None,
) -> Run:
    """Poll every batch until a status call sees it finished.

    `naive`: the poller ignores the quota; each refused call is a 429 and it polls again
    after its usual delay. Otherwise calls go through the sweep as described above.
    `webhooks`: per batch, when its webhook arrives (None: never). An arrived webhook
    brings the next check forward to the first sweep tick after it, but no sooner than
    min_interval after the batch's last check.
    """
    ledger = QuotaLedger(plan_windows(*PLANS[plan]))
    load = _Load()
    checks = [0] * len(batches)
    started = [False] * len(batches)
    run = Run()
    rejected = 0
    held_back: set[tuple[int, int]] = set()
    views: dict[tuple[float, int], BudgetView] = {}
    refused_until, day_full = -math.inf, False
    due = [(batch.inserted, index) for index, batch in enumerate(batches)]
    heapq.heapify(due)
    last = 0.0
    while due:
        at, index = heapq.heappop(due)
        now = at if naive else math.ceil(at / SWEEP_INTERVAL) * SWEEP_INTERVAL
        last = max(last, now)
        batch = batches[index]
        in_measure = measured[0] <= batch.inserted < measured[1]
        if not started[index]:
            started[index] = True
            load.inserted(index, batch.inserted)
        if now < refused_until:
            # Refused for sure: nothing frees up before then, and other calls only take room.
            wait = refused_until - now
        else:
            grant = ledger.reserve(now, 1)
            wait = grant.wait
            if not grant.granted:
                used, limit = ledger.used(now)["day"]
                refused_until, day_full = now + wait, used >= limit
        if now < refused_until:
            if naive:
                interval = next_delay(now - batch.inserted, checks[index], _no_view)
                missed = max(1, math.ceil(wait / interval))
                rejected += missed
                heapq.heappush(due, (now + missed * interval, index))
                continue
            if day_full:
                held_back.add((index, checks[index]))
            heapq.heappush(due, (now + max(wait, 0.01), index))
            continue
        if in_measure:
            run.calls += 1
        if now >= batch.done_at:
            load.stopped(index, now)
            if in_measure:
                run.delays.append(now - batch.done_at)
                run.batches += 1
                if webhooks is not None:
                    found = run.lost_delays if webhooks[index] is None else run.arrived_delays
                    found.append(now - batch.done_at)
            continue

        def view(now: float = now) -> BudgetView:
            # The sweep reads the budget and the load once per pass, not once per batch.
            key = (now, len(load.open))
            if key not in views:
                views.clear()
                views[key] = BudgetView.from_ledger(
                    ledger, now, open_batches=len(load.open), load=load.history(now)
                )
            return views[key]

        next_at = now + next_delay(now - batch.inserted, checks[index], view)
        checks[index] += 1
        hint = None if webhooks is None else webhooks[index]
        if hint is not None and hint >= now:
            tick = math.ceil(hint / SWEEP_INTERVAL) * SWEEP_INTERVAL
            next_at = min(next_at, max(tick, now + POLICY.min_interval))
        heapq.heappush(due, (next_at, index))
    run.overruns = len(held_back)
    run.rejected_per_day = rejected / max(last / DAY, 1.0)
    return run


def _no_view() -> BudgetView:
    raise AssertionError("a fixed interval needs no budget view")


def fixed(interval: float) -> NextDelay:
    return lambda age, checks, view: interval


def tracker_policy(seed: int, policy: PollPolicy = POLICY) -> NextDelay:
    rng = random.Random(seed)

    def next_delay(age: float, checks: int, view: Callable[[], BudgetView]) -> float:
        return processing_delay(policy, age=age, checks=checks, budget=view(), rng=rng)

    return next_delay


def hindsight_shaped(seed: int, interval: float, policy: PollPolicy = POLICY) -> NextDelay:
    """The tracker's age shaping around a given base interval instead of its own plan."""
    rng = random.Random(seed)

    def next_delay(age: float, checks: int, view: Callable[[], BudgetView]) -> float:
        load = view().load
        return age_shaped_delay(policy, age=age, interval=interval, load=load, rng=rng)

    return next_delay


def best_shaped_interval(
    batches: Sequence[Batch], scenario: Scenario, seed: int, start: float
) -> float:
    """The shortest base interval (to SEARCH_STEP) for the age shaping with no overrun.

    Searched from `start` (the best fixed interval: the shaping spends about as many calls)
    one step at a time, as the answer is rarely more than a few steps away.
    """

    def fits(interval: float) -> bool:
        policy = hindsight_shaped(seed, interval)
        return simulate(batches, scenario.plan, policy, measured=(0, 0)).overruns == 0

    interval = start
    if fits(interval):
        while interval - SEARCH_STEP >= SEARCH_STEP and fits(interval - SEARCH_STEP):
            interval -= SEARCH_STEP
        return interval
    interval += SEARCH_STEP
    while not fits(interval):
        interval += SEARCH_STEP
    return interval


def best_fixed_interval(batches: Sequence[Batch], scenario: Scenario) -> float:
    """The shortest interval (to SEARCH_STEP) that never runs into a spent day quota."""

    def fits(interval: float) -> bool:
        run = simulate(batches, scenario.plan, fixed(interval), measured=(0, 0))
        return run.overruns == 0

    # A first guess from the load: polling time over the calls left after first checks.
    limit = PLANS[scenario.plan][2]
    budget = max(limit * scenario.days - len(batches), 1)
    guess = sum(batch.duration for batch in batches) / budget
    high = max(guess * 1.25, SEARCH_STEP)
    while not fits(high):
        high *= 1.5
    low = max(guess * 0.8, SEARCH_STEP)
    while low > SEARCH_STEP and fits(low):
        low = max(low / 1.5, SEARCH_STEP)
    if fits(low):
        return low
    while high - low > SEARCH_STEP:
        middle = (low + high) / 2
        if fits(middle):
            high = middle
        else:
            low = middle
    return high


@dataclass
class Outcome:
    scenario: Scenario
    tracker: Run
    naive: Run
    best: Run | None
    best_intervals: list[float]
    # The age shaping at the hindsight base interval (see the module docstring).
    shaped: Run | None = None
    # The tracker with webhooks on, on the same batches; and the same webhooks with a
    # schedule not told to expect them (webhook_share 0), for information.
    webhooks: Run | None = None
    webhooks_unexpected: Run | None = None


def run_scenario(
    scenario: Scenario,
    seeds: Sequence[int],
    *,
    with_best: bool = True,
    with_webhooks: bool = False,
) -> Outcome:
    outcome = Outcome(
        scenario,
        Run(),
        Run(),
        Run() if with_best else None,
        [],
        Run() if with_best else None,
        Run() if with_webhooks else None,
        Run() if with_webhooks else None,
    )
    for seed in seeds:
        batches = make_batches(seed, scenario.days)
        measured = scenario.measured
        outcome.tracker.add(
            simulate(batches, scenario.plan, tracker_policy(seed), measured=measured)
        )
        if outcome.webhooks is not None and outcome.webhooks_unexpected is not None:
            hooks = make_webhooks(seed, batches)
            for into, policy in (
                (outcome.webhooks, WEBHOOK_POLICY),
                (outcome.webhooks_unexpected, POLICY),
            ):
                into.add(
                    simulate(
                        batches,
                        scenario.plan,
                        tracker_policy(seed, policy),
                        measured=measured,
                        webhooks=hooks,
                    )
                )
        outcome.naive.add(
            simulate(
                batches,
                scenario.plan,
                fixed(NAIVE_INTERVAL),
                measured=measured,
                naive=True,
            )
        )
        if outcome.best is not None and outcome.shaped is not None:
            interval = best_fixed_interval(batches, scenario)
            outcome.best_intervals.append(interval)
            outcome.best.add(simulate(batches, scenario.plan, fixed(interval), measured=measured))
            base = best_shaped_interval(batches, scenario, seed, start=interval)
            outcome.shaped.add(
                simulate(batches, scenario.plan, hindsight_shaped(seed, base), measured=measured)
            )
    return outcome


def _figure(
    name: str,
    value: float,
    baseline: float,
    unit: str,
    baseline_unit: str,
    target: str,
    met: bool | None,
    note: str = "",
) -> Figure:
    return Figure(
        name,
        value,
        baseline,
        unit,
        baseline_unit,
        ratio_of(value, baseline),
        target,
        met,
        note=note,
    )


def figures_for(outcome: Outcome, seeds: int) -> list[Figure]:
    label = outcome.scenario.name
    tracker, naive, best = outcome.tracker, outcome.naive, outcome.best
    per_seed = f"{seeds} seeds"
    # Zero overruns is a target on the measured day of every plan; the first day is info.
    overruns_counted = outcome.scenario is ENTERPRISE or outcome.scenario is STEADY
    rows = [
        _figure(
            f"{label}: quota overruns, tracker (vs fixed 60 s 429s/day)",
            tracker.overruns,
            naive.rejected_per_day / seeds,
            "",
            "",
            "= 0" if overruns_counted else "info",
            tracker.overruns == 0 if overruns_counted else None,
        )
    ]
    if outcome.scenario is ENTERPRISE:
        limit = POLICY.min_interval + 10
        rows.append(
            _figure(
                f"{label}: p95 detection delay, tracker (vs min interval + 10 s)",
                tracker.quantile(0.95),
                limit,
                "s",
                "s",
                "<= baseline",
                tracker.quantile(0.95) <= limit,
                note=f"p50 {tracker.quantile(0.5):.0f} s, {tracker.calls_per_batch:.1f} calls/batch, {per_seed}",
            )
        )
        return rows
    assert best is not None
    steady = outcome.scenario is STEADY
    if outcome.webhooks is not None and outcome.webhooks_unexpected is not None:
        rows += webhook_figures(label, tracker, outcome.webhooks, outcome.webhooks_unexpected)
    mean_interval = sum(outcome.best_intervals) / len(outcome.best_intervals)
    rows.append(
        _figure(
            f"{label}: p95 detection delay, tracker (vs best fixed)",
            tracker.quantile(0.95),
            best.quantile(0.95),
            "s",
            "s",
            "<= baseline" if steady else "info",
            tracker.quantile(0.95) <= best.quantile(0.95) if steady else None,
            note=f"best fixed interval {mean_interval:.0f} s on average, {per_seed}",
        )
    )
    rows.append(
        _figure(
            f"{label}: p50 detection delay, tracker (vs best fixed)",
            tracker.quantile(0.5),
            best.quantile(0.5),
            "s",
            "s",
            "info",
            None,
        )
    )
    if outcome.shaped is not None:
        shaped = outcome.shaped
        rows.append(
            _figure(
                f"{label}: p95 detection delay, age shaping at the hindsight interval (vs best fixed)",
                shaped.quantile(0.95),
                best.quantile(0.95),
                "s",
                "s",
                "info",
                None,
                note=f"p50 {shaped.quantile(0.5):.0f} s, {shaped.calls_per_batch:.2f} calls/batch: what spending by age buys when the day's load is known",
            )
        )
    rows.append(
        _figure(
            f"{label}: calls per batch, tracker (vs best fixed)",
            tracker.calls_per_batch,
            best.calls_per_batch,
            "",
            "",
            "info",
            None,
        )
    )
    rows.append(
        _figure(
            f"{label}: p95 detection delay, fixed 60 s (vs best fixed)",
            naive.quantile(0.95),
            best.quantile(0.95),
            "s",
            "s",
            "info",
            None,
            note=f"{naive.calls_per_batch:.1f} calls/batch answered, {naive.rejected_per_day / seeds:,.0f} 429s a day",
        )
    )
    return rows


def webhook_figures(label: str, polling: Run, hooked: Run, unexpected: Run) -> list[Figure]:
    """The tracker with webhooks on, against itself polling alone on the same batches.

    `unexpected` had the same webhooks but a schedule not told to expect them.
    """
    arrived = hooked.quantile(0.95, hooked.arrived_delays)
    lost = hooked.quantile(0.95, hooked.lost_delays)
    alone = polling.quantile(0.95)
    return [
        _figure(
            f"{label}: p95 detection delay, webhook arrived (vs webhook cap)",
            arrived,
            WEBHOOK_CAP,
            "s",
            "s",
            "<= baseline",
            arrived <= WEBHOOK_CAP,
            note=f"{len(hooked.arrived_delays)} batches; webhooks exponential, mean {WEBHOOK_MEAN_DELAY:g} s, capped at {WEBHOOK_CAP:g} s, {WEBHOOK_ARRIVES:.0%} arrive",
        ),
        _figure(
            f"{label}: p95 detection delay, webhook lost (vs polling alone)",
            lost,
            alone,
            "s",
            "s",
            "<= baseline",
            lost <= alone,
            note=f"{len(hooked.lost_delays)} batches",
        ),
        _figure(
            f"{label}: calls per batch, webhooks on (vs polling alone)",
            hooked.calls_per_batch,
            polling.calls_per_batch,
            "",
            "",
            "<= 2",
            hooked.calls_per_batch <= 2,
        ),
        _figure(
            f"{label}: calls per batch, webhooks on, schedule not told (vs webhooks on)",
            unexpected.calls_per_batch,
            hooked.calls_per_batch,
            "",
            "",
            "info",
            None,
            note=f"webhook_share 0: lost-webhook p95 {unexpected.quantile(0.95, unexpected.lost_delays):.0f} s; what the webhook-aware plan saves",
        ),
        _figure(
            f"{label}: quota overruns, webhooks on (vs polling alone)",
            hooked.overruns,
            polling.overruns,
            "",
            "",
            "= 0",
            hooked.overruns == 0,
        ),
    ]


def run(quick: bool) -> list[Figure]:
    """The quota-economy figures (several seeds; `quick` uses a few)."""
    seeds = list(range(2 if quick else 20))
    figures: list[Figure] = []
    for scenario, with_best, count in (
        (STEADY, True, len(seeds)),
        (FRESH, True, len(seeds)),
        (ENTERPRISE, False, 1 if quick else 3),
    ):
        started = time.monotonic()
        outcome = run_scenario(
            scenario, seeds[:count], with_best=with_best, with_webhooks=scenario is STEADY
        )
        say(f"quota: {scenario.name} done in {time.monotonic() - started:.1f} s")
        figures += figures_for(outcome, count)
    return figures


def main(argv: list[str]) -> int:
    return run_alone("quota_sim.py", run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
