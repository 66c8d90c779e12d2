"""What the simulator remembers between requests, and what its /_sim/stats report."""

from __future__ import annotations

import json
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

from tracker.simulator.config import SimulatorConfig
from tracker.simulator.ratelimit import RateLimiter

# Downloads are recorded for tests; a benchmark may make millions, so keep only the newest.
_MAX_RECORDED_DOWNLOADS: Final = 10_000


@dataclass
class IdState:
    first_call: float | None = None
    dispatched: int = 0
    urls_issued: int = 0
    downloads: int = 0


class SimulatorState:
    """Per-id progress, the seeded fault sequence, the rate limits and the counters, shared
    by the API and the file host; `reset` (POST /_sim/reset) starts them all afresh."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.generation = 0
        self.reset()

    def reset(self) -> None:
        cfg = self.config
        self.rng = random.Random(cfg.seed)
        limits = [
            (window, limit)
            for window, limit in (
                (1.0, cfg.rate_per_second),
                (60.0, cfg.rate_per_minute),
                (86400.0, cfg.rate_per_day),
            )
            if limit is not None
        ]
        self.limiter = RateLimiter(limits)
        self._ids: dict[str, IdState] = {}
        self.authorize_calls = 0
        self.status_calls: dict[str, int] = {}
        self.status_calls_total = 0
        self.rate_limited = 0
        self.errors_served = 0
        self.downloads: deque[dict[str, Any]] = deque(maxlen=_MAX_RECORDED_DOWNLOADS)
        self.submissions = 0
        self.redirects_served = 0
        # Status calls being answered right now, per request_id. A call remembers the
        # generation it started in, so that one still in flight across a reset does not
        # uncount a call of the new generation.
        self.generation += 1
        self.in_flight: dict[str, int] = {}
        self.overlapping_status_calls = 0
        self.overlapping_by_id: dict[str, int] = {}

    def snapshot(self) -> dict[str, Any]:
        stats = {
            "authorize_calls": self.authorize_calls,
            "status_calls": self.status_calls,
            "status_calls_total": self.status_calls_total,
            "rate_limited": self.rate_limited,
            "errors_served": self.errors_served,
            "downloads": list(self.downloads),
            "submissions": self.submissions,
            "redirects_served": self.redirects_served,
            "overlapping_status_calls": self.overlapping_status_calls,
            "overlapping_by_id": self.overlapping_by_id,
        }
        # A deep, JSON-identical copy: callers on other threads must not see later mutation.
        result: dict[str, Any] = json.loads(json.dumps(stats))
        return result

    def of(self, request_id: str) -> IdState:
        state = self._ids.get(request_id)
        if state is None:
            state = self._ids[request_id] = IdState()
        return state
