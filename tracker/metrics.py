"""Prometheus metrics and the small HTTP endpoint (/metrics, /healthz) that serves them.

The endpoint is an aiohttp.web app running inside the daemon's own event loop, so a scrape
reads the same objects the sweep updates without threads or locks. Each Metrics owns its
registry: nothing is registered globally, so tests and several instances never collide.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import prometheus_client
import structlog
from aiohttp import web

from tracker.domain.addresses import parse_listen_address
from tracker.domain.model import DownloadProblem
from tracker.domain.states import State, parse_state
from tracker.http_listener import start_listener

_log = structlog.get_logger(__name__)

# Downloads run from well under a second to the one-hour download deadline.
DOWNLOAD_SECONDS_BUCKETS: tuple[float, ...] = (
    0.1,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1200.0,
    1800.0,
    3600.0,
    float("inf"),
)


class Metrics:
    """The tracker's metrics; update them from the sweep, render them for a scrape."""

    def __init__(self, registry: prometheus_client.CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        self._status_calls = prometheus_client.Counter(
            "tracker_status_calls",
            "Deepvue status calls, by how the answer was classified.",
            ["outcome"],
            registry=self.registry,
        )
        self._transitions = prometheus_client.Counter(
            "tracker_transitions",
            "Changes of batch state recorded by this instance, by the state entered.",
            ["to_state"],
            registry=self.registry,
        )
        self._download_bytes = prometheus_client.Counter(
            "tracker_download_bytes",
            "Bytes of output files published by this instance.",
            registry=self.registry,
        )
        self._download_seconds = prometheus_client.Histogram(
            "tracker_download_seconds",
            "Time to fetch, verify and publish one output file.",
            buckets=DOWNLOAD_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self._download_problems = prometheus_client.Counter(
            "tracker_download_problems",
            "Downloads that did not complete, by what went wrong.",
            ["problem"],
            registry=self.registry,
        )
        self._batches = prometheus_client.Gauge(
            "tracker_batches",
            "Batches in the database, by state (all instances).",
            ["state"],
            registry=self.registry,
        )
        self._quota_used = prometheus_client.Gauge(
            "tracker_quota_used",
            "Status calls counted in each rate-limit window.",
            ["window"],
            registry=self.registry,
        )
        self._quota_left = prometheus_client.Gauge(
            "tracker_quota_left",
            "Status calls still allowed in each rate-limit window.",
            ["window"],
            registry=self.registry,
        )
        self._oldest_unfinished_age = prometheus_client.Gauge(
            "tracker_oldest_unfinished_age_seconds",
            "Age of the oldest batch not yet in a terminal state (0 when there is none).",
            registry=self.registry,
        )
        self._last_sweep = prometheus_client.Gauge(
            "tracker_last_sweep_timestamp_seconds",
            "Unix time at which this instance last completed a sweep.",
            registry=self.registry,
        )
        self._webhook_deliveries = prometheus_client.Counter(
            "tracker_webhook_deliveries",
            "Webhook deliveries received by this instance, by outcome: matched (brought a"
            " check forward), unmatched (nothing to bring forward: unknown, finished, or"
            " already brought forward within the poll min interval), refused (wrong secret),"
            " too_large, failed (database error, answered 503).",
            ["outcome"],
            registry=self.registry,
        )
        # Publish every state and every download problem from the first scrape, so a query
        # sees 0 rather than no data.
        self.set_batch_counts({})
        for problem in DownloadProblem:
            self._download_problems.labels(problem=problem.value)

    def observe_status(self, outcome: str) -> None:
        self._status_calls.labels(outcome=outcome).inc()

    def observe_transition(self, to_state: str) -> None:
        self._transitions.labels(to_state=to_state).inc()

    def observe_webhook(self, outcome: str) -> None:
        self._webhook_deliveries.labels(outcome=outcome).inc()

    def observe_download(self, size: int, seconds: float) -> None:
        self._download_bytes.inc(size)
        self._download_seconds.observe(seconds)

    def observe_download_problem(self, problem: str) -> None:
        self._download_problems.labels(problem=problem).inc()

    def set_batch_counts(self, counts: Mapping[str, int]) -> None:
        """Counts by state; a state missing from `counts` has no batches. Unknown states raise."""
        known = {parse_state(state): count for state, count in counts.items()}
        for state in State:
            self._batches.labels(state=state.value).set(known.get(state, 0))

    def set_quota(self, usage: Mapping[str, tuple[int, int]]) -> None:
        """`usage` maps a window name ("second", "minute", "day") to (used, limit)."""
        for window, (used, limit) in usage.items():
            self._quota_used.labels(window=window).set(used)
            self._quota_left.labels(window=window).set(max(limit - used, 0))

    def set_oldest_unfinished_age(self, seconds: float | None) -> None:
        self._oldest_unfinished_age.set(0.0 if seconds is None else seconds)

    def mark_sweep(self, timestamp: float) -> None:
        self._last_sweep.set(timestamp)

    def render(self) -> tuple[bytes, str]:
        body = prometheus_client.generate_latest(self.registry)
        return body, prometheus_client.CONTENT_TYPE_LATEST


async def start_metrics_server(
    address: str,
    metrics: Metrics,
    health: Callable[[], Awaitable[str | None]],
) -> web.AppRunner:
    """Serve GET /metrics and GET /healthz on `address`; stop it with `await runner.cleanup()`.

    `health` returns None when all is well, else a one-line description of the problem,
    which /healthz answers with status 503. Port 0 picks a free port: read it from
    `runner.addresses`.
    """
    host, port = parse_listen_address(address)

    async def serve_metrics(_request: web.Request) -> web.Response:
        body, content_type = metrics.render()
        # aiohttp refuses a charset inside content_type, so hand the header over whole.
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def serve_health(_request: web.Request) -> web.Response:
        try:
            problem = await health()
        except Exception as error:
            # A probe that crashes is itself a problem worth reporting, not a 500 page.
            problem = f"health check failed: {type(error).__name__}: {error}"
        if problem is None:
            return web.Response(text="ok\n")
        return web.Response(status=503, text=" ".join(problem.splitlines()) + "\n")

    app = web.Application()
    app.router.add_get("/metrics", serve_metrics)
    app.router.add_get("/healthz", serve_health)
    return await start_listener(app, host, port, event="metrics.listening")
