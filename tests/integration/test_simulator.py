"""The Deepvue simulator behaves like the documented API, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gzip
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from aiohttp import web

from tests.e2e.support import start_fake_api
from tracker.simulator import (
    MULTIPART_THRESHOLD,
    SimulatorConfig,
    SimulatorHandle,
    expected_md5,
    expected_sha256,
    expected_size,
    output_bytes,
    running_simulator,
    serve_forever,
)

STATUS_PATH = "/v1/verification/batch-processing-status"
CREDS = {"client_id": "demo-client", "client_secret": "demo-secret"}
FAST = SimulatorConfig(completion_delay=0.2, file_size=200_000)


@pytest.fixture
def sim() -> Iterator[SimulatorHandle]:
    with running_simulator(FAST) as handle:
        yield handle


@pytest.fixture
def client(sim: SimulatorHandle) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.base_url, timeout=10) as c:
        yield c


def auth_headers(client: httpx.Client) -> dict[str, str]:
    return auth_headers_at(client, "")


def auth_headers_at(client: httpx.Client, base_url: str) -> dict[str, str]:
    response = client.post(base_url + "/v1/authorize", data=CREDS)
    assert response.status_code == 200
    return {
        "Authorization": f"Bearer {response.json()['access_token']}",
        "x-api-key": CREDS["client_secret"],
    }


def status(client: httpx.Client, headers: dict[str, str], request_id: str) -> httpx.Response:
    return client.get(STATUS_PATH, params={"request_id": request_id}, headers=headers)


def completed_url(client: httpx.Client, headers: dict[str, str], request_id: str) -> str:
    """Poll until the id completes (FAST completes 0.2 s after the first call)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        response = status(client, headers, request_id)
        if response.status_code == 200:
            url = response.json()["data"]["batch_output_file_url"]
            if url:
                return str(url)
        time.sleep(0.05)
    raise AssertionError(f"{request_id} never completed")


def jwt_claims(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    claims: dict[str, object] = json.loads(base64.urlsafe_b64decode(payload + "=" * 4))
    return claims


# --------------------------------------------------------------------------- authorize


def test_authorize_urlencoded_returns_jwt_with_matching_expiry(client: httpx.Client) -> None:
    response = client.post("/v1/authorize", data=CREDS)
    assert response.status_code == 200
    assert response.request.headers["content-type"] == "application/x-www-form-urlencoded"
    body = response.json()
    assert body["token_type"] == "bearer"
    header_b64, _, signature = body["access_token"].split(".")
    assert json.loads(base64.urlsafe_b64decode(header_b64 + "==")) == {
        "alg": "HS256",
        "typ": "JWT",
    }
    assert signature
    claims = jwt_claims(body["access_token"])
    assert claims["sub"] == "demo-client"
    assert isinstance(claims["exp"], int)
    assert abs(claims["exp"] - (time.time() + 86400)) < 5
    expiry = datetime.strptime(body["expiry"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert int(expiry.timestamp()) == claims["exp"]


def test_authorize_multipart(client: httpx.Client) -> None:
    files = {name: (None, value) for name, value in CREDS.items()}
    response = client.post("/v1/authorize", files=files)
    assert response.request.headers["content-type"].startswith("multipart/form-data")
    assert response.status_code == 200
    assert jwt_claims(response.json()["access_token"])["sub"] == "demo-client"


def test_authorize_bad_credentials(client: httpx.Client, sim: SimulatorHandle) -> None:
    response = client.post("/v1/authorize", data={**CREDS, "client_secret": "nope"})
    assert response.status_code == 401
    assert response.json() == {"detail": "Invalid client_id or client_secret, access Denied"}
    missing = client.post("/v1/authorize", data={"client_id": "demo-client"})
    assert missing.status_code == 422
    assert missing.json()["detail"][0]["loc"] == ["body", "client_secret"]
    assert sim.stats()["authorize_calls"] == 2


# --------------------------------------------------------------------------- status auth


def test_status_authentication_errors(client: httpx.Client) -> None:
    good = auth_headers(client)
    missing = client.get(STATUS_PATH, params={"request_id": "a"})
    assert (missing.status_code, missing.json()) == (401, {"detail": "Not authenticated"})
    no_key = status(client, {"Authorization": good["Authorization"]}, "a")
    assert no_key.status_code == 401
    bad_token = status(client, {**good, "Authorization": "Bearer a.b.c"}, "a")
    assert (bad_token.status_code, bad_token.json()) == (403, {"detail": "Not a valid token"})
    wrong_key = status(client, {**good, "x-api-key": "other"}, "a")
    assert (wrong_key.status_code, wrong_key.json()) == (
        401,
        {"detail": "Could not validate credentials"},
    )
    no_id = client.get(STATUS_PATH, headers=good)
    assert no_id.status_code == 422
    assert no_id.json() == {
        "detail": [
            {"loc": ["query", "request_id"], "msg": "field required", "type": "value_error.missing"}
        ]
    }


def test_expired_token_is_rejected() -> None:
    with (
        running_simulator(SimulatorConfig(token_ttl=0)) as sim,
        httpx.Client(base_url=sim.base_url) as client,
    ):
        response = status(client, auth_headers(client), "a")
    assert (response.status_code, response.json()) == (403, {"detail": "Not a valid token"})


def test_token_from_another_simulator_is_rejected(client: httpx.Client) -> None:
    with running_simulator(FAST) as other, httpx.Client(base_url=other.base_url) as other_client:
        foreign = auth_headers(other_client)
    assert status(client, foreign, "a").status_code == 403


# --------------------------------------------------------------------------- status lifecycle


def test_default_id_in_progress_then_completed(client: httpx.Client, sim: SimulatorHandle) -> None:
    headers = auth_headers(client)
    first = status(client, headers, "abc123")
    assert first.status_code == 200
    body = first.json()
    assert body["code"] == 200
    assert body["sub_code"] == "SUCCESS"
    assert body["message"] == "Batch Upload status fetched successfully"
    assert isinstance(body["timestamp"], int)
    assert body["timestamp"] > 1_600_000_000_000
    assert len(body["transaction_id"]) == 32
    assert body["data"] == {
        "request_id": "abc123",
        "status": 201,
        "product_id": "",
        "message": "batch processing in progress",
        "batch_output_file_url": None,
    }
    time.sleep(0.25)
    done = status(client, headers, "abc123").json()["data"]
    assert done["status"] == 200
    assert done["message"] == "batch processing completed"
    url = urlsplit(done["batch_output_file_url"])
    assert f"{url.scheme}://{url.netloc}" == sim.base_url
    assert url.path == "/upi-basic-batch-output-files/abc123.csv"
    query = parse_qs(url.query)
    assert query["X-Amz-Expires"] == ["600"]
    assert len(query["X-Amz-Signature"][0]) == 64
    datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ")
    stats = sim.stats()
    assert stats["status_calls"] == {"abc123": 2}
    assert stats["status_calls_total"] == 2


def test_fail_prefix_goes_in_progress_then_failed(client: httpx.Client) -> None:
    headers = auth_headers(client)
    assert status(client, headers, "fail-1").json()["data"]["status"] == 201
    time.sleep(0.25)
    data = status(client, headers, "fail-1").json()["data"]
    assert data["status"] == 500
    assert data["message"] == "batch processing failed"
    assert data["batch_output_file_url"] is None


def test_slow_prefix_takes_five_times_longer() -> None:
    config = SimulatorConfig(completion_delay=0.06)
    with running_simulator(config) as sim, httpx.Client(base_url=sim.base_url) as client:
        headers = auth_headers(client)
        status(client, headers, "slow-1")
        status(client, headers, "plain-1")
        time.sleep(0.1)
        assert status(client, headers, "plain-1").json()["data"]["status"] == 200
        assert status(client, headers, "slow-1").json()["data"]["status"] == 201
        time.sleep(0.25)
        assert status(client, headers, "slow-1").json()["data"]["status"] == 200


def test_invalid_and_missing_prefixes(client: httpx.Client) -> None:
    headers = auth_headers(client)
    invalid = status(client, headers, "invalid-1")
    assert (invalid.status_code, invalid.json()) == (400, {"detail": "Invalid request_id"})
    missing = status(client, headers, "missing-1")
    assert (missing.status_code, missing.json()) == (404, {"detail": "request_id not found"})


def test_flaky_prefix_fails_every_odd_call(client: httpx.Client, sim: SimulatorHandle) -> None:
    headers = auth_headers(client)
    codes = [status(client, headers, "flaky-1").status_code for _ in range(4)]
    assert codes == [503, 200, 503, 200]
    assert status(client, headers, "flaky-1").json() == {"detail": "Source Unavailable"}
    assert sim.stats()["errors_served"] == 3


def test_garbage_prefix_serves_html_twice(client: httpx.Client) -> None:
    headers = auth_headers(client)
    for _ in range(2):
        response = status(client, headers, "garbage-1")
        assert response.status_code == 200
        assert response.text == "<html>upstream gateway</html>"
        assert response.headers["content-type"].startswith("text/html")
    assert status(client, headers, "garbage-1").json()["data"]["request_id"] == "garbage-1"


def test_ratelimit_prefix_sends_retry_after(client: httpx.Client, sim: SimulatorHandle) -> None:
    headers = auth_headers(client)
    response = status(client, headers, "ratelimit-1")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert response.json() == {"detail": "Rate limit exceeded. Please retry after some time."}
    assert sim.stats()["rate_limited"] == 1


def test_xlsx_prefix_changes_extension(client: httpx.Client) -> None:
    headers = auth_headers(client)
    url = completed_url(client, headers, "xlsx-1")
    assert urlsplit(url).path.endswith("/xlsx-1.xlsx")
    assert client.get(url).status_code == 200


# --------------------------------------------------------------------------- faults and limits


def test_rate_per_second_enforced_as_sliding_window() -> None:
    config = SimulatorConfig(rate_per_second=2, completion_delay=0)
    with running_simulator(config) as sim, httpx.Client(base_url=sim.base_url) as client:
        headers = auth_headers(client)
        codes = [status(client, headers, "r").status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        limited = status(client, headers, "r")
        assert limited.json() == {"detail": "Rate limit exceeded. Please retry after some time."}
        assert "retry-after" not in limited.headers
        time.sleep(1.05)
        assert status(client, headers, "r").status_code == 200
        stats = sim.stats()
    assert stats["rate_limited"] == 2
    assert stats["status_calls"] == {"r": 5}


def test_rate_per_minute_checked_on_its_own() -> None:
    config = SimulatorConfig(rate_per_second=10, rate_per_minute=3, completion_delay=0)
    with running_simulator(config) as sim, httpx.Client(base_url=sim.base_url) as client:
        headers = auth_headers(client)
        codes = [status(client, headers, "r").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]


def test_error_rate_is_seeded_and_reproducible() -> None:
    def pattern(seed: int) -> list[int]:
        config = SimulatorConfig(error_rate=0.5, seed=seed, completion_delay=0)
        with running_simulator(config) as sim, httpx.Client(base_url=sim.base_url) as client:
            headers = auth_headers(client)
            codes = [status(client, headers, "e").status_code for _ in range(20)]
            assert sim.stats()["errors_served"] == codes.count(503)
            return codes

    first = pattern(7)
    assert set(first) == {200, 503}
    assert pattern(7) == first


# --------------------------------------------------------------------------- downloads


def test_full_download_matches_expected_sha256(client: httpx.Client) -> None:
    headers = auth_headers(client)
    url = completed_url(client, headers, "dl-1")
    response = client.get(url)
    assert response.status_code == 200
    size = expected_size("dl-1", FAST)
    assert size == 200_000
    assert len(response.content) == size
    assert int(response.headers["content-length"]) == size
    assert hashlib.sha256(response.content).hexdigest() == expected_sha256("dl-1", size)
    assert response.content == b"".join(output_bytes("dl-1", size))
    assert response.headers["accept-ranges"] == "bytes"
    etag = response.headers["etag"]
    assert etag.startswith('"')
    assert not etag.startswith("W/")
    assert response.content.startswith(b"row_id,")


def test_big_prefix_uses_big_file_size() -> None:
    config = SimulatorConfig(completion_delay=0, big_file_size=300_001)
    assert expected_size("big-1", config) == 300_001
    with running_simulator(config) as sim, httpx.Client(base_url=sim.base_url) as client:
        body = client.get(completed_url(client, auth_headers(client), "big-1")).content
    assert hashlib.sha256(body).hexdigest() == expected_sha256("big-1", 300_001)


def test_range_resume_returns_206_with_the_tail(client: httpx.Client) -> None:
    url = completed_url(client, auth_headers(client), "dl-2")
    full = b"".join(output_bytes("dl-2", 200_000))
    etag = client.head(url).headers["etag"]
    response = client.get(url, headers={"Range": "bytes=70000-", "If-Range": etag})
    assert response.status_code == 206
    assert response.headers["content-range"] == "bytes 70000-199999/200000"
    assert int(response.headers["content-length"]) == 130_000
    assert response.content == full[70000:]


def test_if_range_mismatch_returns_full_body(client: httpx.Client) -> None:
    url = completed_url(client, auth_headers(client), "dl-3")
    response = client.get(url, headers={"Range": "bytes=100-", "If-Range": '"stale"'})
    assert response.status_code == 200
    assert "content-range" not in response.headers
    assert hashlib.sha256(response.content).hexdigest() == expected_sha256("dl-3", 200_000)


def test_range_past_end_is_416(client: httpx.Client) -> None:
    url = completed_url(client, auth_headers(client), "dl-4")
    response = client.get(url, headers={"Range": "bytes=200000-"})
    assert response.status_code == 416
    assert response.headers["content-range"] == "bytes */200000"


def test_head_gives_headers_without_body(client: httpx.Client) -> None:
    url = completed_url(client, auth_headers(client), "dl-5")
    response = client.head(url)
    assert response.status_code == 200
    assert response.headers["content-length"] == "200000"
    assert response.content == b""


def test_expire_prefix_first_url_expired_then_fresh_url_works(client: httpx.Client) -> None:
    headers = auth_headers(client)
    first_url = completed_url(client, headers, "expire-1")
    expired = client.get(first_url)
    assert expired.status_code == 403
    assert "<Code>AccessDenied</Code>" in expired.text
    assert "<Message>Request has expired</Message>" in expired.text
    second_url = completed_url(client, headers, "expire-1")
    assert client.get(second_url).status_code == 200


def test_tampered_signature_is_403(client: httpx.Client) -> None:
    url = completed_url(client, auth_headers(client), "dl-6")
    tampered = url.replace("dl-6.csv", "dl-7.csv")
    response = client.get(tampered)
    assert response.status_code == 403
    assert "Signature does not match" in response.text


def test_trunc_prefix_cuts_first_download_then_resume_works(client: httpx.Client) -> None:
    url = completed_url(client, auth_headers(client), "trunc-1")
    received = bytearray()

    def read_into_received() -> None:
        with client.stream("GET", url) as response:
            assert response.headers["content-length"] == "200000"
            for chunk in response.iter_bytes():
                received.extend(chunk)

    with pytest.raises(httpx.RemoteProtocolError):
        read_into_received()
    assert len(received) == 100_000
    full = b"".join(output_bytes("trunc-1", 200_000))
    assert bytes(received) == full[:100_000]
    resumed = client.get(url, headers={"Range": f"bytes={len(received)}-"})
    assert resumed.status_code == 206
    assert hashlib.sha256(bytes(received) + resumed.content).hexdigest() == expected_sha256(
        "trunc-1", 200_000
    )


def test_download_requests_are_recorded_without_query(
    client: httpx.Client, sim: SimulatorHandle
) -> None:
    url = completed_url(client, auth_headers(client), "dl-8")
    client.get(url, headers={"X-Probe": "yes", "Range": "bytes=10-"})
    downloads = sim.stats()["downloads"]
    assert len(downloads) == 1
    record = downloads[0]
    assert record["method"] == "GET"
    assert record["path"] == "/upi-basic-batch-output-files/dl-8.csv"
    assert record["status"] == 206
    assert record["headers"]["x-probe"] == "yes"
    assert record["headers"]["range"] == "bytes=10-"
    assert "authorization" not in record["headers"]
    assert all(name == name.lower() for name in record["headers"])


# --------------------------------------------------------------------------- submit, stats, reset


def test_submit_batch_then_poll_new_id(client: httpx.Client, sim: SimulatorHandle) -> None:
    headers = auth_headers(client)
    response = client.post(
        "/v1/verification/upi-basic/batch",
        headers=headers,
        files={"batch_file": ("in.csv", b"vpa\nx@upi\n", "text/csv")},
    )
    assert response.status_code == 200
    body = response.json()
    assert body["code"] == 201
    assert body["message"] == "batch processing in progress"
    assert body["sub_code"] == "SUCCESS"
    assert body["output_batch_file"] == ""
    request_id = body["request_id"]
    assert re.fullmatch("[0-9a-f]{32}", request_id)
    assert status(client, headers, request_id).json()["data"]["status"] == 201
    missing = client.post(
        "/v1/verification/upi-basic/batch", headers=headers, files={"other": ("a", b"x")}
    )
    assert missing.status_code == 422
    assert missing.json()["detail"][0]["loc"] == ["body", "batch_file"]
    unauthenticated = client.post(
        "/v1/verification/upi-basic/batch", files={"batch_file": ("in.csv", b"x")}
    )
    assert unauthenticated.status_code == 401
    assert sim.stats()["submissions"] == 1


def test_stats_endpoint_and_reset(client: httpx.Client, sim: SimulatorHandle) -> None:
    headers = auth_headers(client)
    status(client, headers, "flaky-r")
    assert client.get("/_sim/stats").json() == sim.stats()
    assert sim.stats()["status_calls"] == {"flaky-r": 1}
    sim.reset()
    cleared = sim.stats()
    assert cleared["status_calls"] == {}
    assert cleared["authorize_calls"] == 0
    assert cleared["errors_served"] == 0
    # Per-id state is gone too: the flaky id starts over with an odd (failing) call.
    assert status(client, headers, "flaky-r").status_code == 503
    assert client.post("/_sim/reset").status_code == 200
    assert sim.stats()["status_calls_total"] == 0


# --------------------------------------------------------------------------- content and serving


def test_output_bytes_exact_size_and_prefix_consistent() -> None:
    for size in (0, 1, 54, 55, 65_536, 65_591, 200_001):
        body = b"".join(output_bytes("c-1", size))
        assert len(body) == size
        assert hashlib.sha256(body).hexdigest() == expected_sha256("c-1", size)
    long = b"".join(output_bytes("c-1", 300_000))
    assert b"".join(output_bytes("c-1", 150_000)) == long[:150_000]
    assert b"".join(output_bytes("c-2", 150_000)) != long[:150_000]
    assert all(len(chunk) <= 64 * 1024 for chunk in output_bytes("c-1", 300_000))


def test_serve_forever_refuses_non_loopback_host() -> None:
    with pytest.raises(ValueError, match="loopback"):
        serve_forever(SimulatorConfig(), host="0.0.0.0")
    with pytest.raises(ValueError, match="loopback"):
        serve_forever(SimulatorConfig(), host="example.com")


def test_serve_forever_announces_and_stops_on_sigterm() -> None:
    code = "from tracker.simulator import SimulatorConfig, serve_forever\nserve_forever(SimulatorConfig())\n"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=base_url) as client:
            assert client.post("/v1/authorize", data=CREDS).status_code == 200
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert stderr == ""


# --------------------------------------------------------------------------- hostile prefixes


def test_trickle_prefix_sends_about_two_kib_per_second(client: httpx.Client) -> None:
    url = completed_url(client, auth_headers(client), "trickle-1")
    started = time.monotonic()
    chunks: list[bytes] = []
    with client.stream("GET", url) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            chunks.append(chunk)
            if sum(map(len, chunks)) >= 2048:
                break
    elapsed = time.monotonic() - started
    received = b"".join(chunks)
    # 2 KiB in 256-byte chunks is 7 pauses of 0.125 s: at least 0.875 s, not instant.
    assert elapsed >= 0.8
    assert received == b"".join(output_bytes("trickle-1", 200_000))[: len(received)]


def test_trickle_prefix_body_is_complete_and_correct() -> None:
    config = SimulatorConfig(completion_delay=0, file_size=1024)
    with running_simulator(config) as sim, httpx.Client(base_url=sim.base_url) as client:
        url = completed_url(client, auth_headers(client), "trickle-2")
        started = time.monotonic()
        response = client.get(url)
        elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == expected_sha256("trickle-2", 1024)
    # 4 chunks, 3 pauses.
    assert 0.3 <= elapsed < 3


def test_stall_prefix_sends_one_kib_then_nothing(client: httpx.Client) -> None:
    url = completed_url(client, auth_headers(client), "stall-1")
    received = bytearray()
    timeout = httpx.Timeout(10, read=1.0)

    def read_into_received() -> None:
        with client.stream("GET", url, timeout=timeout) as response:
            assert response.status_code == 200
            assert response.headers["content-length"] == "200000"
            for chunk in response.iter_bytes():
                received.extend(chunk)

    with pytest.raises(httpx.ReadTimeout):
        read_into_received()
    assert bytes(received) == b"".join(output_bytes("stall-1", 200_000))[:1024]


def test_stall_prefix_ends_promptly_on_shutdown() -> None:
    config = SimulatorConfig(completion_delay=0)
    received = bytearray()
    with ExitStack() as server, httpx.Client(timeout=httpx.Timeout(10, read=20)) as client:
        sim = server.enter_context(running_simulator(config))
        headers = auth_headers_at(client, sim.base_url)
        url = ""
        for _ in range(50):
            answer = client.get(
                sim.base_url + STATUS_PATH, params={"request_id": "stall-2"}, headers=headers
            )
            url = answer.json()["data"]["batch_output_file_url"] or ""
            if url:
                break
            time.sleep(0.02)
        with client.stream("GET", url) as response:
            raw = response.iter_raw()
            while len(received) < 1024:
                received.extend(next(raw))
            started = time.monotonic()
            server.close()
            shutdown_seconds = time.monotonic() - started
            with pytest.raises(httpx.RemoteProtocolError):
                received.extend(b"".join(raw))
    assert len(received) == 1024
    # aiohttp waits up to 2 s for handlers on shutdown: a stall that ignored it would hit that.
    assert shutdown_seconds < 1.5


def test_badurl_prefixes_complete_with_hostile_urls(
    client: httpx.Client, sim: SimulatorHandle
) -> None:
    headers = auth_headers(client)
    host = urlsplit(sim.base_url).netloc
    urls = {
        prefix: completed_url(client, headers, f"{prefix}1")
        for prefix in (
            "badurl-http-",
            "badurl-file-",
            "badurl-userinfo-",
            "badurl-host-",
            "badurl-metadata-",
            "badurl-redirect-",
        )
    }
    http = urlsplit(urls["badurl-http-"])
    assert (http.scheme, http.netloc) == (
        "http",
        "bulk-data-processing.s3.ap-south-1.amazonaws.com",
    )
    assert http.path == "/upi-basic-batch-output-files/badurl-http-1.csv"
    assert urls["badurl-file-"] == "file:///etc/passwd"
    userinfo = urlsplit(urls["badurl-userinfo-"])
    assert (userinfo.username, userinfo.password) == ("user", "pass")
    assert userinfo.netloc == f"user:pass@{host}"
    evil = urlsplit(urls["badurl-host-"])
    assert (evil.scheme, evil.hostname) == ("https", "evil.example.com")
    assert urls["badurl-metadata-"] == "http://169.254.169.254/latest/meta-data/"
    redirect = urlsplit(urls["badurl-redirect-"])
    assert redirect.netloc == host
    assert redirect.path == "/upi-basic-batch-output-files/badurl-redirect-1.csv"
    # Handing out the URLs fetched nothing: the simulator never follows them itself.
    assert sim.stats()["downloads"] == []


def test_badurl_prefixes_stay_in_progress_until_the_delay(client: httpx.Client) -> None:
    data = status(client, auth_headers(client), "badurl-metadata-2").json()["data"]
    assert (data["status"], data["batch_output_file_url"]) == (201, None)


def test_badurl_redirect_answers_302_to_metadata_and_records_it(
    client: httpx.Client, sim: SimulatorHandle
) -> None:
    url = completed_url(client, auth_headers(client), "badurl-redirect-2")
    response = client.get(url, follow_redirects=False)
    assert response.status_code == 302
    assert response.headers["location"] == "http://169.254.169.254/latest/meta-data/"
    stats = sim.stats()
    assert stats["redirects_served"] == 1
    assert stats["downloads"] == [
        {
            "method": "GET",
            "path": "/upi-basic-batch-output-files/badurl-redirect-2.csv",
            "headers": stats["downloads"][0]["headers"],
            "status": 302,
            "location": "http://169.254.169.254/latest/meta-data/",
        }
    ]
    sim.reset()
    assert sim.stats()["redirects_served"] == 0


def test_badurl_redirect_still_checks_the_signature(client: httpx.Client) -> None:
    url = completed_url(client, auth_headers(client), "badurl-redirect-3")
    response = client.get(url.replace("X-Amz-Signature=", "X-Amz-Signature=0"))
    assert response.status_code == 403


# --------------------------------------------------------------------------- throttle_first


@pytest.mark.parametrize("retry_after", ["300", "1e12", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_throttle_first_answers_429_then_normally(retry_after: str) -> None:
    config = SimulatorConfig(completion_delay=0, throttle_first=2, throttle_retry_after=retry_after)
    with running_simulator(config) as sim, httpx.Client(base_url=sim.base_url) as client:
        headers = auth_headers(client)
        # Calls that are not status calls (unauthenticated, no request_id) do not count.
        assert status(client, {}, "a").status_code == 401
        assert client.get(STATUS_PATH, headers=headers).status_code == 422
        first, second, third = (status(client, headers, rid) for rid in ("a", "b", "a"))
        assert (first.status_code, second.status_code) == (429, 429)
        assert first.headers["retry-after"] == second.headers["retry-after"] == retry_after
        assert first.json() == {"detail": "Rate limit exceeded. Please retry after some time."}
        assert third.status_code == 200
        assert third.json()["data"]["status"] == 200  # completion_delay 0, first seen now
        stats = sim.stats()
        assert stats["rate_limited"] == 2
        assert stats["status_calls"] == {"a": 2, "b": 1}
        assert stats["errors_served"] == 0
        # A reset starts the count again.
        sim.reset()
        assert status(client, headers, "c").status_code == 429
        assert status(client, headers, "c").status_code == 429
        assert status(client, headers, "c").status_code == 200
        assert sim.stats()["rate_limited"] == 2


def test_throttle_first_is_off_by_default(client: httpx.Client, sim: SimulatorHandle) -> None:
    assert status(client, auth_headers(client), "r").status_code == 200
    assert sim.stats()["rate_limited"] == 0


def test_fake_api_command_takes_the_throttle_options() -> None:
    throttle = ["--throttle-first", "1", "--throttle-retry-after", "Wed, 21 Oct 2015 07:28:00 GMT"]
    api = start_fake_api(*throttle)
    try:
        with httpx.Client(base_url=api.url, timeout=10) as client:
            headers = auth_headers(client)
            throttled = status(client, headers, "r")
            assert throttled.status_code == 429
            assert throttled.headers["retry-after"] == "Wed, 21 Oct 2015 07:28:00 GMT"
            assert status(client, headers, "r").status_code == 200
    finally:
        api.process.terminate()
        api.process.wait(timeout=10)
        if api.process.stdout is not None:
            api.process.stdout.close()


# --------------------------------------------------------------------------- overlapping calls


def test_overlapping_status_calls_for_one_id_are_counted() -> None:
    import asyncio

    config = SimulatorConfig(completion_delay=0, latency=0.4)

    async def main(base_url: str) -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            response = await client.post("/v1/authorize", data=CREDS)
            headers = {
                "Authorization": f"Bearer {response.json()['access_token']}",
                "x-api-key": CREDS["client_secret"],
            }

            async def ask(request_id: str, auth: dict[str, str] = headers) -> int:
                answer = await client.get(
                    STATUS_PATH, params={"request_id": request_id}, headers=auth
                )
                return answer.status_code

            # Three at once for "a" (two of them overlap the first), one each for "b" and
            # "c" beside them (no overlap: other ids), then "a" again on its own. An
            # unauthenticated call for "d" is in flight, but is not a status call itself.
            codes = await asyncio.gather(
                ask("a"), ask("a"), ask("a"), ask("b"), ask("c"), ask("d", {}), ask("d")
            )
            assert codes == [200, 200, 200, 200, 200, 401, 200]
            assert await ask("a") == 200

    with running_simulator(config) as sim:
        assert sim.stats()["overlapping_status_calls"] == 0
        asyncio.run(main(sim.base_url))
        stats = sim.stats()
        assert stats["status_calls"] == {"a": 4, "b": 1, "c": 1, "d": 1}
        # The authenticated "d" overlapped the unauthenticated one, whichever came first;
        # if the unauthenticated one arrived second, it overlapped but does not count.
        assert stats["overlapping_by_id"]["a"] == 2
        assert stats["overlapping_by_id"].get("d", 0) in (0, 1)
        assert set(stats["overlapping_by_id"]) <= {"a", "d"}
        assert stats["overlapping_status_calls"] == sum(stats["overlapping_by_id"].values())
        sim.reset()
        cleared = sim.stats()
        assert (cleared["overlapping_status_calls"], cleared["overlapping_by_id"]) == (0, {})


def test_a_call_in_flight_across_a_reset_does_not_upset_the_count() -> None:
    import asyncio

    config = SimulatorConfig(completion_delay=0, latency=0.5)
    with running_simulator(config) as sim:

        async def main() -> None:
            async with httpx.AsyncClient(base_url=sim.base_url, timeout=10) as client:
                response = await client.post("/v1/authorize", data=CREDS)
                headers = {
                    "Authorization": f"Bearer {response.json()['access_token']}",
                    "x-api-key": CREDS["client_secret"],
                }

                async def ask(delay: float) -> None:
                    await asyncio.sleep(delay)
                    answer = await client.get(
                        STATUS_PATH, params={"request_id": "a"}, headers=headers
                    )
                    assert answer.status_code == 200

                async def reset(delay: float) -> None:
                    await asyncio.sleep(delay)
                    await client.post("/_sim/reset")

                # Call 1 starts, the reset comes, call 2 starts (alone in the new count),
                # call 1 ends, call 3 starts while call 2 is still in flight: one overlap.
                # (Call 1 is counted as a status call after its latency, so after the reset.)
                await asyncio.gather(ask(0), reset(0.15), ask(0.3), ask(0.65))

        asyncio.run(main())
        stats = sim.stats()
    assert stats["status_calls"] == {"a": 3}
    assert stats["overlapping_by_id"] == {"a": 1}
    assert stats["overlapping_status_calls"] == 1


# --------------------------------------------------------------------------- hostile hosts (issue 10)


def test_etag_is_the_content_md5_as_s3_gives_it_for_a_single_part_object(
    client: httpx.Client,
) -> None:
    url = completed_url(client, auth_headers(client), "dl-md5")
    response = client.get(url)
    assert response.headers["etag"] == f'"{hashlib.md5(response.content).hexdigest()}"'
    assert response.headers["etag"] == f'"{expected_md5("dl-md5", 200_000)}"'


def test_a_file_above_the_multipart_threshold_has_a_multipart_etag() -> None:
    config = SimulatorConfig(completion_delay=0, big_file_size=MULTIPART_THRESHOLD + 1)
    with running_simulator(config) as sim, httpx.Client(base_url=sim.base_url) as client:
        url = completed_url(client, auth_headers(client), "big-1")
        etag = client.head(url).headers["etag"]
    assert re.fullmatch(r'"[0-9a-f]{32}-9"', etag), etag


def test_badetag_prefix_serves_an_md5_etag_the_bytes_do_not_have(client: httpx.Client) -> None:
    response = client.get(completed_url(client, auth_headers(client), "badetag-1"))
    assert re.fullmatch(r'"[0-9a-f]{32}"', response.headers["etag"])
    assert response.headers["etag"] != f'"{hashlib.md5(response.content).hexdigest()}"'
    assert hashlib.sha256(response.content).hexdigest() == expected_sha256("badetag-1", 200_000)


def raw_get(url: str) -> tuple[bytes, bytes]:
    """The head and body of a GET, read off the socket until the server closes it."""
    import socket

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        target = f"{parts.path}?{parts.query}"
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def test_unframed_prefix_sends_no_length_and_no_chunks_and_sometimes_stops_early(
    client: httpx.Client,
) -> None:
    full = b"".join(output_bytes("unframed-1", 200_000))
    headers = auth_headers(client)
    url = completed_url(client, headers, "unframed-1")
    bodies = []
    for _ in range(12):
        head, body = raw_get(url)
        lowered = head.lower()
        assert b"content-length" not in lowered
        assert b"transfer-encoding" not in lowered
        assert b"etag:" in lowered
        assert full.startswith(body)
        bodies.append(len(body))
    assert len(full) in bodies  # some are complete
    assert min(bodies) < len(full)  # and some stop early
    # A Range answer is framed as usual.
    etag = client.head(url).headers["etag"]
    tail = client.get(url, headers={"Range": "bytes=1000-", "If-Range": etag})
    assert tail.status_code == 206
    assert int(tail.headers["content-length"]) == len(full) - 1000


def test_unframed_noetag_prefix_has_no_etag(client: httpx.Client) -> None:
    head, _ = raw_get(completed_url(client, auth_headers(client), "unframed-noetag-1"))
    assert b"etag:" not in head.lower()


def test_endless_prefix_never_ends_the_file(client: httpx.Client) -> None:
    url = completed_url(client, auth_headers(client), "endless-1")
    received = 0
    with client.stream("GET", url) as response:
        assert response.headers["transfer-encoding"] == "chunked"
        for chunk in response.iter_raw():
            received += len(chunk)
            if received > 5_000_000:
                break
    assert received > 5_000_000 > expected_size("endless-1", FAST)


def test_huge_prefix_streams_a_padded_envelope_of_huge_answer_size() -> None:
    config = SimulatorConfig(huge_answer_size=3_000_000)
    with running_simulator(config) as sim, httpx.Client(base_url=sim.base_url) as client:
        response = status(client, auth_headers(client), "huge-1")
        assert sim.stats()["errors_served"] == 1
    assert response.status_code == 200
    assert len(response.content) == 3_000_000
    assert response.json()["data"]["batch_output_file_url"] is None


def test_gzipbomb_prefix_is_small_on_the_wire_and_inflates_to_gzip_bomb_size() -> None:
    config = SimulatorConfig(gzip_bomb_size=20_000_000)
    with running_simulator(config) as sim, httpx.Client(base_url=sim.base_url) as client:
        with client.stream(
            "GET", STATUS_PATH, params={"request_id": "gzipbomb-1"}, headers=auth_headers(client)
        ) as response:
            wire = b"".join(response.iter_raw())
        assert sim.stats()["errors_served"] == 1
    assert response.headers["content-encoding"] == "gzip"
    assert len(wire) < 100_000
    inflated = gzip.decompress(wire)
    assert len(inflated) == 20_000_000
    assert json.loads(inflated)["code"] == 200


# --------------------------------------------------------------------------- webhooks


class Receiver:
    """A little aiohttp server on loopback, on its own thread, recording every POST."""

    def __init__(self, answer_after: float = 0.0, status: int = 200) -> None:
        self.answer_after = answer_after
        self.status = status
        self.deliveries: list[tuple[str, bytes, float]] = []
        self.url = ""
        self._lock = threading.Lock()

    async def _record(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._lock:
            self.deliveries.append((request.path, body, time.monotonic()))
        if self.answer_after:
            await asyncio.sleep(self.answer_after)
        return web.Response(status=self.status, text="ok")

    def received(self) -> list[tuple[str, bytes, float]]:
        with self._lock:
            return list(self.deliveries)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[tuple[str, bytes, float]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(got := self.received()) >= count:
                return got
            time.sleep(0.02)
        raise AssertionError(f"{len(self.received())} deliveries, expected {count}")


@contextmanager
def running_receiver(answer_after: float = 0.0, status: int = 200) -> Iterator[Receiver]:
    receiver = Receiver(answer_after, status)
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", receiver._record)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        receiver.url = f"http://127.0.0.1:{port}/hooks/deepvue/s3cret"
        ready.set()
        await stop.wait()
        await runner.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield receiver
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as handle:
        yield handle


def hooked(receiver: Receiver, **knobs: Any) -> SimulatorConfig:
    return dataclasses.replace(FAST, webhook_url=receiver.url, **knobs)


def test_completion_fires_one_webhook_with_the_id(receiver: Receiver) -> None:
    with running_simulator(hooked(receiver)) as sim, httpx.Client(base_url=sim.base_url) as c:
        headers = auth_headers(c)
        started = time.monotonic()
        assert status(c, headers, "hook-1").json()["data"]["status"] == 201
        [(path, body, at)] = receiver.wait_for(1)
        # Sent at the moment of completion, with no further status call.
        assert at - started >= FAST.completion_delay
        assert sim.stats()["status_calls"] == {"hook-1": 1}
        assert path == "/hooks/deepvue/s3cret"
        delivered = json.loads(body)
        assert delivered["request_id"] == "hook-1"
        assert delivered["status"] == "completed"
        assert delivered["data"]["request_id"] == "hook-1"
        # And the status call agrees: it is completed now.
        assert status(c, headers, "hook-1").json()["data"]["status"] == 200
        time.sleep(0.3)
        assert len(receiver.received()) == 1
        stats = sim.stats()
        assert stats["webhooks_sent"] == 1
        assert stats["webhooks_dropped"] == 0
        assert stats["webhook_failures"] == 0
        assert stats["webhooks_by_id"] == {"hook-1": {"sent": 1, "dropped": 0, "failures": 0}}


def test_failed_batches_get_a_failed_webhook_and_never_finishing_ones_none(
    receiver: Receiver,
) -> None:
    with running_simulator(hooked(receiver)) as sim, httpx.Client(base_url=sim.base_url) as c:
        headers = auth_headers(c)
        for request_id in ("fail-1", "invalid-1", "missing-1", "ratelimit-1"):
            status(c, headers, request_id)
        [(_, body, _)] = receiver.wait_for(1)
        assert json.loads(body)["status"] == "failed"
        time.sleep(0.4)
        assert len(receiver.received()) == 1


def test_no_webhook_without_a_url(receiver: Receiver, client: httpx.Client) -> None:
    headers = auth_headers(client)
    completed_url(client, headers, "plain-1")
    time.sleep(0.2)
    assert receiver.received() == []


def test_webhook_registered_per_id_or_for_all_through_the_hook(receiver: Receiver) -> None:
    with running_simulator(FAST) as sim, httpx.Client(base_url=sim.base_url) as c:
        headers = auth_headers(c)
        only = c.post("/_sim/webhooks", json={"url": receiver.url + "/one", "request_id": "a-1"})
        assert only.status_code == 200
        status(c, headers, "a-1")
        status(c, headers, "b-1")
        [(path, body, _)] = receiver.wait_for(1)
        assert path.endswith("/one")
        assert json.loads(body)["request_id"] == "a-1"
        time.sleep(0.3)
        assert len(receiver.received()) == 1
        assert c.post("/_sim/webhooks", json={"url": receiver.url}).status_code == 200
        status(c, headers, "c-1")
        receiver.wait_for(2)
        assert json.loads(receiver.received()[1][1])["request_id"] == "c-1"
        # A reset forgets the registrations.
        c.post("/_sim/reset")
        status(c, headers, "d-1")
        time.sleep(0.4)
        assert len(receiver.received()) == 2
        assert c.post("/_sim/webhooks", json={"nope": 1}).status_code == 400


def test_submit_with_webhook_url_query_parameter(receiver: Receiver, client: httpx.Client) -> None:
    headers = auth_headers(client)
    response = client.post(
        "/v1/verification/upi-basic/batch",
        params={"webhook_url": receiver.url},
        headers=headers,
        files={"batch_file": ("in.csv", b"vpa\nx@upi\n", "text/csv")},
    )
    assert response.status_code == 200
    request_id = response.json()["request_id"]
    status(client, headers, request_id)
    [(_, body, _)] = receiver.wait_for(1)
    assert json.loads(body)["request_id"] == request_id


def test_drop_rate_one_sends_none(receiver: Receiver) -> None:
    config = hooked(receiver, webhook_drop_rate=1.0)
    with running_simulator(config) as sim, httpx.Client(base_url=sim.base_url) as c:
        headers = auth_headers(c)
        for n in range(3):
            status(c, headers, f"drop-{n}")
        completed_url(c, headers, "drop-0")
        time.sleep(0.3)
        assert receiver.received() == []
        stats = sim.stats()
        assert stats["webhooks_dropped"] == 3
        assert stats["webhooks_sent"] == 0


def test_duplicates_three_sends_three(receiver: Receiver) -> None:
    config = hooked(receiver, webhook_duplicates=3)
    with running_simulator(config) as sim, httpx.Client(base_url=sim.base_url) as c:
        status(c, auth_headers(c), "dup-1")
        got = receiver.wait_for(3)
        time.sleep(0.3)
        assert len(receiver.received()) == 3
        assert {json.loads(body)["request_id"] for _, body, _ in got} == {"dup-1"}
        assert sim.stats()["webhooks_sent"] == 3


def test_delay_range_holds_the_webhook_back(receiver: Receiver) -> None:
    config = hooked(receiver, webhook_delay=(0.5, 0.6))
    with running_simulator(config) as sim, httpx.Client(base_url=sim.base_url) as c:
        started = time.monotonic()
        status(c, auth_headers(c), "late-1")
        [(_, _, at)] = receiver.wait_for(1)
        assert at - started >= FAST.completion_delay + 0.5


def test_garbage_rate_one_sends_non_json(receiver: Receiver) -> None:
    config = hooked(receiver, webhook_garbage_rate=1.0, webhook_duplicates=2)
    with running_simulator(config) as sim, httpx.Client(base_url=sim.base_url) as c:
        status(c, auth_headers(c), "junk-1")
        got = receiver.wait_for(2)
        for _, body, _ in got:
            with pytest.raises(ValueError):
                json.loads(body)
        assert got[0][1] != got[1][1]


def test_wrong_secret_alters_the_last_path_segment(receiver: Receiver) -> None:
    config = hooked(receiver, webhook_wrong_secret_rate=1.0)
    with running_simulator(config) as sim, httpx.Client(base_url=sim.base_url) as c:
        status(c, auth_headers(c), "wrong-1")
        [(path, body, _)] = receiver.wait_for(1)
        assert path.startswith("/hooks/deepvue/")
        secret = path.rsplit("/", 1)[1]
        assert secret != "s3cret"
        assert len(secret) == len("s3cret")
        assert json.loads(body)["request_id"] == "wrong-1"


def test_receiver_errors_count_as_failures() -> None:
    with ExitStack() as stack:
        receiver = stack.enter_context(running_receiver(status=404))
        sim = stack.enter_context(running_simulator(hooked(receiver)))
        c = stack.enter_context(httpx.Client(base_url=sim.base_url))
        status(c, auth_headers(c), "nf-1")
        receiver.wait_for(1)
        deadline = time.monotonic() + 5
        while sim.stats()["webhook_failures"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sim.stats()["webhooks_by_id"]["nf-1"] == {"sent": 1, "dropped": 0, "failures": 1}


def test_a_slow_receiver_never_delays_the_api() -> None:
    with ExitStack() as stack:
        receiver = stack.enter_context(running_receiver(answer_after=3.0))
        sim = stack.enter_context(running_simulator(hooked(receiver, webhook_duplicates=3)))
        c = stack.enter_context(httpx.Client(base_url=sim.base_url))
        headers = auth_headers(c)
        status(c, headers, "busy-1")
        receiver.wait_for(1)
        # The receiver now holds the first delivery for seconds; the API answers at once.
        started = time.monotonic()
        for _ in range(5):
            assert status(c, headers, "busy-1").json()["data"]["status"] == 200
        assert c.get("/_sim/stats").status_code == 200
        assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/hook/secret",
        "http://10.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://user:pass@127.0.0.1/hook",
        "file:///etc/passwd",
        "http://127.0.0.1.nip.io/hook",
    ],
)
def test_non_loopback_webhook_urls_are_refused(url: str, client: httpx.Client) -> None:
    headers = auth_headers(client)
    refused = client.post("/_sim/webhooks", json={"url": url})
    assert refused.status_code == 400
    upload = client.post(
        "/v1/verification/upi-basic/batch",
        params={"webhook_url": url},
        headers=headers,
        files={"batch_file": ("in.csv", b"x\n", "text/csv")},
    )
    assert upload.status_code == 422
    assert client.get("/_sim/stats").json()["webhooks_refused"] == 2
    with (
        pytest.raises(ValueError, match="webhook"),
        running_simulator(dataclasses.replace(FAST, webhook_url=url)),
    ):
        pass


def test_fake_api_webhook_flags(receiver: Receiver) -> None:
    api = start_fake_api(
        *("--completion-delay", "0.2", "--webhook-url", receiver.url),
        *("--webhook-delay", "0.1:0.2", "--webhook-duplicates", "2"),
        *("--webhook-wrong-secret-rate", "1", "--webhook-garbage-rate", "1"),
    )
    proc = api.process
    try:
        with httpx.Client(base_url=api.url) as c:
            status(c, auth_headers(c), "cli-1")
            got = receiver.wait_for(2, timeout=10)
        assert all(not path.endswith("/s3cret") for path, _, _ in got)
        for _, body, _ in got:
            with pytest.raises(ValueError):
                json.loads(body)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0


def test_webhook_drops_are_seeded_and_reproducible(receiver: Receiver) -> None:
    def dropped_ids(seed: int) -> set[str]:
        config = hooked(receiver, webhook_drop_rate=0.5, seed=seed)
        with running_simulator(config) as sim, httpx.Client(base_url=sim.base_url) as c:
            headers = auth_headers(c)
            for n in range(20):
                status(c, headers, f"seeded-{n}")
            by_id = sim.stats()["webhooks_by_id"]
            return {key for key, counts in by_id.items() if counts["dropped"]}

    first = dropped_ids(7)
    assert 0 < len(first) < 20
    assert dropped_ids(7) == first
    assert dropped_ids(8) != first
