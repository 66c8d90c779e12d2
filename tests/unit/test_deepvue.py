"""The Deepvue client against a fake Deepvue at the transport seam (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import itertools
import json
import math
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from tests.fake_deepvue import FakeDeepvue, completed
from tracker import __version__
from tracker.budget import CallsPaused, MemoryBudget, Throttle
from tracker.deepvue import (
    MAX_ANSWER_BYTES,
    AuthFailed,
    DeepvueClient,
    SubmitFailed,
    make_api_http_client,
    make_api_transport,
    parse_token_expiry,
)
from tracker.domain.answers import Outcome, StatusAnswer
from tracker.domain.quota import PLANS, Window, plan_windows

BASE = "https://deepvue.test"
CLIENT_ID = "client-123"
SECRET = "s3cret-value-do-not-leak"
T0 = datetime(2026, 3, 7, 12, 0, 0, tzinfo=UTC)
OUTPUT_URL = "https://bulk-data-processing.s3.ap-south-1.amazonaws.com/x/req1.csv"


def jwt_with_exp(exp: float, sub: str = CLIENT_ID) -> str:
    def seg(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{seg({'alg': 'HS256', 'typ': 'JWT'})}.{seg({'sub': sub, 'exp': exp})}.c2ln"


def completed_body(request_id: str) -> dict[str, Any]:
    body: dict[str, Any] = completed(request_id, OUTPUT_URL).json()
    return body


def new_fake() -> FakeDeepvue:
    """The fake Deepvue of these tests: every batch complete, tokens expiring a day after T0."""
    return FakeDeepvue(
        default_status=lambda request_id: completed(request_id, OUTPUT_URL),
        expiry="2026-03-08T12:00:00Z",
    )


class FakeClock:
    """Monotonic time that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class Harness:
    # Status calls go through the http client, or (as in the daemon) straight to its
    # transport; the status_path fixture runs every test of this module both ways.
    direct = False

    def __init__(
        self,
        fake: FakeDeepvue,
        *,
        windows: list[Window] | None = None,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        self.fake = fake
        self.clock = FakeClock()
        self.utc = T0
        self.secrets: list[str | OSError] = [SECRET]
        self.secret_reads = 0
        transport = fake.transport()
        self.http = httpx.AsyncClient(transport=transport)
        self.budget = MemoryBudget(
            windows or plan_windows(1000, 100000, 1000000), clock=self.clock.monotonic
        )
        self.throttle = Throttle(
            self.budget,
            monotonic=self.clock.monotonic,
            sleep=self.clock.sleep,
        )
        self.client = DeepvueClient(
            self.http,
            base_url=BASE + "/",
            client_id=CLIENT_ID,
            read_secret=self.read_secret,
            throttle=self.throttle,
            utcnow=lambda: self.utc,
            status_transport=transport if self.direct else None,
            **(client_options or {}),
        )

    def read_secret(self) -> str:
        """Like reading a mounted secret file: trailing newline, may be rotated or missing."""
        self.secret_reads += 1
        secret = self.secrets[min(self.secret_reads, len(self.secrets)) - 1]
        if isinstance(secret, OSError):
            raise secret
        return secret + "\n"


@pytest.fixture(autouse=True, params=["through the client", "straight to the transport"])
def status_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Harness, "direct", request.param == "straight to the transport")


def run(
    body: Callable[[Harness], Awaitable[None]],
    fake: FakeDeepvue | None = None,
    *,
    windows: list[Window] | None = None,
    client_options: dict[str, Any] | None = None,
) -> Harness:
    """Build the harness inside a fresh event loop, run `body`, close the http client."""
    fake = fake or new_fake()

    async def main() -> Harness:
        harness = Harness(fake, windows=windows, client_options=client_options)
        try:
            await body(harness)
        finally:
            await harness.client.aclose()
            await harness.http.aclose()
        return harness

    return asyncio.run(main())


# -- authorize and the token cache -------------------------------------------------------------


def test_status_call_sends_documented_request_and_classifies() -> None:
    answers: list[StatusAnswer] = []

    async def body(h: Harness) -> None:
        answers.append(await h.client.batch_status("req1"))

    h = run(body)
    assert answers[0].outcome is Outcome.COMPLETED
    assert answers[0].output_url == OUTPUT_URL
    assert h.fake.authorize_forms == [{"client_id": [CLIENT_ID], "client_secret": [SECRET]}]
    (request,) = h.fake.status_requests
    assert request.method == "GET"
    assert str(request.url) == f"{BASE}/v1/verification/batch-processing-status?request_id=req1"
    assert request.headers["authorization"] == "Bearer token-1"
    assert request.headers["x-api-key"] == SECRET
    assert request.headers["user-agent"] == f"deepvue-batch-tracker/{__version__}"


def test_request_id_is_sent_percent_encoded_as_one_query_value() -> None:
    async def body(h: Harness) -> None:
        await h.client.batch_status("a b&c=d/é")

    h = run(body)
    (request,) = h.fake.status_requests
    assert request.url.raw_path.endswith(b"?request_id=a%20b%26c%3Dd%2F%C3%A9")
    assert request.url.params["request_id"] == "a b&c=d/é"


def test_token_is_cached_across_calls() -> None:
    async def body(h: Harness) -> None:
        for i in range(5):
            h.utc = T0 + timedelta(hours=i)
            assert (await h.client.batch_status(f"req{i}")).outcome is Outcome.COMPLETED

    h = run(body)
    assert h.fake.authorizations == 1
    assert h.secret_reads == 1
    assert {r.headers["authorization"] for r in h.fake.status_requests} == {"Bearer token-1"}


def test_token_refreshed_before_expiry_and_secret_reread() -> None:
    fake = new_fake()
    fake.expiry = (T0 + timedelta(hours=1)).isoformat()

    async def body(h: Harness) -> None:
        h.secrets = [SECRET, "rotated-secret"]
        await h.client.batch_status("a")
        h.utc = T0 + timedelta(minutes=54)  # 6 min before expiry: outside the 5 min margin
        await h.client.batch_status("b")
        assert h.fake.authorizations == 1
        h.utc = T0 + timedelta(minutes=55, seconds=1)
        fake.expiry = (h.utc + timedelta(hours=24)).isoformat()
        await h.client.batch_status("c")

    h = run(body, fake)
    assert fake.authorizations == 2
    assert h.secret_reads == 2
    assert fake.authorize_forms[1]["client_secret"] == ["rotated-secret"]
    last = fake.status_requests[-1]
    assert last.headers["authorization"] == "Bearer token-2"
    assert last.headers["x-api-key"] == "rotated-secret"


def test_unparseable_expiry_falls_back_to_the_jwt_exp() -> None:
    fake = new_fake()
    token = jwt_with_exp((T0 + timedelta(hours=2)).timestamp())

    def authorize(request: httpx.Request) -> httpx.Response:
        fake.valid = {token}
        return httpx.Response(200, json={"access_token": token, "expiry": "24hrs"})

    fake.authorize_override = authorize

    async def body(h: Harness) -> None:
        await h.client.batch_status("a")
        h.utc = T0 + timedelta(hours=1, minutes=54)
        await h.client.batch_status("b")
        assert fake.authorizations == 1
        h.utc = T0 + timedelta(hours=1, minutes=56)  # inside the margin before exp
        await h.client.batch_status("c")

    run(body, fake)
    assert fake.authorizations == 2


def test_parse_token_expiry() -> None:
    assert parse_token_expiry("2026-03-08T00:00:00Z", "x", T0) == datetime(2026, 3, 8, tzinfo=UTC)
    assert parse_token_expiry("2026-03-08T05:30:00+05:30", "x", T0) == datetime(
        2026, 3, 8, tzinfo=UTC
    )
    naive = parse_token_expiry("2026-03-08T00:00:00", "x", T0)
    assert naive == datetime(2026, 3, 8, tzinfo=UTC)
    assert naive.tzinfo is not None
    exp = (T0 + timedelta(hours=24)).timestamp()
    assert parse_token_expiry("24hrs", jwt_with_exp(exp), T0) == T0 + timedelta(hours=24)
    assert parse_token_expiry(None, jwt_with_exp(exp), T0) == T0 + timedelta(hours=24)
    assert parse_token_expiry("24hrs", "opaque-token", T0) == T0 + timedelta(hours=23)
    assert parse_token_expiry(86400, "a.!!!.c", T0) == T0 + timedelta(hours=23)
    assert parse_token_expiry("x", jwt_with_exp(1e300), T0) == T0 + timedelta(hours=23)
    assert parse_token_expiry("x", "a.bm90IGpzb24.c", T0) == T0 + timedelta(hours=23)


def test_expiry_in_the_past_does_not_cause_an_authorize_storm() -> None:
    fake = new_fake()
    fake.expiry = (T0 - timedelta(hours=5, minutes=30)).replace(tzinfo=None).isoformat()

    async def body(h: Harness) -> None:
        for _ in range(5):
            assert (await h.client.batch_status("a")).outcome is Outcome.COMPLETED

    run(body, fake)
    assert fake.authorizations == 1


# -- 401 / 403 ---------------------------------------------------------------------------------


def test_401_reauthorizes_once_and_retries() -> None:
    answers: list[StatusAnswer] = []

    async def body(h: Harness) -> None:
        await h.client.batch_status("warm")
        h.fake.valid = {"token-2"}  # the server dropped token-1 early
        answers.append(await h.client.batch_status("req1"))

    h = run(body)
    assert answers[0].outcome is Outcome.COMPLETED
    assert h.fake.authorizations == 2
    assert h.secret_reads == 2
    assert [r.headers["authorization"] for r in h.fake.status_requests] == [
        "Bearer token-1",
        "Bearer token-1",
        "Bearer token-2",
    ]
    # The retry acquired the throttle too.
    assert h.budget.ledger.used(h.clock.now)["day"] == (3, 1000000)


def test_persistent_401_raises_auth_failed_without_secrets() -> None:
    fake = new_fake()
    fake.reject_all_tokens = True
    raised: list[AuthFailed] = []

    async def body(h: Harness) -> None:
        with pytest.raises(AuthFailed) as info:
            await h.client.batch_status("req1")
        raised.append(info.value)

    with capture_logs() as logs:
        run(body, fake)
    message = str(raised[0])
    assert f"client_id={CLIENT_ID}" in message
    assert "Deepvue refused the credentials" in message
    assert SECRET not in message
    assert "token-" not in message
    assert fake.authorizations == 2
    assert len(fake.status_requests) == 2
    # The caller reports the service-wide failure; the client only raises.
    assert "api.auth_failed" not in [e["event"] for e in logs]
    assert SECRET not in repr(logs)


def test_persistent_403_raises_auth_failed() -> None:
    fake = new_fake()
    fake.status_override = lambda request: httpx.Response(403, json={"detail": "Not a valid token"})

    async def body(h: Harness) -> None:
        with pytest.raises(AuthFailed, match="HTTP 403"):
            await h.client.batch_status("req1")

    run(body, fake)
    assert fake.authorizations == 2


@pytest.mark.parametrize("status", [400, 401, 403])
def test_authorize_refused_raises_auth_failed(status: int) -> None:
    fake = new_fake()
    fake.authorize_override = lambda request: httpx.Response(
        status, json={"detail": f"Invalid client_id or client_secret {SECRET}, access Denied"}
    )

    async def body(h: Harness) -> None:
        with pytest.raises(AuthFailed) as info:
            await h.client.batch_status("req1")
        message = str(info.value)
        assert message.startswith(f"Deepvue refused the credentials for client_id={CLIENT_ID}: ")
        assert "access Denied" in message
        assert SECRET not in message

    run(body, fake)
    assert fake.status_requests == []


def test_unreadable_or_empty_secret_raises_auth_failed() -> None:
    async def body(h: Harness) -> None:
        h.secrets = [
            FileNotFoundError(2, "No such file or directory", "/run/secrets/deepvue"),
            "  ",
        ]
        with pytest.raises(AuthFailed, match="could not read the client secret"):
            await h.client.batch_status("req1")
        with pytest.raises(AuthFailed, match="is empty"):
            await h.client.batch_status("req1")

    h = run(body)
    assert h.fake.authorizations == 0


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(503, json={"detail": "Source Unavailable"}),
        httpx.Response(200, text="<html>oops</html>"),
        httpx.Response(200, json={"token_type": "bearer"}),
    ],
)
def test_authorize_server_trouble_is_transient(response: httpx.Response) -> None:
    fake = new_fake()
    fake.authorize_override = lambda request: response
    answers: list[StatusAnswer] = []

    async def body(h: Harness) -> None:
        answers.append(await h.client.batch_status("req1"))

    run(body, fake)
    assert answers[0].outcome is Outcome.TRANSIENT
    assert answers[0].http_status == response.status_code
    assert answers[0].detail is not None
    assert "authorize answered" in answers[0].detail
    assert fake.status_requests == []


def test_authorize_timeout_is_transient_and_retried_next_call() -> None:
    fake = new_fake()

    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out", request=request)

    fake.authorize_override = timeout
    answers: list[StatusAnswer] = []

    async def body(h: Harness) -> None:
        answers.append(await h.client.batch_status("req1"))
        fake.authorize_override = None
        answers.append(await h.client.batch_status("req1"))

    run(body, fake)
    assert answers[0].outcome is Outcome.TRANSIENT
    assert answers[0].http_status is None
    assert answers[1].outcome is Outcome.COMPLETED


def test_twenty_concurrent_401s_cause_one_reauthorize() -> None:
    fake = new_fake()
    answers: list[StatusAnswer] = []

    async def body(h: Harness) -> None:
        await h.client.batch_status("warm")
        fake.valid = set()  # every in-flight call now gets 401 with token-1
        answers.extend(await asyncio.gather(*(h.client.batch_status(f"req{i}") for i in range(20))))

    run(body, fake)
    assert fake.authorizations == 2  # the warm-up one and ONE re-authorize
    assert all(a.outcome is Outcome.COMPLETED for a in answers)
    assert len(answers) == 20
    retried = [r for r in fake.status_requests if r.headers["authorization"] == "Bearer token-2"]
    assert len(retried) == 20


def test_twenty_concurrent_first_calls_authorize_once() -> None:
    async def body(h: Harness) -> None:
        await asyncio.gather(*(h.client.batch_status(f"req{i}") for i in range(20)))

    h = run(body)
    assert h.fake.authorizations == 1


def test_twenty_concurrent_calls_with_refused_credentials_authorize_once() -> None:
    fake = new_fake()
    fake.authorize_override = lambda request: httpx.Response(401, json={"detail": "Denied"})
    results: list[Any] = []

    async def body(h: Harness) -> None:
        results.extend(
            await asyncio.gather(
                *(h.client.batch_status(f"req{i}") for i in range(20)), return_exceptions=True
            )
        )

    run(body, fake)
    assert fake.authorizations == 1
    assert all(isinstance(r, AuthFailed) for r in results)


# -- 429 and the throttle ----------------------------------------------------------------------


def test_429_with_retry_after_pauses_the_throttle() -> None:
    fake = new_fake()
    fake.status_override = lambda request: httpx.Response(
        429, json={"detail": "Rate limit exceeded."}, headers={"Retry-After": "4"}
    )
    answers: list[StatusAnswer] = []
    capacity: list[int] = []

    async def body(h: Harness) -> None:
        with capture_logs() as logs:
            answers.append(await h.client.batch_status("req1"))
        assert [e["event"] for e in logs if e["event"].startswith("api.r")] == ["api.rate_limited"]
        capacity.append(await h.throttle.reserve(5))
        assert h.throttle.paused_for() == pytest.approx(4.0)
        assert h.throttle.wait_time() == pytest.approx(4.0)
        fake.status_override = None
        answers.append(await h.client.batch_status("req1"))

    h = run(body, fake)
    assert answers[0].outcome is Outcome.RATE_LIMITED
    assert answers[0].retry_after == 4.0
    assert capacity == [0]
    # Within the longest wait (5 s by default), the next call sleeps out the pause.
    assert h.clock.sleeps == [pytest.approx(4.0)]
    assert answers[1].outcome is Outcome.COMPLETED


def test_429_without_retry_after_backs_off_growing() -> None:
    fake = new_fake()
    fake.status_override = lambda request: httpx.Response(429, json={"detail": "slow down"})
    pauses: list[float] = []

    async def body(h: Harness) -> None:
        for _ in range(7):
            answer = await h.client.batch_status("req1")
            assert answer.outcome is Outcome.RATE_LIMITED
            pauses.append(h.throttle.paused_for())
            if pauses[-1] > h.throttle.longest_wait:
                # Too long to sleep through: the caller is told, and comes back later.
                with pytest.raises(CallsPaused):
                    await h.client.batch_status("req1")
                h.clock.now += pauses[-1]

    h = run(body, fake)
    assert 1.0 <= pauses[0] <= 2.0
    assert 2.0 <= pauses[1] <= 4.0
    assert 4.0 <= pauses[2] <= 8.0
    assert all(p <= 60.0 for p in pauses)
    assert pauses[6] >= 30.0
    # Each call after the first waited for the pause, asleep when it was short.
    assert h.clock.sleeps == [pytest.approx(p) for p in pauses[:6] if p <= 5.0]
    assert len(h.fake.status_requests) == 7


def test_throttle_honours_pause_and_never_shortens_it() -> None:
    clock = FakeClock()

    async def main() -> None:
        budget = MemoryBudget(plan_windows(10, 100, 1000), clock=clock.monotonic)
        throttle = Throttle(budget, monotonic=clock.monotonic, sleep=clock.sleep)
        await throttle.pause(5.0)
        await throttle.pause(2.0)  # a shorter pause must not cut the longer one
        await throttle.pause(float("nan"))
        assert throttle.paused_for() == pytest.approx(5.0)
        assert await throttle.reserve(3) == 0
        start = clock.now
        await throttle.acquire()
        assert clock.now - start == pytest.approx(5.0)
        assert await throttle.usage() == {"second": (1, 10), "minute": (1, 100), "day": (1, 1000)}
        # The pause reached the shared budget too, so other processes honour it.
        assert budget.ledger.paused_until == pytest.approx(start + 5.0)

    asyncio.run(main())


def test_throttle_spaces_concurrent_calls_by_the_quota() -> None:
    clock = FakeClock()
    started: list[float] = []

    async def main() -> None:
        budget = MemoryBudget(plan_windows(*PLANS["starter"]), clock=clock.monotonic)
        throttle = Throttle(budget, monotonic=clock.monotonic, sleep=clock.sleep)

        async def call() -> None:
            await throttle.acquire()
            started.append(clock.now)

        await asyncio.gather(*(call() for _ in range(4)))

    asyncio.run(main())
    # One per second as the starter plan allows, plus the safety margin; never two at once.
    gaps = [b - a for a, b in itertools.pairwise(sorted(started))]
    assert all(1.0 <= gap <= 1.4 for gap in gaps), gaps


def test_reserved_permits_are_used_or_given_back() -> None:
    clock = FakeClock()

    async def main() -> None:
        budget = MemoryBudget(plan_windows(5, 100, 1000), clock=clock.monotonic)
        throttle = Throttle(budget, monotonic=clock.monotonic, sleep=clock.sleep, permit_ttl=0.1)
        assert await throttle.reserve(8) == 5  # the per-second window caps it
        await throttle.acquire()
        await throttle.acquire()
        assert clock.sleeps == []  # pooled permits need no wait
        await throttle.give_back(3)  # the claim found fewer batches than reserved
        assert (await throttle.usage())["second"] == (2, 5)
        assert await throttle.reserve(2) == 2
        clock.now += 0.5  # too old to use now: given back, a fresh one reserved
        await throttle.acquire()
        assert (await throttle.usage())["second"] == (3, 5)

    asyncio.run(main())


def test_status_calls_wait_for_the_quota() -> None:
    async def body(h: Harness) -> None:
        for i in range(3):
            await h.client.batch_status(f"req{i}")

    h = run(body, windows=[Window("w", 1, 2.0, 0.1)])
    assert len(h.clock.sleeps) == 2
    assert all(2.0 <= pause <= 2.2 for pause in h.clock.sleeps)


# -- transient answers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(500, json={"detail": "Internal Server Error"}),
        httpx.Response(502, text="<html>bad gateway</html>"),
        httpx.Response(503, json={"detail": "Source Unavailable"}),
        httpx.Response(200, text="not json at all"),
        httpx.Response(200, json={"code": 200, "message": "ok"}),
        httpx.Response(302, headers={"Location": "https://elsewhere.test/"}),
    ],
)
def test_server_trouble_is_transient(response: httpx.Response) -> None:
    fake = new_fake()
    fake.status_override = lambda request: response
    answers: list[StatusAnswer] = []

    async def body(h: Harness) -> None:
        answers.append(await h.client.batch_status("req1"))

    run(body, fake)
    assert answers[0].outcome is Outcome.TRANSIENT
    assert answers[0].http_status == response.status_code
    assert answers[0].detail


@pytest.mark.parametrize(
    "error", [httpx.ReadTimeout, httpx.ConnectError, httpx.RemoteProtocolError]
)
def test_transport_errors_are_transient_without_url_query(error: type[httpx.RequestError]) -> None:
    fake = new_fake()

    def fail(request: httpx.Request) -> httpx.Response:
        raise error(f"trouble with {request.url}", request=request)

    fake.status_override = fail
    answers: list[StatusAnswer] = []

    async def body(h: Harness) -> None:
        answers.append(await h.client.batch_status("secret-looking-id"))

    run(body, fake)
    answer = answers[0]
    assert answer.outcome is Outcome.TRANSIENT
    assert answer.http_status is None
    assert answer.detail is not None
    assert error.__name__ in answer.detail
    assert "secret-looking-id" not in answer.detail


def test_invalid_request_id_answer_passes_through() -> None:
    fake = new_fake()
    fake.status_override = lambda request: httpx.Response(
        404, json={"detail": "request_id not found"}
    )
    answers: list[StatusAnswer] = []

    async def body(h: Harness) -> None:
        answers.append(await h.client.batch_status("nope"))

    run(body, fake)
    assert answers[0].outcome is Outcome.INVALID
    assert answers[0].api_message == "request_id not found"


def test_secret_echoed_by_the_server_is_scrubbed() -> None:
    fake = new_fake()
    fake.status_override = lambda request: httpx.Response(
        500, json={"detail": f"bad key {request.headers['x-api-key']}"}
    )
    answers: list[StatusAnswer] = []

    async def body(h: Harness) -> None:
        answers.append(await h.client.batch_status("req1"))

    run(body, fake)
    assert answers[0].outcome is Outcome.TRANSIENT
    assert SECRET not in (answers[0].detail or "")
    assert SECRET not in (answers[0].api_message or "")
    assert "<redacted>" in (answers[0].api_message or "")


def test_authorized_log_event_has_expiry_and_no_secrets() -> None:
    with capture_logs() as logs:

        async def body(h: Harness) -> None:
            await h.client.batch_status("req1")

        run(body)
    (event,) = [e for e in logs if e["event"] == "api.authorized"]
    assert event["expiry"] == "2026-03-08T12:00:00+00:00"
    assert event["client_id"] == CLIENT_ID
    assert SECRET not in repr(logs)
    assert "token-1" not in repr(logs)


def test_make_api_http_client() -> None:
    async def main() -> None:
        client = make_api_http_client(12.5)
        try:
            assert client.headers["user-agent"] == f"deepvue-batch-tracker/{__version__}"
            assert client.follow_redirects is False
            assert client.timeout.read == 12.5
            assert "x-api-key" not in client.headers
        finally:
            await client.aclose()

    asyncio.run(main())


def test_aware_offsets_in_expiry_compare_correctly() -> None:
    ist = timezone(timedelta(hours=5, minutes=30))
    expiry = parse_token_expiry("2026-03-08T17:30:00+05:30", "x", T0)
    assert expiry == datetime(2026, 3, 8, 17, 30, tzinfo=ist)
    assert expiry - T0 == timedelta(hours=24)


def test_secret_echoed_at_the_trim_boundary_leaves_no_fragment() -> None:
    fake = new_fake()
    fake.status_override = lambda request: httpx.Response(
        502, text="x" * 490 + request.headers["x-api-key"] + "y" * 100
    )
    answers: list[StatusAnswer] = []

    async def body(h: Harness) -> None:
        answers.append(await h.client.batch_status("req1"))

    run(body, fake)
    assert answers[0].detail is not None
    assert SECRET[:6] not in answers[0].detail


@pytest.mark.parametrize(
    ("retry_after", "client_options", "server_seconds", "clamp"),
    [
        pytest.param("999999999", {}, 999999999.0, 3600.0, id="default-hour"),
        pytest.param("300", {"max_retry_after": 3.0}, 300.0, 3.0, id="configured"),
        pytest.param(
            format_datetime(T0 + timedelta(days=400), usegmt=True),
            {"max_retry_after": 60.0},
            400 * 86400.0,
            60.0,
            id="http-date",
        ),
    ],
)
def test_huge_retry_after_is_clamped_and_logged(
    retry_after: str, client_options: dict[str, Any], server_seconds: float, clamp: float
) -> None:
    fake = new_fake()
    fake.status_override = lambda request: httpx.Response(429, headers={"Retry-After": retry_after})
    paused: list[float] = []
    answers: list[StatusAnswer] = []

    async def body(h: Harness) -> None:
        answers.append(await h.client.batch_status("req1"))
        paused.append(h.throttle.paused_for())
        paused.append(h.throttle.wait_time())

    with capture_logs() as logs:
        run(body, fake, client_options=client_options)
    assert paused == [pytest.approx(clamp), pytest.approx(clamp)]
    # The batch is rescheduled by the pause taken, not by the server's figure.
    assert answers[0].outcome is Outcome.RATE_LIMITED
    assert answers[0].retry_after == pytest.approx(clamp)
    (clamped,) = [e for e in logs if e["event"] == "api.retry_after_clamped"]
    assert clamped == {
        "event": "api.retry_after_clamped",
        "log_level": "warning",
        "retry_after": pytest.approx(server_seconds),
        "max_retry_after": clamp,
        "request_id": "req1",
    }
    (limited,) = [e for e in logs if e["event"] == "api.rate_limited"]
    assert limited["pause_seconds"] == pytest.approx(clamp)
    assert SECRET not in repr(logs)
    assert "token-1" not in repr(logs)


def test_retry_after_within_the_maximum_is_not_clamped() -> None:
    fake = new_fake()
    fake.status_override = lambda request: httpx.Response(429, headers={"Retry-After": "300"})
    answers: list[StatusAnswer] = []

    async def body(h: Harness) -> None:
        answers.append(await h.client.batch_status("req1"))
        assert h.throttle.paused_for() == pytest.approx(300.0)

    with capture_logs() as logs:
        run(body, fake, client_options={"max_retry_after": 300.0})
    assert answers[0].retry_after == 300.0
    assert "api.retry_after_clamped" not in [e["event"] for e in logs]


# -- long waits: CallsPaused instead of sleeping on a claimed batch ---------------------------


def test_long_pause_raises_calls_paused_and_sends_nothing() -> None:
    fake = new_fake()
    fake.status_override = lambda request: httpx.Response(429, headers={"Retry-After": "300"})
    raised: list[CallsPaused] = []

    async def body(h: Harness) -> None:
        await h.client.batch_status("req1")
        used = (await h.throttle.usage())["day"]
        fake.status_override = None
        h.clock.now += 10
        # Even with the token due for renewal, nothing goes out: no authorize either.
        h.utc = T0 + timedelta(days=2)
        with pytest.raises(CallsPaused) as info:
            await h.client.batch_status("req2")
        raised.append(info.value)
        assert (await h.throttle.usage())["day"] == used  # nothing counted
        assert await h.throttle.reserve(3) == 0
        assert h.throttle.paused_for() == pytest.approx(290.0)
        assert h.throttle.wait_time() == pytest.approx(290.0)
        # Once the pause is over, calls go out again (the daemon comes back by wait_time).
        h.clock.now += h.throttle.wait_time()
        assert (await h.client.batch_status("req2")).outcome is Outcome.COMPLETED

    h = run(body, fake)
    assert raised[0].seconds == pytest.approx(290.0)
    assert "290" in str(raised[0])
    assert h.clock.sleeps == []
    assert [r.url.params["request_id"] for r in h.fake.status_requests] == ["req1", "req2"]
    assert h.fake.authorizations == 2  # the first token, and one after the pause


def test_pause_reached_inside_acquire_raises_and_returns_the_pooled_permits() -> None:
    clock = FakeClock()

    async def main() -> None:
        budget = MemoryBudget(plan_windows(10, 100, 1000), clock=clock.monotonic)
        throttle = Throttle(budget, monotonic=clock.monotonic, sleep=clock.sleep)
        assert await throttle.reserve(3) == 3  # claimed three batches
        await throttle.acquire()  # the first call starts, and draws a 429
        await throttle.pause(120.0)
        for _ in range(2):
            with pytest.raises(CallsPaused) as info:
                await throttle.acquire()
            assert info.value.seconds == pytest.approx(120.0)
        # The two permits that were never used are back in the budget.
        assert (await throttle.usage())["second"] == (1, 10)
        await throttle.give_back(2)  # what the sweep does for the batches it hands back
        assert (await throttle.usage())["second"] == (1, 10)

    asyncio.run(main())
    assert clock.sleeps == []


def test_pause_put_on_the_shared_budget_by_another_instance() -> None:
    raised: list[CallsPaused] = []

    async def body(h: Harness) -> None:
        await h.client.batch_status("warm")
        # Another instance drew the 429: this process hears of it from the budget only.
        await h.budget.pause(600.0)
        assert h.throttle.paused_for() == 0.0
        assert await h.throttle.reserve(4) == 0
        assert h.throttle.wait_time() == pytest.approx(600.0)
        with pytest.raises(CallsPaused) as info:
            await h.client.batch_status("req1")
        raised.append(info.value)

    h = run(body)
    assert raised[0].seconds == pytest.approx(600.0)
    assert [r.url.params["request_id"] for r in h.fake.status_requests] == ["warm"]
    assert h.clock.sleeps == []


def test_long_wait_for_the_quota_raises_calls_paused() -> None:
    raised: list[CallsPaused] = []

    async def body(h: Harness) -> None:
        await h.client.batch_status("req1")
        with pytest.raises(CallsPaused) as info:
            await h.client.batch_status("req2")  # the minute is spent
        raised.append(info.value)
        assert h.throttle.paused_for() == 0.0
        assert h.throttle.wait_time() == pytest.approx(raised[0].seconds)
        h.clock.now += h.throttle.wait_time()
        assert (await h.client.batch_status("req2")).outcome is Outcome.COMPLETED

    h = run(body, windows=[Window("minute", 1, 60.0, 1.0)])
    assert 60.0 <= raised[0].seconds <= 61.1
    assert h.clock.sleeps == []
    assert len(h.fake.status_requests) == 2


def test_short_waits_are_still_slept() -> None:
    clock = FakeClock()

    async def main() -> None:
        budget = MemoryBudget([Window("w", 1, 4.0, 0.1)], clock=clock.monotonic)
        throttle = Throttle(budget, monotonic=clock.monotonic, sleep=clock.sleep)
        await throttle.acquire()
        await throttle.acquire()  # about 4.1 s for the window: within 5 s, slept
        await throttle.pause(5.0)  # exactly the longest wait: slept too
        await throttle.acquire()
        patient = Throttle(
            MemoryBudget([Window("w", 1, 4.0, 0.1)], clock=clock.monotonic),
            monotonic=clock.monotonic,
            sleep=clock.sleep,
            longest_wait=math.inf,
        )
        await patient.pause(3600.0)
        await patient.acquire()

    asyncio.run(main())
    assert clock.sleeps == [
        pytest.approx(4.1, abs=0.11),
        pytest.approx(5.0),
        pytest.approx(3600.0),
    ]


def test_longest_wait_is_configurable() -> None:
    clock = FakeClock()

    async def main() -> None:
        budget = MemoryBudget(plan_windows(10, 100, 1000), clock=clock.monotonic)
        throttle = Throttle(budget, monotonic=clock.monotonic, sleep=clock.sleep, longest_wait=0.5)
        assert throttle.longest_wait == 0.5
        await throttle.pause(0.4)
        await throttle.acquire()
        await throttle.pause(0.6)
        with pytest.raises(CallsPaused):
            throttle.check_paused()
        with pytest.raises(CallsPaused):
            await throttle.acquire()

    asyncio.run(main())
    assert clock.sleeps == [pytest.approx(0.4)]


def test_upload_during_a_long_pause_fails_with_a_reason(tmp_path: Path) -> None:
    batch_file = tmp_path / "batch.csv"
    batch_file.write_text("vpa\nasha@okaxis\n")

    async def body(h: Harness) -> None:
        await h.throttle.pause(900.0)
        with pytest.raises(SubmitFailed, match="paused for 900 s"):
            await h.client.submit_upi_batch(batch_file)

    h = run(body)
    assert h.fake.status_requests == []
    assert h.clock.sleeps == []


# -- answer size limits (issue 10, defect 2), against a real server and the real transport --------

BOMB_SIZE = 256 * 1024 * 1024  # what the gzip bomb inflates to


def gzip_bomb(size: int = BOMB_SIZE) -> bytes:
    """A valid-looking JSON envelope padded with spaces to `size` bytes, gzipped: ~0.1 % of it."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    head = json.dumps(completed_body("bomb"))[:-1].encode() + b', "pad": "'
    parts = [compressor.compress(head)]
    block = b" " * (1 << 20)
    for _ in range(size // len(block)):
        parts.append(compressor.compress(block))
    parts.append(compressor.compress(b'"}') + compressor.flush())
    return b"".join(parts)


def peak_rss() -> int:
    """This process's peak resident set (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    pytest.skip("needs /proc/self/status")


Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def good_authorize(request: web.Request) -> web.StreamResponse:
    expiry = (datetime.now(UTC) + timedelta(hours=24)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return web.json_response({"access_token": "tok-1", "token_type": "bearer", "expiry": expiry})


async def good_status(request: web.Request) -> web.StreamResponse:
    return web.json_response(completed_body(request.query["request_id"]))


async def gzip_bomb_answer(request: web.Request) -> web.StreamResponse:
    bomb = request.app[BOMB_KEY]
    return web.Response(
        body=bomb, headers={"Content-Encoding": "gzip"}, content_type="application/json"
    )


async def endless_answer(request: web.Request) -> web.StreamResponse:
    """HTTP 200 JSON-looking, 64 MiB long."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = 64 << 20
    await response.prepare(request)
    await response.write(b'{"data": {"pad": "')
    block = b" " * (1 << 16)
    with contextlib.suppress(ConnectionError):
        for _ in range(1024):
            await response.write(block)
    return response


BOMB_KEY = web.AppKey("bomb", bytes)


@contextlib.asynccontextmanager
async def real_deepvue(
    status: Route = good_status, authorize: Route = good_authorize
) -> AsyncIterator[DeepvueClient]:
    """A loopback aiohttp server, and a client over the daemon's own transport."""
    app = web.Application()
    app[BOMB_KEY] = _BOMB[0] if _BOMB else b""
    app.router.add_post("/v1/authorize", authorize)
    app.router.add_get("/v1/verification/batch-processing-status", status)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    transport = make_api_transport()
    http = make_api_http_client(5.0, transport)
    client = DeepvueClient(
        http,
        base_url=base,
        client_id=CLIENT_ID,
        read_secret=lambda: SECRET,
        throttle=Throttle(MemoryBudget(plan_windows(1000, 100000, 1000000))),
        status_transport=transport if Harness.direct else None,
    )
    try:
        yield client
    finally:
        await http.aclose()
        await runner.cleanup()


_BOMB: list[bytes] = []


@pytest.fixture
def bomb() -> bytes:
    if not _BOMB:
        _BOMB.append(gzip_bomb())
    return _BOMB[0]


async def longest_stall(work: Awaitable[StatusAnswer]) -> tuple[StatusAnswer, float]:
    """`work`'s answer, and the longest the event loop went without running a 5 ms ticker."""
    loop = asyncio.get_running_loop()
    last = [loop.time()]
    gaps: list[float] = []

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.005)
            now = loop.time()
            gaps.append(now - last[0])
            last[0] = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    try:
        answer = await work
    finally:
        ticker.cancel()
    gaps.append(loop.time() - last[0])
    return answer, max(gaps)


def test_a_gzip_bomb_status_answer_is_transient_and_never_inflated(bomb: bytes) -> None:
    assert len(bomb) < 1 << 20 < BOMB_SIZE  # small on the wire: only the decoded cap stops it
    before = peak_rss()

    async def main() -> tuple[StatusAnswer, float, StatusAnswer]:
        async with real_deepvue(status=gzip_bomb_answer) as client:
            answer, stall = await longest_stall(client.batch_status("req1"))
        async with real_deepvue() as client:
            fine = await client.batch_status("req2")
        return answer, stall, fine

    answer, stall, fine = asyncio.run(main())
    grown = peak_rss() - before
    print(
        f"FIGURES gzip bomb status answer: peak RSS grew {grown / 2**20:.1f} MiB, loop stall {stall * 1000:.0f} ms"
    )
    assert answer.outcome is Outcome.TRANSIENT
    assert answer.http_status == 200
    assert answer.detail is not None and "too large" in answer.detail
    assert str(MAX_ANSWER_BYTES) in answer.detail
    assert grown < 64 << 20
    assert stall < 0.5
    assert fine.outcome is Outcome.COMPLETED


def test_a_64_mib_status_answer_is_transient_and_read_no_further_than_the_limit() -> None:
    before = peak_rss()

    async def main() -> tuple[StatusAnswer, float]:
        async with real_deepvue(status=endless_answer) as client:
            return await longest_stall(client.batch_status("req1"))

    answer, stall = asyncio.run(main())
    grown = peak_rss() - before
    print(
        f"FIGURES 64 MiB status answer: peak RSS grew {grown / 2**20:.1f} MiB, loop stall {stall * 1000:.0f} ms"
    )
    assert answer.outcome is Outcome.TRANSIENT
    assert answer.detail is not None and "too large" in answer.detail
    assert grown < 32 << 20
    assert stall < 0.5


def test_a_gzip_bomb_authorize_answer_is_transient(bomb: bytes) -> None:
    async def bomb_authorize(request: web.Request) -> web.StreamResponse:
        return await gzip_bomb_answer(request)

    async def main() -> StatusAnswer:
        async with real_deepvue(authorize=bomb_authorize) as client:
            return await client.batch_status("req1")

    answer = asyncio.run(main())
    assert answer.outcome is Outcome.TRANSIENT
    assert answer.detail is not None and "authorize answer too large" in answer.detail


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw deflate", "identity"])
def test_compressed_answers_within_the_limit_still_decode(coding: str) -> None:
    async def compressed(request: web.Request) -> web.StreamResponse:
        body = json.dumps(completed_body(request.query["request_id"])).encode()
        headers = {}
        if coding == "gzip":
            body, headers = gzip.compress(body), {"Content-Encoding": "gzip"}
        elif coding == "deflate":
            body, headers = zlib.compress(body), {"Content-Encoding": "deflate"}
        elif coding == "raw deflate":
            squeeze = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            body = squeeze.compress(body) + squeeze.flush()
            headers = {"Content-Encoding": "deflate"}
        return web.Response(body=body, headers=headers, content_type="application/json")

    async def main() -> StatusAnswer:
        async with real_deepvue(status=compressed) as client:
            return await client.batch_status("req1")

    answer = asyncio.run(main())
    assert answer.outcome is Outcome.COMPLETED
    assert answer.output_url == OUTPUT_URL


def test_an_answer_that_does_not_decode_is_transient() -> None:
    async def broken(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"not gzip at all", headers={"Content-Encoding": "gzip"})

    async def main() -> StatusAnswer:
        async with real_deepvue(status=broken) as client:
            return await client.batch_status("req1")

    answer = asyncio.run(main())
    assert answer.outcome is Outcome.TRANSIENT
    assert answer.detail is not None and "DecodingError" in answer.detail


def test_answer_limit_applies_to_answers_the_transport_has_read_already() -> None:
    fake = new_fake()
    fake.status_override = lambda request: httpx.Response(200, content=b" " * 2000)

    async def body(h: Harness) -> None:
        answer = await h.client.batch_status("req1")
        assert answer.outcome is Outcome.TRANSIENT
        assert answer.detail is not None and "too large" in answer.detail

    run(body, fake, client_options={"max_answer_bytes": 1000})


# -- echoes of the secret in other spellings (issue 10, item 6) ----------------------------------

ODD_SECRET = 's3cr/et+v&l"ue=x'


def test_secret_echoed_form_encoded_by_authorize_is_scrubbed() -> None:
    # The form body echoed back holds the secret percent-encoded (client_secret=s3cr%2Fet...).
    fake = new_fake()
    fake.authorize_override = lambda request: httpx.Response(
        500, text=f"cannot parse {request.content.decode()}"
    )
    answers: list[StatusAnswer] = []

    async def body(h: Harness) -> None:
        h.secrets = [ODD_SECRET]
        answers.append(await h.client.batch_status("req1"))

    run(body, fake)
    detail = answers[0].detail or ""
    assert answers[0].outcome is Outcome.TRANSIENT
    assert "s3cr%2Fet" not in detail and "v%26l" not in detail
    assert "client_secret=<redacted>" in detail


def test_secret_echoed_json_escaped_is_scrubbed_from_detail() -> None:
    fake = new_fake()
    fake.status_override = lambda request: httpx.Response(
        500, json={"detail": f"bad key {request.headers['x-api-key']}"}
    )
    answers: list[StatusAnswer] = []

    async def body(h: Harness) -> None:
        h.secrets = [ODD_SECRET]
        answers.append(await h.client.batch_status("req1"))

    run(body, fake)
    answer = answers[0]
    for text in (answer.detail or "", answer.api_message or ""):
        assert ODD_SECRET not in text
        assert json.dumps(ODD_SECRET)[1:-1] not in text
        assert "s3cr/et" not in text
    assert "<redacted>" in (answer.detail or "")


def test_the_api_transport_turns_an_answer_that_is_not_http_into_an_httpx_error() -> None:
    # httpx-aiohttp lets aiohttp's "bad status line" through unmapped; the client catches
    # httpx's errors only, so the worker would crash instead of counting a fault.
    import aiohttp
    import yarl
    from multidict import CIMultiDict, CIMultiDictProxy

    from tracker.aiohttp_errors import MappedErrors

    class NotHttp(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            raise aiohttp.ClientResponseError(
                aiohttp.RequestInfo(
                    yarl.URL(str(request.url)),
                    "GET",
                    CIMultiDictProxy(CIMultiDict()),
                    yarl.URL(str(request.url)),
                ),
                (),
                status=400,
                message="Bad status line",
            )

    async def main() -> None:
        request = httpx.Request("GET", "https://api.example.org/status?request_id=r1")
        with pytest.raises(httpx.RemoteProtocolError) as raised:
            await MappedErrors(NotHttp()).handle_async_request(request)
        assert raised.value.request is request
        assert "r1" not in str(raised.value)

    asyncio.run(main())
