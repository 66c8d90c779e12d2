"""The metrics endpoint over real loopback HTTP, parsed the way Prometheus parses it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import httpx
import prometheus_client
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tracker.domain.addresses import parse_listen_address
from tracker.domain.model import DownloadProblem
from tracker.domain.states import State
from tracker.metrics import Metrics, start_metrics_server

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _samples(exposition: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def _base_url(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"


async def _healthy() -> str | None:
    return None


def _serve(
    metrics: Metrics,
    client_work: Callable[[httpx.AsyncClient], Awaitable[None]],
    health: Callable[[], Awaitable[str | None]] = _healthy,
) -> None:
    async def main() -> None:
        runner = await start_metrics_server("127.0.0.1:0", metrics, health)
        try:
            async with httpx.AsyncClient(base_url=_base_url(runner), timeout=5.0) as client:
                await client_work(client)
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_scrape_reports_what_was_observed() -> None:
    metrics = Metrics()
    metrics.observe_status("processing")
    metrics.observe_status("processing")
    metrics.observe_status("ready")
    metrics.observe_transition("ready")
    metrics.observe_download(1000, 0.3)
    metrics.observe_download(2500, 700.0)
    metrics.set_batch_counts({"pending": 4, "downloaded": 7})
    metrics.set_quota({"second": (1, 1), "minute": (12, 30), "day": (1200, 1000)})
    metrics.set_oldest_unfinished_age(86.5)
    metrics.mark_sweep(1_700_000_000.25)
    scraped: list[httpx.Response] = []

    async def scrape(client: httpx.AsyncClient) -> None:
        scraped.append(await client.get("/metrics"))

    _serve(metrics, scrape)
    response = scraped[0]
    assert response.status_code == 200
    assert response.headers["content-type"] == prometheus_client.CONTENT_TYPE_LATEST
    samples = _samples(response.text)

    assert _value(samples, "tracker_status_calls_total", outcome="processing") == 2
    assert _value(samples, "tracker_status_calls_total", outcome="ready") == 1
    assert _value(samples, "tracker_transitions_total", to_state="ready") == 1
    assert _value(samples, "tracker_download_bytes_total") == 3500
    assert _value(samples, "tracker_download_seconds_count") == 2
    assert _value(samples, "tracker_download_seconds_sum") == pytest.approx(700.3)
    assert _value(samples, "tracker_download_seconds_bucket", le="0.5") == 1
    assert _value(samples, "tracker_download_seconds_bucket", le="600.0") == 1
    assert _value(samples, "tracker_download_seconds_bucket", le="1200.0") == 2
    assert _value(samples, "tracker_download_seconds_bucket", le="3600.0") == 2
    assert _value(samples, "tracker_download_seconds_bucket", le="+Inf") == 2
    assert {
        state.value: _value(samples, "tracker_batches", state=state.value) for state in State
    } == {state.value: 0 for state in State} | {"pending": 4, "downloaded": 7}
    assert _value(samples, "tracker_quota_used", window="minute") == 12
    assert _value(samples, "tracker_quota_left", window="minute") == 18
    assert _value(samples, "tracker_quota_left", window="second") == 0
    # Over the limit (another instance or a lowered plan) is "none left", never negative.
    assert _value(samples, "tracker_quota_used", window="day") == 1200
    assert _value(samples, "tracker_quota_left", window="day") == 0
    assert _value(samples, "tracker_oldest_unfinished_age_seconds") == 86.5
    assert _value(samples, "tracker_last_sweep_timestamp_seconds") == 1_700_000_000.25


def test_gauges_follow_the_latest_values() -> None:
    metrics = Metrics()
    metrics.set_batch_counts({"processing": 3, "failed": 1})
    metrics.set_batch_counts({"failed": 2})
    metrics.set_oldest_unfinished_age(12.0)
    metrics.set_oldest_unfinished_age(None)
    samples = _samples(metrics.render()[0].decode())
    assert _value(samples, "tracker_batches", state="processing") == 0
    assert _value(samples, "tracker_batches", state="failed") == 2
    assert _value(samples, "tracker_oldest_unfinished_age_seconds") == 0


def test_every_state_is_published_before_any_count() -> None:
    samples = _samples(Metrics().render()[0].decode())
    assert all(_value(samples, "tracker_batches", state=state.value) == 0 for state in State)


def test_unknown_state_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown state 'limbo'"):
        Metrics().set_batch_counts({"limbo": 1})


def test_instances_do_not_share_a_registry() -> None:
    first, second = Metrics(), Metrics()
    first.observe_transition("failed")
    samples = _samples(second.render()[0].decode())
    assert ("tracker_transitions_total", frozenset({("to_state", "failed")})) not in samples

    registry = prometheus_client.CollectorRegistry()
    Metrics(registry).observe_status("ready")
    assert registry.get_sample_value("tracker_status_calls_total", {"outcome": "ready"}) == 1


def test_healthz() -> None:
    problem: list[str | None] = [None]
    answers: list[httpx.Response] = []

    async def health() -> str | None:
        return problem[0]

    async def probe(client: httpx.AsyncClient) -> None:
        answers.append(await client.get("/healthz"))
        problem[0] = "no sweep for 120 s\n(last error: database is locked)"
        answers.append(await client.get("/healthz"))
        answers.append(await client.get("/nowhere"))

    _serve(Metrics(), probe, health)
    assert (answers[0].status_code, answers[0].text) == (200, "ok\n")
    assert (answers[1].status_code, answers[1].text) == (
        503,
        "no sweep for 120 s (last error: database is locked)\n",
    )
    assert answers[2].status_code == 404


def test_no_access_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    statuses: list[int] = []

    async def scrape(client: httpx.AsyncClient) -> None:
        statuses.append((await client.get("/metrics?secret=1")).status_code)

    _serve(Metrics(), scrape)
    assert statuses == [200]
    assert [r.getMessage() for r in caplog.records if r.name.startswith("aiohttp")] == []


def test_healthz_when_the_check_itself_crashes() -> None:
    answers: list[httpx.Response] = []

    async def broken() -> str | None:
        raise RuntimeError("engine disposed")

    async def probe(client: httpx.AsyncClient) -> None:
        answers.append(await client.get("/healthz"))

    _serve(Metrics(), probe, broken)
    assert answers[0].status_code == 503
    assert answers[0].text == "health check failed: RuntimeError: engine disposed\n"


def test_scrapes_see_updates_between_them() -> None:
    metrics = Metrics()
    values: list[float] = []

    async def scrape_twice(client: httpx.AsyncClient) -> None:
        for _ in range(2):
            metrics.observe_status("transient")
            samples = _samples((await client.get("/metrics")).text)
            values.append(_value(samples, "tracker_status_calls_total", outcome="transient"))

    _serve(metrics, scrape_twice)
    assert values == [1, 2]


def test_cleanup_stops_listening() -> None:
    async def main() -> None:
        runner = await start_metrics_server("127.0.0.1:0", Metrics(), _healthy)
        host, port = runner.addresses[0][:2]
        await runner.cleanup()
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient() as client:
                await client.get(f"http://{host}:{port}/metrics")

    asyncio.run(main())


def test_a_taken_port_raises_and_leaks_nothing() -> None:
    async def main() -> None:
        runner = await start_metrics_server("127.0.0.1:0", Metrics(), _healthy)
        try:
            host, port = runner.addresses[0][:2]
            with pytest.raises(OSError):
                await start_metrics_server(f"{host}:{port}", Metrics(), _healthy)
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_ipv6_loopback() -> None:
    async def main() -> None:
        try:
            runner = await start_metrics_server("[::1]:0", Metrics(), _healthy)
        except OSError as error:
            pytest.skip(f"no IPv6 loopback here: {error}")
        try:
            port = runner.addresses[0][1]
            async with httpx.AsyncClient() as client:
                response = await client.get(f"http://[::1]:{port}/healthz")
            assert response.text == "ok\n"
        finally:
            await runner.cleanup()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("[::1]:9464", ("::1", 9464)),
        ("[::]:9464", ("::", 9464)),
        ("localhost:9464", ("localhost", 9464)),
        ("metrics.internal.example:1", ("metrics.internal.example", 1)),
        (" 127.0.0.1:9464\n", ("127.0.0.1", 9464)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("127.0.0.1:65535", ("127.0.0.1", 65535)),
    ],
)
def test_parse_listen_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("9464", "expected HOST:PORT"),
        (":9464", "expected HOST:PORT"),
        ("", "expected HOST:PORT"),
        ("localhost", "expected HOST:PORT"),
        ("::1:9464", "in brackets"),
        ("[::1:9464", "unclosed"),
        ("[127.0.0.1]:9464", "not an IPv6 address"),
        ("[nope]:9464", "not an IPv6 address"),
        ("local host:9464", "not a host name"),
        ("-bad-:9464", "not a host name"),
        ("http://localhost:9464", "not a URL"),
        ("[::1]", "expected HOST:PORT"),
        ("localhost:", "port must be a number"),
        ("localhost:http", "port must be a number"),
        ("localhost:+9464", "port must be a number"),
        ("localhost:65536", "port must be a number"),
        ("localhost:-1", "port must be a number"),
        ("localhost:9464\n1", "port must be a number"),
    ],
)
def test_parse_listen_address_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse_listen_address(text)
    assert repr(text) in str(caught.value)


def test_histogram_buckets_reach_an_hour() -> None:
    metrics = Metrics()
    metrics.observe_download(1, 3599.0)
    samples = _samples(metrics.render()[0].decode())
    assert _value(samples, "tracker_download_seconds_bucket", le="1800.0") == 0
    assert _value(samples, "tracker_download_seconds_bucket", le="3600.0") == 1


def test_webhook_deliveries_are_counted_by_outcome() -> None:
    metrics = Metrics()
    for outcome in ("matched", "matched", "refused", "too_large"):
        metrics.observe_webhook(outcome)

    async def scrape(client: httpx.AsyncClient) -> None:
        samples = _samples((await client.get("/metrics")).text)
        name = "tracker_webhook_deliveries_total"
        assert _value(samples, name, outcome="matched") == 2
        assert _value(samples, name, outcome="refused") == 1
        assert _value(samples, name, outcome="too_large") == 1

    _serve(metrics, scrape)


def test_download_problems_are_published_at_zero_then_counted() -> None:
    metrics = Metrics()
    name = "tracker_download_problems_total"
    before = _samples(metrics.render()[0].decode())
    assert {
        problem.value: _value(before, name, problem=problem.value) for problem in DownloadProblem
    } == {problem.value: 0 for problem in DownloadProblem}
    metrics.observe_download_problem("interrupted")
    metrics.observe_download_problem("interrupted")
    metrics.observe_download_problem("url_expired")
    after = _samples(metrics.render()[0].decode())
    assert _value(after, name, problem="interrupted") == 2
    assert _value(after, name, problem="url_expired") == 1
    assert _value(after, name, problem="refused") == 0
