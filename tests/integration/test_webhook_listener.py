"""The webhook listener on a real loopback server, bringing checks forward in a real store."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from tracker.db import create_engine_for, upgrade_database
from tracker.schema import batches
from tracker.store import BatchRow, Store
from tracker.webhook import webhook_app

SECRET = "hook-secret-4f9a2c"
PATH = f"/webhook/{SECRET}"
SPACING = 30.0
MAX_BODY = 4096
A = "0f3c2b1a9d8e7f6a5b4c3d2e1f0a9b8c"
B = "sim-000042"
C = "sim-000043"

Scenario = Callable[[TestClient[Any, Any]], Awaitable[None]]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    engine = create_engine_for(f"sqlite:///{tmp_path}/tracker.db")
    upgrade_database(engine)
    store = Store(engine)
    later = datetime.now(UTC) + timedelta(hours=1)
    store.enqueue_many([A, B, C, "done-1"])
    with engine.begin() as connection:
        connection.execute(batches.update().values(next_check_at=later))
        connection.execute(
            batches.update()
            .where(batches.c.request_id == "done-1")
            .values(state="downloaded", next_check_at=None, finished_at=later)
        )
    return store


class Listener:
    """The app under test, with what it asked of the store and what it counted."""

    def __init__(
        self,
        store: Store,
        *,
        fail: bool = False,
        refusal_log_interval: float = 60.0,
        unmatched_log_interval: float = 1.0,
    ) -> None:
        self.store = store
        self.fail = fail
        self.refusal_log_interval = refusal_log_interval
        self.unmatched_log_interval = unmatched_log_interval
        self.asked: list[set[str]] = []
        self.outcomes: list[str] = []

    async def bring_forward(self, request_ids: set[str]) -> set[str]:
        self.asked.append(request_ids)
        if self.fail:
            raise sa.exc.OperationalError("UPDATE", {}, Exception("database is locked"))
        now = datetime.now(UTC)
        return await asyncio.to_thread(self.store.bring_forward, request_ids, now, SPACING)

    def app(self) -> web.Application:
        return webhook_app(
            SECRET,
            bring_forward=self.bring_forward,
            max_body=MAX_BODY,
            on_outcome=self.outcomes.append,
            refusal_log_interval=self.refusal_log_interval,
            unmatched_log_interval=self.unmatched_log_interval,
        )

    def serve(self, scenario: Scenario) -> None:
        async def run() -> None:
            async with TestClient(TestServer(self.app())) as client:
                await scenario(client)

        asyncio.run(run())


def _rows(store: Store) -> dict[str, BatchRow]:
    return {row.request_id: row for row in store.list_batches()}


def _moved(before: dict[str, BatchRow], after: dict[str, BatchRow]) -> set[str]:
    return {rid for rid in before if before[rid] != after[rid]}


def test_a_wrong_or_missing_secret_is_a_404_and_costs_nothing(store: Store) -> None:
    listener = Listener(store)
    before = _rows(store)
    statuses: list[int] = []

    async def scenario(client: TestClient[Any, Any]) -> None:
        body = json.dumps([A, B]).encode()
        for method, path in (
            ("POST", "/webhook/wrong"),
            ("POST", f"/webhook/{SECRET}x"),
            ("POST", f"/webhook/{SECRET[:-1]}"),
            ("POST", "/webhook/"),
            ("POST", "/webhook"),
            ("GET", f"/webhook/wrong?id={A}"),
            ("PUT", "/webhook/wrong"),
            ("POST", f"/other/{SECRET}"),
        ):
            response = await client.request(method, path, data=body)
            statuses.append(response.status)

    listener.serve(scenario)
    assert statuses == [404] * 8
    assert listener.asked == []
    assert _rows(store) == before
    assert listener.outcomes == ["refused"] * 5  # the other three matched no route at all


def test_json_form_and_query_deliveries_move_exactly_the_batches_they_name(store: Store) -> None:
    listener = Listener(store)
    answers: list[tuple[int, Any]] = []
    moves: list[set[str]] = []

    async def deliver(client: TestClient[Any, Any], **request: Any) -> None:
        before = _rows(store)
        method = request.pop("method", "POST")
        response = await client.request(method, PATH, **request)
        answers.append((response.status, await response.json()))
        moves.append(_moved(before, _rows(store)))

    async def scenario(client: TestClient[Any, Any]) -> None:
        await deliver(client, json={"event": "completed", "data": {"ids": [[A]]}})
        await deliver(
            client,
            data=f"request_id={B}&status=done",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        await deliver(client, method="GET", params={"request_id": C})
        # All three were brought forward within the spacing: nothing moves again.
        await deliver(client, json=[A, B, C])

    listener.serve(scenario)
    assert answers == [
        (200, {"matched": 1}),
        (200, {"matched": 1}),
        (200, {"matched": 1}),
        (200, {"matched": 0}),
    ]
    assert moves == [{A}, {B}, {C}, set()]
    assert listener.outcomes == ["matched", "matched", "matched", "unmatched"]
    rows = _rows(store)
    for rid in (A, B, C):
        row = rows[rid]
        assert row.next_check_at is not None and row.next_check_at == row.hinted_at
        assert (row.state, row.checks, row.lease_owner) == ("pending", 0, None)


def test_many_deliveries_for_a_finished_batch_move_nothing(store: Store) -> None:
    listener = Listener(store)
    before = _rows(store)
    answers: list[tuple[int, Any]] = []

    async def scenario(client: TestClient[Any, Any]) -> None:
        for _ in range(200):
            response = await client.post(PATH, json={"request_id": "done-1", "status": "done"})
            answers.append((response.status, await response.json()))

    listener.serve(scenario)
    assert answers == [(200, {"matched": 0})] * 200
    assert listener.outcomes == ["unmatched"] * 200
    assert _rows(store) == before


def test_unreadable_bodies_get_a_200(store: Store) -> None:
    listener = Listener(store)
    before = _rows(store)
    answers: list[tuple[int, Any]] = []

    async def scenario(client: TestClient[Any, Any]) -> None:
        for body in (b"", b"\xff\xfe\x00", b"{" * 2000, b"not json at all"):
            response = await client.post(
                PATH, data=body, headers={"Content-Type": "application/json"}
            )
            answers.append((response.status, await response.json()))

    listener.serve(scenario)
    assert answers == [(200, {"matched": 0})] * 4
    assert _rows(store) == before


def test_a_body_over_the_cap_is_a_413(store: Store) -> None:
    listener = Listener(store)
    before = _rows(store)
    statuses: list[int] = []
    big = json.dumps([A] + ["x" * 100] * 100).encode()
    assert len(big) > MAX_BODY

    async def chunks() -> AsyncIterator[bytes]:
        # Chunked, without a Content-Length: the cap is found while reading.
        for start in range(0, len(big), 512):
            yield big[start : start + 512]

    async def scenario(client: TestClient[Any, Any]) -> None:
        statuses.append((await client.post(PATH, data=big)).status)
        statuses.append((await client.post(PATH, data=chunks())).status)
        statuses.append((await client.post(PATH, data=b"x" * MAX_BODY)).status)

    listener.serve(scenario)
    assert statuses == [413, 413, 200]
    assert listener.outcomes == ["too_large", "too_large", "unmatched"]
    assert listener.asked == []  # nothing id-shaped in the last one: no database work
    assert _rows(store) == before


def test_a_store_failure_is_a_503(store: Store) -> None:
    listener = Listener(store, fail=True)
    statuses: list[int] = []

    async def scenario(client: TestClient[Any, Any]) -> None:
        statuses.append((await client.post(PATH, json=[A])).status)

    listener.serve(scenario)
    assert statuses == [503]
    assert listener.outcomes == ["failed"]


def test_another_method_with_the_right_secret_is_a_405(store: Store) -> None:
    listener = Listener(store)
    statuses: list[int] = []

    async def scenario(client: TestClient[Any, Any]) -> None:
        statuses.append((await client.put(PATH, json=[A])).status)

    listener.serve(scenario)
    assert statuses == [405]
    assert listener.asked == []


def test_the_secret_is_in_no_log_line(store: Store) -> None:
    listener = Listener(store)

    async def scenario(client: TestClient[Any, Any]) -> None:
        echo = {"request_id": A, "callback": f"https://me.example{PATH}", "secret": SECRET}
        await client.post(PATH, json=echo)
        await client.post(f"{PATH}?request_id={B}&token={SECRET}", data=f"x={SECRET}")
        await client.post(f"/webhook/{SECRET}-wrong", json=echo)
        await client.post(PATH, data=b"y" * (MAX_BODY + 1))

    with capture_logs() as logs:
        listener.serve(scenario)
    events = [entry["event"] for entry in logs]
    assert events.count("webhook.delivery") == 2
    assert {"webhook.refused", "webhook.too_large"} <= set(events)
    delivery = next(entry for entry in logs if entry["event"] == "webhook.delivery")
    assert delivery["matched"] == [A] and delivery["outcome"] == "matched"
    assert A in delivery["preview"]
    for entry in logs:
        assert SECRET not in repr(entry), entry


def test_a_flood_of_wrong_secrets_is_not_a_flood_of_log_lines(store: Store) -> None:
    listener = Listener(store, refusal_log_interval=0.5)

    async def scenario(client: TestClient[Any, Any]) -> None:
        for _ in range(50):
            assert (await client.post("/webhook/guess", json=[A])).status == 404
        await asyncio.sleep(0.6)
        assert (await client.post("/webhook/guess", json=[A])).status == 404

    with capture_logs() as logs:
        listener.serve(scenario)
    refused = [entry for entry in logs if entry["event"] == "webhook.refused"]
    # The first at once; the rest told by the next line, with their count.
    assert [entry["refused"] for entry in refused] == [1, 50]
    assert listener.outcomes == ["refused"] * 51


def test_unmatched_deliveries_are_sampled_and_matched_ones_all_logged(store: Store) -> None:
    """Unmatched ones show the payload's shape; a flood of them is a line a second."""
    listener = Listener(store, unmatched_log_interval=0.5)

    async def scenario(client: TestClient[Any, Any]) -> None:
        for n in range(20):
            assert (await client.post(PATH, json={"id": f"unknown-{n}"})).status == 200
        assert (await client.post(PATH, json={"id": A})).status == 200
        await asyncio.sleep(0.6)
        assert (await client.post(PATH, json={"id": "unknown-last"})).status == 200

    with capture_logs() as logs:
        listener.serve(scenario)
    lines = [
        (entry["outcome"], entry["deliveries"], entry["preview"])
        for entry in logs
        if entry["event"] == "webhook.delivery"
    ]
    assert [(outcome, count) for outcome, count, _ in lines] == [
        ("unmatched", 1),
        ("matched", 1),
        ("unmatched", 20),
    ]
    assert "unknown-0" in lines[0][2] and "unknown-last" in lines[2][2]
    assert listener.outcomes == ["unmatched"] * 20 + ["matched", "unmatched"]


def test_an_empty_secret_is_refused() -> None:
    async def nothing(_ids: set[str]) -> set[str]:
        return set()

    with pytest.raises(ValueError, match="secret"):
        webhook_app("", bring_forward=nothing, max_body=MAX_BODY, on_outcome=None)


def test_a_wrong_secret_answers_without_waiting_for_the_body(store: Store) -> None:
    """The body is not read first: a sender that never finishes its body still gets its
    404 at once."""
    listener = Listener(store)
    statuses: list[int] = []

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b'["' + A.encode() + b'"]'
            await asyncio.sleep(0.05)

    async def scenario(client: TestClient[Any, Any]) -> None:
        async with asyncio.timeout(5):
            response = await client.post("/webhook/wrong", data=endless())
            statuses.append(response.status)

    listener.serve(scenario)
    assert statuses == [404]
    assert listener.asked == []
