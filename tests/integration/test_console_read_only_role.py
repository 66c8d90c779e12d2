"""A read-only console needs only SELECT on PostgreSQL, as the README says; its actions need
more, and a role without it gets an error page, not a changed batch."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestClient, TestServer

from tests.databases import pg_admin_engine
from tracker.budget import DatabaseBudget
from tracker.console.app import console_app
from tracker.console.queries import ConsoleQueries
from tracker.db import create_engine_for
from tracker.domain.quota import plan_windows
from tracker.schema import batches
from tracker.store import Store

pytestmark = pytest.mark.postgres

TOKEN = "read-only-console-token-1"


@pytest.fixture
def select_only_url(pg_url: str) -> Iterator[str]:
    """`pg_url` as a new role that may only SELECT (the server trusts loopback logins)."""
    role = f"tracker_ro_{uuid.uuid4().hex[:10]}"
    database = sa.make_url(pg_url).database
    admin = pg_admin_engine()
    with admin.connect() as connection:
        connection.execute(sa.text(f"CREATE ROLE {role} LOGIN"))
    owner = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with owner.connect() as connection:
        connection.execute(sa.text(f"GRANT USAGE ON SCHEMA public TO {role}"))
        connection.execute(sa.text(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"))
    yield sa.make_url(pg_url).set(username=role).render_as_string(hide_password=False)
    with owner.connect() as connection:
        connection.execute(sa.text(f"DROP OWNED BY {role}"))
    owner.dispose()
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        connection.execute(sa.text(f"DROP ROLE {role}"))
    admin.dispose()


def test_every_page_reads_with_select_alone_and_an_action_changes_nothing(
    pg_url: str, select_only_url: str
) -> None:
    writer = Store(create_engine_for(pg_url))
    writer.enqueue("ro-1", label="nightly")
    with writer.engine.begin() as connection:
        connection.execute(batches.update().values(state="failed", finished_at=datetime.now(UTC)))
    engine = create_engine_for(select_only_url)
    queries = ConsoleQueries(
        Store(engine), DatabaseBudget(engine, plan_windows(1, 30, 1000)), heartbeat_timeout=30
    )
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    statuses: dict[str, int] = {}
    messages: list[str] = []

    async def run() -> None:
        app = console_app(queries, token=TOKEN, allow_actions=True)
        async with TestClient(TestServer(app)) as client:
            for path in ("/", "/batches", "/batches?label=nightly&state=failed", "/batches/ro-1"):
                statuses[path] = (await client.get(path, headers=bearer)).status
            page = await (await client.get("/batches/ro-1", headers=bearer)).text()
            csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
            retried = await client.post("/batches/ro-1/retry", data={"csrf": csrf}, headers=bearer)
            statuses["retry"] = retried.status
            messages.append(await retried.text())

    try:
        asyncio.run(run())
        assert writer.get("ro-1").state == "failed"  # type: ignore[union-attr]
    finally:
        engine.dispose()
        writer.engine.dispose()
    assert statuses.pop("retry") == 500
    assert "The database refused" in messages[0] and "permission denied" in messages[0]
    assert "UPDATE" not in messages[0], "no SQL on the page"
    assert set(statuses.values()) == {200}, statuses
