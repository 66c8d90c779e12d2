"""The console on a real loopback server over a real store, on SQLite and PostgreSQL.

aiohttp's TestServer serves the very application `tracker web` serves; the requests are
real HTTP. Only the browser is missing: the browser tests drive one.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from tracker.budget import DatabaseBudget
from tracker.console.app import CONTENT_SECURITY_POLICY, console_app
from tracker.console.auth import SESSION_COOKIE
from tracker.console.queries import PAGE_SIZE, ConsoleQueries
from tracker.db import create_engine_for
from tracker.domain.quota import plan_windows
from tracker.schema import batches, transitions
from tracker.store import Store

TOKEN = "console-token-" + "7f3a9c2e1b4d"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
HTML = {"Accept": "text/html,application/xhtml+xml"}
SCRIPT_LABEL = "<script>alert(1)</script>"
SIGNATURE = "d41d8cd98f00b204e9800998ecf8427e5c0ffee"
PRESIGNED = (
    "https://bucket.s3.ap-south-1.amazonaws.com/out/batch.csv"
    f"?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature={SIGNATURE}"
)

Client = TestClient[Any, Any]
Scenario = Callable[[Client], Awaitable[None]]


class Console:
    """A store with some batches, and the console app over it."""

    def __init__(self, database_url: str) -> None:
        self.engine = create_engine_for(database_url)
        self.store = Store(self.engine)
        self.budget = DatabaseBudget(self.engine, plan_windows(2, 100, 10000))

    def app(self, *, allow_actions: bool = False) -> Any:
        queries = ConsoleQueries(self.store, self.budget, heartbeat_timeout=30.0)
        return console_app(queries, token=TOKEN, allow_actions=allow_actions)

    def serve(self, scenario: Scenario, *, allow_actions: bool = False) -> None:
        async def run() -> None:
            async with TestClient(TestServer(self.app(allow_actions=allow_actions))) as client:
                await scenario(client)

        asyncio.run(run())

    def add(self, request_id: str, **values: Any) -> None:
        self.store.enqueue(request_id, label=values.pop("label", None))
        if values:
            with self.engine.begin() as connection:
                connection.execute(
                    batches.update().where(batches.c.request_id == request_id).values(**values)
                )

    def history(self, request_id: str) -> list[tuple[str, str, str | None]]:
        row = self.store.get(request_id)
        assert row is not None
        return [(t.from_state, t.to_state, t.detail) for t in self.store.history(row.id)]


@pytest.fixture
def console(database_url: str) -> Iterator[Console]:
    console = Console(database_url)
    yield console
    console.engine.dispose()


async def _text(response: ClientResponse) -> str:
    return await response.text()


def _h1(page: str) -> str:
    match = re.search(r"<h1>(.*?)</h1>", page, re.S)
    assert match is not None, page[:500]
    return match.group(1).strip()


async def _csrf(client: Client, path: str, **request: Any) -> str:
    page = await (await client.get(path, **request)).text()
    match = re.search(r'name="csrf" value="([0-9a-f]{64})"', page)
    assert match is not None, "no CSRF field on " + path
    return match.group(1)


async def _log_in(client: Client) -> ClientResponse:
    return await client.post(
        "/login", data={"token": TOKEN, "next": "/"}, allow_redirects=False, headers=HTML
    )


# --------------------------------------------------------------------------- authentication


def test_without_credentials_a_browser_goes_to_the_login_page_and_a_script_gets_401(
    console: Console,
) -> None:
    seen: dict[str, tuple[int, str | None]] = {}

    async def scenario(client: Client) -> None:
        for name, path, headers in (
            ("page", "/", HTML),
            ("filtered", "/batches?state=failed&label=x", HTML),
            ("script", "/", {}),
            ("json", "/batches", {"Accept": "application/json"}),
            ("wrong bearer", "/", {**HTML, "Authorization": "Bearer not-the-token-at-all"}),
            ("basic", "/", {**HTML, "Authorization": f"Basic {TOKEN}"}),
            ("unknown page", "/no/such/page", HTML),
            ("post", "/batches/x/retry", HTML),
        ):
            response = await client.request(
                "POST" if name == "post" else "GET", path, headers=headers, allow_redirects=False
            )
            seen[name] = (response.status, response.headers.get("Location"))
            if response.status == 401:
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
        for public in ("/login", "/static/console.css"):
            assert (await client.get(public)).status == 200

    console.serve(scenario)
    assert seen["page"] == (303, "/login")
    status, location = seen["filtered"]
    assert status == 303 and location is not None
    assert location.startswith("/login?next=")
    assert seen["unknown page"][0] == 303, "no route is revealed before logging in"
    for name in ("script", "json", "wrong bearer", "basic", "post"):
        assert seen[name][0] == 401, name


def test_the_bearer_token_opens_every_page(console: Console) -> None:
    console.add("alpha-1", label="first")
    headings: list[str] = []

    async def scenario(client: Client) -> None:
        for path in ("/", "/batches", "/batches/alpha-1"):
            response = await client.get(path, headers=BEARER)
            assert response.status == 200, path
            assert response.content_type == "text/html"
            headings.append(_h1(await response.text()))
        almost = {"Authorization": f"Bearer {TOKEN[:-1]}x"}
        assert (await client.get("/", headers=almost)).status == 401

    console.serve(scenario)
    assert headings == ["Overview", "Batches", "Batch alpha-1"]


def test_login_sets_a_session_cookie_that_is_not_the_token_and_logout_ends_it(
    console: Console,
) -> None:
    async def scenario(client: Client) -> None:
        wrong = await client.post(
            "/login", data={"token": "x" * 20}, allow_redirects=False, headers=HTML
        )
        assert wrong.status == 401
        assert "Set-Cookie" not in wrong.headers
        assert "not the console" in await wrong.text()

        response = await client.post(
            "/login",
            data={"token": TOKEN, "next": "/batches?state=pending"},
            allow_redirects=False,
            headers=HTML,
        )
        assert response.status == 303
        assert response.headers["Location"] == "/batches?state=pending"
        cookie = response.headers["Set-Cookie"]
        assert cookie.startswith(f"{SESSION_COOKIE}=")
        assert "HttpOnly" in cookie
        assert "SameSite=Strict" in cookie
        assert "Path=/" in cookie
        assert TOKEN not in cookie
        assert all(TOKEN not in value for value in response.headers.values())

        assert _h1(await (await client.get("/", headers=HTML)).text()) == "Overview"

        refused = await client.post("/logout", data={}, allow_redirects=False, headers=HTML)
        assert refused.status == 403, "logging out needs the CSRF token too"
        csrf = await _csrf(client, "/", headers=HTML)
        out = await client.post("/logout", data={"csrf": csrf}, allow_redirects=False, headers=HTML)
        assert out.status == 303 and out.headers["Location"] == "/login"
        after = await client.get("/", headers=HTML, allow_redirects=False)
        assert after.status == 303 and after.headers["Location"] == "/login"

    console.serve(scenario)


def test_a_logged_out_session_cookie_stays_dead(console: Console) -> None:
    async def scenario(client: Client) -> None:
        await _log_in(client)
        (session,) = [c.value for c in client.session.cookie_jar if c.key == SESSION_COOKIE]
        csrf = await _csrf(client, "/", headers=HTML)
        await client.post("/logout", data={"csrf": csrf}, allow_redirects=False)
        replayed = await client.get(
            "/", headers={**HTML, "Cookie": f"{SESSION_COOKIE}={session}"}, allow_redirects=False
        )
        assert replayed.status == 303
        forged = await client.get(
            "/", headers={"Cookie": f"{SESSION_COOKIE}={TOKEN}"}, allow_redirects=False
        )
        assert forged.status == 401, "the token is no session id"

    console.serve(scenario)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("/batches?state=failed", "/batches?state=failed"),
        ("/batches/abc-1", "/batches/abc-1"),
        ("//evil.example/", "/"),
        ("https://evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("javascript:alert(1)", "/"),
        ("", "/"),
    ],
)
def test_login_only_sends_the_browser_on_to_a_local_path(
    console: Console, given: str, expected: str
) -> None:
    async def scenario(client: Client) -> None:
        response = await client.post(
            "/login", data={"token": TOKEN, "next": given}, allow_redirects=False
        )
        assert response.status == 303
        assert response.headers["Location"] == expected

    console.serve(scenario)


# --------------------------------------------------------------------------- safety


def test_every_answer_carries_the_security_headers_and_pages_hold_no_inline_code(
    console: Console,
) -> None:
    console.add("beta-1")

    async def scenario(client: Client) -> None:
        answers = [
            await client.get("/", headers=BEARER),
            await client.get("/batches", headers=BEARER),
            await client.get("/batches/beta-1", headers=BEARER),
            await client.get("/batches/missing-1", headers=BEARER),
            await client.get("/batches?cursor=nonsense", headers=BEARER),
            await client.get("/", allow_redirects=False),
            await client.get("/", headers=HTML, allow_redirects=False),
            await client.get("/login"),
            await client.get("/static/console.css"),
        ]
        for response in answers:
            headers = response.headers
            assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY, response.url
            assert headers["X-Content-Type-Options"] == "nosniff"
            assert headers["Referrer-Policy"] == "no-referrer"
            if not response.url.path.startswith("/static/"):
                assert headers["Cache-Control"] == "no-store", response.url
            if response.content_type == "text/html":
                page = await response.text()
                assert "<script" not in page.lower()
                assert " style=" not in page.lower() and "<style" not in page.lower()
                assert not re.search(r"\son[a-z]+=", page), "no inline event handler"

    console.serve(scenario)
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in CONTENT_SECURITY_POLICY


def test_a_label_holding_markup_is_shown_as_text(console: Console) -> None:
    console.add("gamma-1", label=SCRIPT_LABEL, last_error='<img src=x onerror="alert(2)">')
    pages: list[str] = []

    async def scenario(client: Client) -> None:
        for path in ("/", "/batches", "/batches/gamma-1", f"/batches?label={SCRIPT_LABEL}"):
            pages.append(await (await client.get(path, headers=BEARER)).text())

    console.serve(scenario)
    overview, listing, detail, filtered = pages
    for page in (listing, detail, filtered):
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    for page in pages:
        assert SCRIPT_LABEL not in page
        assert "<img" not in page
    assert "&lt;img src=x onerror=" in overview  # the recent errors
    assert "gamma-1" in filtered, "the label filter matches the label as stored"


def test_no_presigned_query_string_or_secret_reaches_a_page(console: Console) -> None:
    console.add(
        "delta-1",
        state="failed",
        api_message=f"see {PRESIGNED}",
        last_error=f"download failed: GET {PRESIGNED} -> 403; token=eyJhbGciOi.abc.def",
        file_path="/srv/deepvue-results/delta-1.csv",
    )
    row = console.store.get("delta-1")
    assert row is not None
    with console.engine.begin() as connection:
        connection.execute(
            transitions.insert().values(
                batch_id=row.id,
                request_id="delta-1",
                from_state="pending",
                to_state="failed",
                api_status=200,
                api_message="completed",
                detail=f'raw: {{"batch_output_file_url": "{PRESIGNED}"}}',
            )
        )
    pages: list[str] = []

    async def scenario(client: Client) -> None:
        for path in ("/", "/batches", "/batches/delta-1"):
            pages.append(await (await client.get(path, headers=BEARER)).text())

    console.serve(scenario)
    for page in pages:
        assert SIGNATURE not in page
        assert "AKIAEXAMPLE" not in page
        assert "X-Amz-Credential" not in page
        assert "eyJhbGciOi" not in page
    detail = pages[2]
    assert "bucket.s3.ap-south-1.amazonaws.com/out/batch.csv?&lt;redacted&gt;" in detail
    assert "batch_output_file_url" in detail, "the raw answer is shown, redacted"


def test_a_batch_page_shows_the_file_but_never_its_contents(
    console: Console, tmp_path: Any
) -> None:
    secret_bytes = "KYC-ROW,ABCDE1234F,Jane Doe"
    output = tmp_path / "epsilon-1.csv"
    output.write_text(secret_bytes)
    console.add(
        "epsilon-1",
        state="downloaded",
        file_path=str(output),
        file_size=5_368_709,
        file_sha256="ab" * 32,
        finished_at=datetime.now(UTC),
    )
    pages: list[str] = []

    async def scenario(client: Client) -> None:
        pages.append(await (await client.get("/batches/epsilon-1", headers=BEARER)).text())
        assert (await client.get(f"/static/{output.name}", headers=BEARER)).status == 404

    console.serve(scenario)
    (page,) = pages
    assert str(output) in page
    assert "5368709 bytes (5.1 MiB)" in page
    assert "ab" * 32 in page
    assert "KYC-ROW" not in page and "ABCDE1234F" not in page


def test_an_unknown_batch_is_a_404_page(console: Console) -> None:
    async def scenario(client: Client) -> None:
        response = await client.get("/batches/never-seen", headers=BEARER)
        assert response.status == 404
        assert _h1(await response.text()) == "Not found"

    console.serve(scenario)


# --------------------------------------------------------------------------- the list


def _fill(console: Console, count: int) -> list[str]:
    """`count` batches: every third failed, every fifth labelled "nightly"."""
    ids = [f"list-{index:04d}" for index in range(count)]
    console.store.enqueue_many(ids)
    with console.engine.begin() as connection:
        for index, request_id in enumerate(ids):
            values: dict[str, Any] = {}
            if index % 3 == 0:
                values["state"] = "failed"
                values["finished_at"] = datetime.now(UTC)
            if index % 5 == 0:
                values["label"] = "nightly"
            if values:
                connection.execute(
                    batches.update().where(batches.c.request_id == request_id).values(**values)
                )
    return ids


async def _walk(client: Client, path: str) -> tuple[list[str], int]:
    """Every request id the list shows from `path` on, following the next-page links."""
    shown: list[str] = []
    pages = 0
    next_path: str | None = path
    while next_path is not None:
        response = await client.get(next_path, headers=BEARER)
        assert response.status == 200, next_path
        page = await response.text()
        pages += 1
        rows = re.findall(r'<td class="nowrap"><a href="/batches/([^"]+)">', page)
        assert len(rows) <= PAGE_SIZE
        shown += rows
        link = re.search(r'<a rel="next" href="([^"]+)">', page)
        next_path = link.group(1).replace("&amp;", "&") if link else None
        assert pages < 20
    return shown, pages


def test_the_list_pages_through_every_row_once_newest_first(console: Console) -> None:
    ids = _fill(console, 2 * PAGE_SIZE + 7)
    walked: dict[str, tuple[list[str], int]] = {}

    async def scenario(client: Client) -> None:
        walked["all"] = await _walk(client, "/batches")
        walked["failed"] = await _walk(client, "/batches?state=failed")
        walked["nightly failed"] = await _walk(client, "/batches?state=failed&label=nightly")
        walked["prefix"] = await _walk(client, "/batches?q=list-00")

    console.serve(scenario)
    everything, pages = walked["all"]
    assert everything == list(reversed(ids)) and pages == 3
    failed, pages = walked["failed"]
    assert failed == [rid for i, rid in reversed(list(enumerate(ids))) if i % 3 == 0]
    assert pages == 1
    both, _ = walked["nightly failed"]
    assert both == [rid for i, rid in reversed(list(enumerate(ids))) if i % 15 == 0]
    prefixed, _ = walked["prefix"]
    assert prefixed == [rid for rid in reversed(ids) if rid.startswith("list-00")]


def test_the_request_id_filter_is_a_literal_case_sensitive_prefix(console: Console) -> None:
    for request_id in ("abc-1", "abc_2", "abcx3", "ABC-4", "a%c-5", "a*c-6", "a[c-7", "zzz-8"):
        console.add(request_id)
    found: dict[str, list[str]] = {}

    async def scenario(client: Client) -> None:
        for prefix in ("abc", "abc_", "a%", "a*", "a[", "A", "zzz-8", "nothing"):
            response = await client.get("/batches", params={"q": prefix}, headers=BEARER)
            found[prefix] = sorted(
                re.findall(r'<td class="nowrap"><a href="/batches/([^"]+)">', await response.text())
            )

    console.serve(scenario)
    assert found["abc"] == ["abc-1", "abc_2", "abcx3"]
    assert found["abc_"] == ["abc_2"], "_ is no wildcard"
    assert found["a%"] == ["a%25c-5"], "% is no wildcard (and the link quotes it)"
    assert found["a*"] == ["a%2Ac-6"], "* is no wildcard"
    assert found["a["] == ["a%5Bc-7"]
    assert found["A"] == ["ABC-4"]
    assert found["zzz-8"] == ["zzz-8"]
    assert found["nothing"] == []


@pytest.mark.parametrize(
    "query",
    [
        "cursor=nonsense",
        "cursor=aWQ6MA",  # id:0
        "cursor=aWQ6LTU",  # id:-5
        "cursor=MTIz",  # 123 without the prefix
        "cursor=" + "A" * 100,
        "cursor=%F0%9F%92%A5",
        "state=finished",
        "label=" + "x" * 300,
    ],
)
def test_a_bad_cursor_or_filter_is_a_400_page(console: Console, query: str) -> None:
    async def scenario(client: Client) -> None:
        response = await client.get(f"/batches?{query}", headers=BEARER)
        assert response.status == 400
        assert _h1(await response.text()) == "Bad request"

    console.serve(scenario)


# --------------------------------------------------------------------------- actions


def test_without_allow_actions_there_are_no_buttons_and_a_post_is_refused(
    console: Console,
) -> None:
    console.add("zeta-1", state="failed", finished_at=datetime.now(UTC))
    before = console.history("zeta-1")

    async def scenario(client: Client) -> None:
        # Logged in, so that the page carries a valid CSRF token (in its logout form).
        await _log_in(client)
        page = await (await client.get("/batches/zeta-1", headers=HTML)).text()
        assert "Retry" not in page and "Cancel" not in page
        csrf = await _csrf(client, "/batches/zeta-1", headers=HTML)
        for verb in ("retry", "cancel"):
            response = await client.post(f"/batches/zeta-1/{verb}", data={"csrf": csrf})
            assert response.status == 403
            assert _h1(await response.text()) == "Read-only"

    console.serve(scenario)
    assert console.store.get("zeta-1").state == "failed"  # type: ignore[union-attr]
    assert console.history("zeta-1") == before


def test_retry_and_cancel_are_recorded_as_transitions_like_the_cli(console: Console) -> None:
    console.add("eta-1", state="failed", finished_at=datetime.now(UTC), last_error="boom")
    console.add("eta-2", state="processing")
    redirects: list[str] = []
    messages: list[str] = []

    async def scenario(client: Client) -> None:
        await _log_in(client)
        for request_id, verb in (
            ("eta-1", "retry"),
            ("eta-2", "cancel"),
            ("eta-2", "cancel"),  # already cancelled
            ("eta-1", "cancel"),  # pending now: cancellable
            ("never-1", "retry"),
        ):
            csrf = await _csrf(client, "/", headers=HTML)
            response = await client.post(
                f"/batches/{request_id}/{verb}", data={"csrf": csrf}, allow_redirects=False
            )
            assert response.status == 303
            redirects.append(response.headers["Location"])
        page = await (await client.get("/batches/eta-1?done=retried", headers=HTML)).text()
        messages.append(page)

    console.serve(scenario, allow_actions=True)
    assert redirects == [
        "/batches/eta-1?done=retried",
        "/batches/eta-2?done=cancelled",
        "/batches/eta-2?done=not-cancellable",
        "/batches/eta-1?done=cancelled",
        "/batches/never-1?done=not-found",
    ]
    assert console.history("eta-1") == [
        ("failed", "pending", "retried by an operator"),
        ("pending", "cancelled", "cancelled by an operator"),
    ]
    assert console.history("eta-2") == [("processing", "cancelled", "cancelled by an operator")]
    assert "Retried: the batch is pending again" in messages[0]


def test_with_allow_actions_the_batch_page_offers_the_applicable_action(
    console: Console,
) -> None:
    console.add("theta-1", state="expired", finished_at=datetime.now(UTC))
    console.add("theta-2")
    pages: dict[str, str] = {}

    async def scenario(client: Client) -> None:
        for request_id in ("theta-1", "theta-2"):
            pages[request_id] = await (
                await client.get(f"/batches/{request_id}", headers=BEARER)
            ).text()

    console.serve(scenario, allow_actions=True)
    finished, unfinished = pages["theta-1"], pages["theta-2"]
    assert re.search(
        r'action="/batches/theta-1/retry">\s*<input[^>]+>\s*<button type="submit">Retry', finished
    )
    assert re.search(r"<button type=\"submit\" disabled>Cancel", finished)
    assert re.search(r"<button type=\"submit\" disabled>Retry", unfinished)
    assert re.search(r'<button type="submit">Cancel', unfinished)


def test_a_post_without_the_sessions_csrf_token_is_refused(console: Console) -> None:
    console.add("iota-1", state="failed", finished_at=datetime.now(UTC))
    statuses: list[int] = []

    async def scenario(client: Client) -> None:
        await _log_in(client)
        mine = await _csrf(client, "/", headers=HTML)
        # Another browser, logged in too: its token is no good for this session.
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as other:
            await other.post(client.make_url("/login"), data={"token": TOKEN})
            page = await (await other.get(client.make_url("/"), headers=HTML)).text()
            match = re.search(r'name="csrf" value="([0-9a-f]{64})"', page)
            assert match is not None
            theirs = match.group(1)
        assert theirs != mine
        for data in ({}, {"csrf": ""}, {"csrf": "0" * 64}, {"csrf": theirs}):
            response = await client.post("/batches/iota-1/retry", data=data)
            statuses.append(response.status)
        # The form came from another site: the browser sends the cookie only if SameSite
        # allows, and even then without this session's token.
        response = await client.post(
            "/batches/iota-1/retry",
            data={"csrf": mine[:-1] + ("0" if mine[-1] != "0" else "1")},
            headers={"Origin": "https://evil.example"},
        )
        statuses.append(response.status)

    console.serve(scenario, allow_actions=True)
    assert statuses == [403] * 5
    assert console.store.get("iota-1").state == "failed"  # type: ignore[union-attr]
    assert console.history("iota-1") == []


# --------------------------------------------------------------------------- the overview


def test_the_overview_shows_states_ages_budget_instances_and_errors(console: Console) -> None:
    now = console.store.database_now()
    console.add("kappa-1")
    console.add("kappa-2", created_at=now - timedelta(hours=3))
    console.add("kappa-3", state="processing", created_at=now - timedelta(days=2))
    console.add("kappa-4", state="downloaded", finished_at=now)
    console.add("kappa-5", state="failed", finished_at=now, last_error="remote batch failed")
    assert console.budget.reserve_now(2).granted == 2
    owner = "host-a:4242:abc"
    console.store.register_instance(owner, "host-a", 4242, None)
    console.store.heartbeat(owner, last_sweep_at=now)
    console.store.register_instance("host-b:7:def", "host-b", 7, None)
    console.store.mark_stopped("host-b:7:def")
    pages: list[str] = []

    async def scenario(client: Client) -> None:
        pages.append(await (await client.get("/", headers=BEARER)).text())

    console.serve(scenario)
    (page,) = pages

    def cells(heading: str) -> list[tuple[str, ...]]:
        section = page.split(f"<h2>{heading}</h2>", 1)[1].split("</table>", 1)[0]
        return [
            tuple(
                re.sub(r"<[^>]+>", "", cell).strip()
                for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
            )
            for row in re.findall(r"<tr>(.*?)</tr>", section, re.S)
            if "<td" in row
        ]

    states = dict(cells("Batches per state"))
    assert states["pending"] == "2" and states["processing"] == "1"
    assert states["downloaded"] == "1" and states["failed"] == "1" and states["expired"] == "0"
    assert cells("Unfinished batches by age") == [
        ("&lt; 1 h", "1"),
        ("1-6 h", "1"),
        ("6-24 h", "0"),
        ("1-7 d", "1"),
        ("&gt; 7 d", "0"),
    ]
    budget = {row[0]: row[1:] for row in cells("Call budget")}
    # The second's window may have moved on by now; the minute's and the day's have not.
    assert budget["per second"][1] == "2"
    assert budget["per minute"] == ("2", "100", "98")
    assert budget["per day"] == ("2", "10000", "9998")
    instances = {row[0]: row for row in cells("Instances")}
    assert instances["host-a"][1] == "4242" and instances["host-a"][5] == "alive"
    assert instances["host-b"][5].startswith("stopped")
    errors = cells("Recent errors")
    assert errors[0][0] == "kappa-5" and errors[0][3] == "remote batch failed"
    bars = re.findall(r'<rect class="bar"[^>]*height="([0-9.]+)"><title>([^<]+)</title>', page)
    assert len(bars) == 24
    assert bars[-1][1].endswith(": 2 calls") and float(bars[-1][0]) == 100.0
    assert all(title.endswith(": 0 calls") for _, title in bars[:-1])
    assert "<h2>Webhook deliveries</h2>" in page
    assert '<meta http-equiv="refresh"' in page


def test_the_hourly_chart_reads_a_day_of_the_budgets_own_buckets(console: Console) -> None:
    # The day window counts in minute buckets kept for 24 hours: two calls 5 hours ago,
    # seven 23 hours ago, none older than the window shown.
    _ledger, now = console.budget.snapshot_now()
    minute = int(now // 60)
    with console.engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO tracker_quota_usage (window_name, bucket, used) VALUES "
                "('day', :a, 2), ('day', :b, 7)"
            ),
            {"a": minute - 5 * 60, "b": minute - 23 * 60},
        )
    pages: list[str] = []

    async def scenario(client: Client) -> None:
        pages.append(await (await client.get("/", headers=BEARER)).text())

    console.serve(scenario)
    titles = re.findall(r'<rect class="bar"[^>]*><title>[0-9]{2}:00 UTC: ([0-9]+) call', pages[0])
    counts = [int(count) for count in titles]
    assert len(counts) == 24
    assert sum(counts) == 9
    # Exactly 5 and 23 hours before the current hour's bucket: 6th from last and first.
    assert counts[-6] == 2
    assert counts[0] == 7


def test_an_unreachable_database_is_a_503_page_not_a_traceback(tmp_path: Any) -> None:
    console = Console(f"sqlite:///{tmp_path}/missing/dir/tracker.db")
    answers: list[tuple[int, str]] = []

    async def scenario(client: Client) -> None:
        for path in ("/", "/batches", "/batches/x-1"):
            response = await client.get(path, headers=BEARER)
            answers.append((response.status, await response.text()))

    try:
        console.serve(scenario)
    finally:
        console.engine.dispose()
    for status, page in answers:
        assert status == 503
        assert _h1(page) == "Database error"
        assert "unable to open database file" in page
        assert "Traceback" not in page
