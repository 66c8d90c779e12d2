"""When to look again at a batch Deepvue still reports in progress, given the call budget.

`processing_delay` spends the day's quota from the recent load, with brakes for bursts and
checks weighted towards the ages where batches finish; without a budget it falls back to
geometric backoff (`poll_delay`). Pure. The design and its formulas: docs/polling.md.
"""

from __future__ import annotations

import bisect
import functools
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from statistics import NormalDist

from tracker.domain.model import PollPolicy
from tracker.domain.quota import QuotaLedger, Window

__all__ = [
    "BudgetView",
    "LoadHistory",
    "age_shaped_delay",
    "budget_interval",
    "poll_delay",
    "processing_delay",
    "releases_per_slot",
]

# Share of the day's quota kept back from the plan, and the smaller share a burst may use:
# the difference is the buffer that lets a burst of inserts into a full window pass without
# stretching every open batch's interval.
RESERVE_SHARE = 0.05
BURST_RESERVE_SHARE = 0.01
# Plan for this much more load than the trailing day showed.
HEADROOM = 1.05
# How much of a busier recent spell counts as the load to plan for.
RECENT_WEIGHT = 0.9
# Rates estimated from less history than this are too noisy: divide by at least this.
MIN_HISTORY = 3 * 3600.0
# The horizon over which the batches open now must not exhaust the budget.
BURST_HORIZON = 3600.0
# Standard deviations of (Poisson) arrivals the next hour's budget is kept for.
ARRIVAL_SPREAD = 3.0
# The longest interval a shortage of budget may impose before the estimate is repeated.
FORCED_CEILING = 3600.0
JITTER = 0.05
# With webhooks on, the saved calls stretch the planned interval by at most this factor.
MAX_WEBHOOK_STRETCH = 2.0

# Completion-time shape (lognormal, sigma 1; see docs/polling.md, "The age"). The check weight is
# min(1, hazard / (SHAPE_CLIP * peak hazard)); SHAPE_STEP and SHAPE_SPAN (in medians) set
# the table it is read from. Beyond the table the last weight carries on: that far in the
# tail the hazard changes slowly and the interval is at max_interval anyway.
SHAPE_SIGMA = 1.0
SHAPE_CLIP = 0.6
SHAPE_STEP = 0.01
SHAPE_SPAN = 40.0

_NORMAL = NormalDist()


@dataclass(frozen=True)
class LoadHistory:
    """What the recent past says about the load (all within the day window).

    `span` is how much past the figures cover: one day window once the tracker has run
    that long, less on a fresh install. `open_seconds` adds up, over every batch, the time
    it spent unfinished (being polled) within the span; the `recent_*` pair does the same
    for the last few hours.
    """

    span: float
    arrivals: int
    open_seconds: float
    recent_span: float = 0.0
    recent_open_seconds: float = 0.0

    @classmethod
    def from_lifetimes(
        cls,
        lifetimes: Iterable[tuple[float, float | None]],
        *,
        now: float,
        window: float = 86400.0,
        recent: float = 6 * 3600.0,
        first_seen: float | None = None,
    ) -> LoadHistory:
        """Build it from (inserted_at, stopped_at or None if still open), epoch seconds.

        `first_seen` is when the tracker's history starts (its oldest batch); without it
        the oldest lifetime given is taken. Lifetimes wholly before the window are ignored.
        """
        since = now - window
        recent_since = now - recent
        arrivals = 0
        open_seconds = 0.0
        recent_open = 0.0
        oldest = math.inf
        for inserted, stopped in lifetimes:
            if inserted < oldest:
                oldest = inserted
            end = now if stopped is None or stopped > now else stopped
            if inserted > since:
                arrivals += 1
                open_seconds += max(0.0, end - inserted)
            else:
                open_seconds += max(0.0, end - since)
            if end > recent_since:
                recent_open += end - (inserted if inserted > recent_since else recent_since)
        start = first_seen if first_seen is not None else oldest
        span = min(window, max(0.0, now - start)) if math.isfinite(start) else 0.0
        return cls(
            span=span,
            arrivals=arrivals,
            open_seconds=open_seconds,
            recent_span=min(recent, span),
            recent_open_seconds=recent_open,
        )


@dataclass(frozen=True)
class BudgetView:
    """The call budget as the sweep sees it when it reschedules a batch."""

    calls_left: int  # calls still allowed in the day window right now (limit - used)
    day_limit: int
    open_batches: int  # unfinished batches competing for the budget (including this one)
    # Calls the day window gives back in each coming `slot` (soonest first); empty when
    # unknown, and then nothing is assumed to come back before a whole window has passed.
    releases: tuple[int, ...] = ()
    slot: float = 3600.0
    window: float = 86400.0
    load: LoadHistory | None = None

    @classmethod
    def from_ledger(
        cls,
        ledger: QuotaLedger,
        now: float,
        *,
        open_batches: int,
        load: LoadHistory | None,
        slot: float = 3600.0,
    ) -> BudgetView:
        """The view of a ledger's longest window (the day), e.g. a budget's snapshot."""
        day = max(ledger.windows, key=lambda window: window.seconds)
        buckets = ledger.usage.get(day.name, {})
        return cls(
            calls_left=max(day.limit - day.used(buckets, now), 0),
            day_limit=day.limit,
            open_batches=open_batches,
            releases=releases_per_slot(day, buckets, now, slot=slot),
            slot=slot,
            window=day.seconds,
            load=load,
        )

    def released_within(self, seconds: float) -> int:
        """Calls surely given back within `seconds` (a slot counts once it has ended)."""
        if seconds >= self.window:
            return self.day_limit - self.calls_left
        whole_slots = int(seconds // self.slot)
        return sum(self.releases[:whole_slots])


def releases_per_slot(
    window: Window, buckets: Mapping[int, int], now: float, *, slot: float = 3600.0
) -> tuple[int, ...]:
    """Per coming slot, how many counted calls stop counting in `window` (a ledger's view).

    Uses the same bucket arithmetic as the ledger: a bucket stops counting once the
    widened window has moved past its end.
    """
    slots = max(1, math.ceil((window.seconds + window.margin + window.bucket) / slot))
    released = [0] * slots
    first = window.first_counted_bucket(now)
    # A bucket stops counting at (bucket + 1) * width + seconds + margin; in slot units:
    scale = window.bucket / slot
    offset = (window.bucket + window.seconds + window.margin - now) / slot
    last = slots - 1
    for bucket, count in buckets.items():
        if bucket < first or count <= 0:
            continue
        index = math.floor(bucket * scale + offset)
        if index < 0:
            index = 0
        elif index > last:
            index = last
        released[index] += count
    return tuple(released)


def budget_interval(budget: BudgetView, *, webhook_share: float = 0.0) -> float:
    """The interval every open batch could be checked at within the budget.

    Steps 1-3 of docs/polling.md: the load, the rate and the brakes. With a `webhook_share`
    of the batches found by their webhook, the planned load is the one polling alone would
    have had: see "With webhooks on" there.
    """
    window = budget.window
    load = budget.load
    now_open = max(budget.open_batches, 1)
    if load is None:
        span, arrival_rate, busy = 0.0, 0.0, float(now_open)
    else:
        span = min(load.span, window)
        covered = max(span, MIN_HISTORY)
        arrival_rate = load.arrivals / covered
        busy = max(load.open_seconds / covered, 1.0)
        if load.recent_span >= MIN_HISTORY:
            busy = max(busy, RECENT_WEIGHT * load.recent_open_seconds / load.recent_span)
        # Young history says little: lean on what is open now until a day has been seen.
        trust = span / window
        busy = trust * busy + (1 - trust) * max(float(now_open), busy)

    reserve = RESERVE_SHARE * budget.day_limit
    burst_reserve = BURST_RESERVE_SHARE * budget.day_limit
    # (horizon, batches to serve, calls available over the horizon, whether the batches
    # are the planned load rather than those open now)
    horizons = [
        (
            window,
            HEADROOM * busy,
            budget.calls_left - reserve + budget.released_within(window),
            True,
        ),
        (
            BURST_HORIZON,
            float(now_open),
            budget.calls_left - burst_reserve + budget.released_within(BURST_HORIZON),
            False,
        ),
    ]
    if span < window:
        until_refill = max(window - span, BURST_HORIZON)
        horizons.append(
            (
                until_refill,
                HEADROOM * busy,
                budget.calls_left - reserve + budget.released_within(until_refill),
                True,
            )
        )
    interval = 0.0
    for horizon, batches, available, planned_load in horizons:
        # Arrivals are random: within an hour, allow for three standard deviations more.
        expected = arrival_rate * horizon
        arriving = expected + (
            ARRIVAL_SPREAD * math.sqrt(expected) if horizon <= BURST_HORIZON else 0.0
        )
        for_checks = available - arriving
        if for_checks <= 0:
            return FORCED_CEILING
        planned = batches * horizon / for_checks
        if planned_load:
            planned *= _webhook_stretch(webhook_share, expected, for_checks)
        interval = max(interval, planned)
    return min(interval, FORCED_CEILING)


def _webhook_stretch(share: float, arriving: float, for_checks: float) -> float:
    """How much longer the planned interval is when `share` of the batches need no polling
    once finished: polling alone keeps each open about half an interval longer.

    Solves T = T0 + HEADROOM * share * arriving * T / (2 * for_checks) for T / T0.
    """
    if not share > 0:
        return 1.0
    saved = HEADROOM * share * arriving / (2 * for_checks)
    return min(1 / max(1 - saved, 1 / MAX_WEBHOOK_STRETCH), MAX_WEBHOOK_STRETCH)


@dataclass(frozen=True)
class _Shape:
    """The check weight by age, in units of the median duration, and its running total."""

    weights: tuple[float, ...]  # per cell of SHAPE_STEP medians
    cumulative: tuple[float, ...]  # weight accumulated up to each cell boundary
    mean_weight: float  # over the ages of open batches (their density is the survival)
    peak_at: float  # where the hazard peaks, in medians

    def accumulated(self, x: float) -> float:
        """Weight accumulated from age 0 to `x` medians."""
        cells = len(self.weights)
        if x >= cells * SHAPE_STEP:
            return self.cumulative[cells] + (x - cells * SHAPE_STEP) * self.weights[-1]
        index = int(x / SHAPE_STEP)
        return self.cumulative[index] + (x - index * SHAPE_STEP) * self.weights[index]

    def age_reaching(self, total: float) -> float:
        """The age, in medians, at which the accumulated weight reaches `total`."""
        cells = len(self.weights)
        if total >= self.cumulative[cells]:
            return cells * SHAPE_STEP + (total - self.cumulative[cells]) / self.weights[-1]
        # cumulative[index - 1] < total <= cumulative[index]: inside cell index - 1.
        index = max(bisect.bisect_left(self.cumulative, total), 1)
        return (index - 1) * SHAPE_STEP + (total - self.cumulative[index - 1]) / self.weights[
            index - 1
        ]


def _hazard_and_survival(x: float) -> tuple[float, float]:
    z = math.log(x) / SHAPE_SIGMA
    survival = 1.0 - _NORMAL.cdf(z)
    if survival < 1e-12:
        # Far in the tail pdf / survival loses all precision; the hazard tends to z / (sigma x).
        return z / (x * SHAPE_SIGMA), survival
    return _NORMAL.pdf(z) / (x * SHAPE_SIGMA) / survival, survival


@functools.cache
def _shape() -> _Shape:
    """Tabulated once per process, at the first budget-aware check."""
    cells = round(SHAPE_SPAN / SHAPE_STEP)
    points = [_hazard_and_survival((i + 0.5) * SHAPE_STEP) for i in range(cells)]
    peak_index = max(range(cells), key=lambda i: points[i][0])
    threshold = SHAPE_CLIP * points[peak_index][0]
    weights = tuple(min(1.0, hazard / threshold) for hazard, _ in points)
    cumulative = [0.0]
    for weight in weights:
        cumulative.append(cumulative[-1] + weight * SHAPE_STEP)
    open_time = sum(survival for _, survival in points)
    weighted = sum(survival * weight for (_, survival), weight in zip(points, weights, strict=True))
    return _Shape(
        weights=weights,
        cumulative=tuple(cumulative),
        mean_weight=weighted / open_time,
        peak_at=(peak_index + 0.5) * SHAPE_STEP,
    )


def _typical_duration(load: LoadHistory | None) -> float | None:
    """The median duration the history suggests (mean time open / e^(sigma^2 / 2))."""
    if load is None or load.arrivals <= 0:
        return None
    median = load.open_seconds / load.arrivals / math.exp(SHAPE_SIGMA**2 / 2)
    # Under a second says nothing about durations (and would overflow the age scale).
    return median if median >= 1.0 else None


def _grown(start: float, factor: float, times: int, ceiling: float) -> float:
    """min(ceiling, start * factor ** times), without overflowing for any `times`."""
    if times <= 0 or factor <= 1 or not start < ceiling:
        return min(start, ceiling)
    # Past the steps that reach the ceiling, more growth would only overflow on the way.
    if start > 0 and times < math.log(ceiling / start) / math.log(factor):
        try:
            return min(ceiling, start * factor**times)
        except OverflowError:  # only with an infinite ceiling
            return ceiling
    return ceiling


def poll_delay(policy: PollPolicy, checks: int, rng: random.Random) -> float:
    """Geometric backoff from min to max with 'equal jitter'.

    Keeping half of the delay fixed means a batch is never looked at much sooner than
    planned; the random half spreads batches enqueued together across the window.
    """
    ceiling = _grown(policy.min_interval, policy.growth, checks, policy.max_interval)
    return max(policy.min_interval, ceiling / 2 + rng.uniform(0, ceiling / 2))


def processing_delay(
    policy: PollPolicy,
    *,
    age: float,
    checks: int,
    budget: BudgetView | None,
    rng: random.Random,
) -> float:
    """Seconds until the next check of a batch that is still processing at `age` seconds."""
    if budget is None:
        return poll_delay(policy, checks, rng)
    interval = budget_interval(budget, webhook_share=policy.webhook_share)
    return age_shaped_delay(policy, age=age, interval=interval, load=budget.load, rng=rng)


def age_shaped_delay(
    policy: PollPolicy,
    *,
    age: float,
    interval: float,
    load: LoadHistory | None,
    rng: random.Random,
) -> float:
    """Step 4 of docs/polling.md and the bounds: the next check at `age`, given the interval.

    Separate from `processing_delay` so that the quota simulation can measure the age
    shaping on its own, fed an interval chosen with hindsight.
    """
    median = _typical_duration(load)
    # Shaping by age moves calls between batches; with room for every batch at the
    # minimum interval there is nothing to move.
    if interval > policy.min_interval and median is not None:
        shape = _shape()
        # Past the table the weight is constant, so the interval no longer depends on the
        # age: clamping there keeps a huge (or infinite) age from losing all precision.
        x = min(age / median, len(shape.weights) * SHAPE_STEP) if age > 0 else 0.0
        target = shape.accumulated(x) + interval * shape.mean_weight / median
        # Only a shortage of budget may stretch an interval past max_interval, not the shape.
        ceiling = max(policy.max_interval, interval)
        interval = min((shape.age_reaching(target) - x) * median, ceiling)
    interval *= rng.uniform(1 - JITTER, 1 + JITTER)
    longest = max(policy.max_interval, min(interval, FORCED_CEILING))
    return min(max(interval, policy.min_interval), longest)
