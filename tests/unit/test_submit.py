"""Uploading a UPI batch file: the documented endpoint, form field and answer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.fake_deepvue import API_BASE, FakeDeepvue
from tracker.budget import MemoryBudget, Throttle
from tracker.deepvue import AuthFailed, DeepvueClient, SubmitFailed
from tracker.domain.quota import plan_windows

SECRET = "s3cr3t-value"


def make_client(fake: FakeDeepvue) -> tuple[DeepvueClient, MemoryBudget]:
    budget = MemoryBudget(plan_windows(10, 100, 1000))
    client = DeepvueClient(
        httpx.AsyncClient(transport=fake.transport()),
        base_url=API_BASE,
        client_id="me",
        read_secret=lambda: SECRET,
        throttle=Throttle(budget),
    )
    return client, budget


def test_submit_uploads_the_file_and_returns_the_request_id(tmp_path: Path) -> None:
    batch = tmp_path / "upi.csv"
    batch.write_text("vpa\nname@upi\n")
    fake = FakeDeepvue()
    fake.submit_override = lambda request: httpx.Response(
        200,
        json={
            "code": 201,
            "request_id": "abc123",
            "message": "batch processing in progress",
            "sub_code": "SUCCESS",
            "output_batch_file": "",
        },
    )

    client, budget = make_client(fake)
    assert asyncio.run(client.submit_upi_batch(batch)) == "abc123"
    [upload] = fake.uploads
    assert upload.method == "POST"
    assert upload.url.path == "/v1/verification/upi-basic/batch"
    assert upload.headers["x-api-key"] == SECRET
    assert upload.headers["authorization"] == "Bearer token-1"
    body = upload.read()
    assert b'name="batch_file"; filename="upi.csv"' in body
    assert b"name@upi" in body
    # The upload drew on the same call budget as status calls.
    assert asyncio.run(budget.usage())["day"] == (1, 1000)


def test_submit_refused_says_why_without_secrets(tmp_path: Path) -> None:
    batch = tmp_path / "upi.csv"
    batch.write_text("x\n")
    fake = FakeDeepvue()
    fake.submit_override = lambda request: httpx.Response(
        422, json={"detail": f"bad file for key {SECRET}"}
    )

    client, _ = make_client(fake)
    with pytest.raises(SubmitFailed) as raised:
        asyncio.run(client.submit_upi_batch(batch))
    assert "HTTP 422" in str(raised.value)
    assert "bad file" in str(raised.value)
    assert SECRET not in str(raised.value)


def test_submit_with_refused_credentials(tmp_path: Path) -> None:
    batch = tmp_path / "upi.csv"
    batch.write_text("x\n")
    fake = FakeDeepvue()
    fake.reject_all_tokens = True

    client, _ = make_client(fake)
    with pytest.raises(AuthFailed):
        asyncio.run(client.submit_upi_batch(batch))
    assert fake.authorizations == 2  # re-authorized once, then gave up


def test_submit_without_webhook_sends_no_webhook_url(tmp_path: Path) -> None:
    batch = tmp_path / "upi.csv"
    batch.write_text("vpa\nname@upi\n")
    fake = FakeDeepvue()

    client, _ = make_client(fake)
    assert asyncio.run(client.submit_upi_batch(batch)) == "submitted-1"
    assert fake.submitted_webhook_urls == [None]
    assert "webhook_url" not in fake.uploads[0].url.query.decode()


def test_submit_passes_the_webhook_url_as_a_query_parameter(tmp_path: Path) -> None:
    batch = tmp_path / "upi.csv"
    batch.write_text("vpa\nname@upi\n")
    fake = FakeDeepvue()
    hook = "https://tracker.example.com/webhooks/deepvue/s3cr3t?x=1&y=a b"

    client, _ = make_client(fake)
    assert asyncio.run(client.submit_upi_batch(batch, webhook_url=hook)) == "submitted-1"
    # Exactly as given, percent-encoded on the wire; the file is still the form field.
    assert fake.submitted_webhook_urls == [hook]
    [upload] = fake.uploads
    assert upload.url.path == "/v1/verification/upi-basic/batch"
    assert b'name="batch_file"; filename="upi.csv"' in upload.read()


def test_submit_keeps_the_webhook_url_when_it_re_authorizes(tmp_path: Path) -> None:
    batch = tmp_path / "upi.csv"
    batch.write_text("x\n")
    fake = FakeDeepvue()
    answers = iter([httpx.Response(401, json={"detail": "Not a valid token"})])
    fake.submit_override = lambda request: next(
        answers, httpx.Response(200, json={"code": 201, "request_id": "after-reauth"})
    )

    client, _ = make_client(fake)
    hook = "http://127.0.0.1:9/hook/secret"
    assert asyncio.run(client.submit_upi_batch(batch, webhook_url=hook)) == "after-reauth"
    assert fake.submitted_webhook_urls == [hook, hook]
    assert fake.authorizations == 2
