"""The operator console in a real browser: Debian's chromium driving the real `tracker web`.

What an operator does: log in through the form, filter the list, open a batch, retry a
failed one when actions are allowed. What must hold while they do: a label holding a
script is shown as text and never runs, the Content-Security-Policy is never violated, no
secret or file content reaches the page, and each page renders (its screenshot is checked).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from playwright.sync_api import Locator, Page, Response, expect

from tests.browser.conftest import VIEWPORT, PageEvents, SeededConsole
from tests.browser.png import decode_png
from tests.browser.support import (
    FILE_CONTENT,
    FILE_SHA256,
    LOGIN_PATH,
    PRESIGNED_SECRETS,
    SCRIPT_LABEL,
    TOKEN,
)
from tests.e2e.support import execute, query

pytestmark = [pytest.mark.browser, pytest.mark.e2e]
PAGE_SIZE = 50  # rows on one page of the list
# The overview refreshes itself every 10 s (tracker/console/pages.py); a margin for a busy CI.
REFRESH_WAIT_MS = 20_000


def heading(page: Page, text: str) -> Locator:
    return page.get_by_role("heading", level=1, name=text, exact=True)


def log_in(page: Page, console: SeededConsole, token: str = TOKEN) -> None:
    page.goto(f"{console.console.url}{LOGIN_PATH}")
    page.locator("input[name=token]").fill(token)
    page.locator("form:has(input[name=token])").get_by_role("button").click()


def logged_in(page: Page, console: SeededConsole) -> None:
    log_in(page, console)
    expect(heading(page, "Overview")).to_be_visible()


def listed(page: Page) -> set[str]:
    """The request ids the list shows: its rows' links to /batches/<request_id>."""
    links = page.locator("a[href^='/batches/']")
    return {
        str(href).removeprefix("/batches/")
        for href in links.evaluate_all("links => links.map(link => link.getAttribute('href'))")
    }


def filter_list(page: Page, console: SeededConsole, **fields: str) -> None:
    """Fill the list's filter form from a fresh list page and submit it."""
    page.goto(f"{console.console.url}/batches")
    form = page.locator("form:has(select[name=state])")
    if "state" in fields:
        form.locator("select[name=state]").select_option(fields["state"])
    for name in ("label", "q"):
        if name in fields:
            form.locator(f"input[name={name}]").fill(fields[name])
    form.get_by_role("button").click()
    page.wait_for_load_state("load")
    expect(heading(page, "Batches")).to_be_visible()


def test_logging_in_through_the_form_opens_the_overview(page: Page, console: SeededConsole) -> None:
    page.goto(f"{console.console.url}/")
    assert page.url.startswith(f"{console.console.url}{LOGIN_PATH}"), page.url

    log_in(page, console)

    expect(heading(page, "Overview")).to_be_visible()
    cookies = page.context.cookies()
    assert cookies, "no session cookie after logging in"
    for cookie in cookies:
        assert TOKEN not in cookie["value"], "the session cookie carries the token itself"
        assert cookie["httpOnly"], cookie["name"]
        assert cookie["sameSite"] == "Strict", cookie["name"]


def test_logging_out_ends_the_session(page: Page, console: SeededConsole) -> None:
    logged_in(page, console)

    page.get_by_role("button", name="Log out", exact=True).click()

    expect(page.locator("input[name=token]")).to_be_visible()
    page.goto(f"{console.console.url}/batches")
    assert page.url.startswith(f"{console.console.url}{LOGIN_PATH}"), page.url


def test_the_overview_refreshes_by_itself(
    page: Page, own_console: Callable[..., SeededConsole]
) -> None:
    console = own_console()
    logged_in(page, console)
    late_error = "appeared after the page was loaded"
    assert late_error not in page.locator("body").inner_text()

    execute(
        console.database_url,
        "INSERT INTO tracker_batches (request_id, label) VALUES ('late-0006', 'payroll')",
    )
    execute(
        console.database_url,
        "UPDATE tracker_batches SET state = 'failed', last_error = :error,"
        " finished_at = CURRENT_TIMESTAMP WHERE request_id = 'late-0006'",
        error=late_error,
    )

    # No reload from here: the page must fetch the new row itself (within its period).
    expect(page.get_by_text(late_error)).to_be_visible(timeout=REFRESH_WAIT_MS)
    expect(heading(page, "Overview")).to_be_visible()


def test_a_wrong_token_shows_an_error_and_opens_no_session(
    page: Page, console: SeededConsole
) -> None:
    log_in(page, console, token="not-the-console-token-at-all")

    page.wait_for_load_state("load")
    assert page.url.startswith(f"{console.console.url}{LOGIN_PATH}"), page.url
    expect(page.get_by_role("alert")).to_be_visible()
    assert page.locator("input[name=token]").is_visible()
    assert not heading(page, "Overview").is_visible()
    assert page.context.cookies() == []

    page.goto(f"{console.console.url}/batches")
    assert page.url.startswith(f"{console.console.url}{LOGIN_PATH}"), page.url


def test_the_list_filters_by_state_label_and_request_id(page: Page, console: SeededConsole) -> None:
    seeded = console.batches
    logged_in(page, console)

    page.goto(f"{console.console.url}/batches")
    expect(heading(page, "Batches")).to_be_visible()
    assert listed(page) == seeded.all()

    filter_list(page, console, state="failed")
    assert "state=failed" in page.url
    assert listed(page) == {seeded.failed}

    filter_list(page, console, label="onboarding")
    assert listed(page) == {seeded.pending, seeded.processing}

    filter_list(page, console, state="pending", label="onboarding")
    assert listed(page) == {seeded.pending}

    filter_list(page, console, q="dl-")
    assert listed(page) == {seeded.downloaded}

    filter_list(page, console, q="nothing-starts-like-this")
    assert listed(page) == set()


def test_the_next_page_keeps_the_filter_and_shows_the_rest(
    page: Page, own_console: Callable[..., SeededConsole]
) -> None:
    console = own_console()
    bulk = {f"bulk-{n:04d}" for n in range(PAGE_SIZE + 10)}
    for request_id in sorted(bulk):
        execute(
            console.database_url,
            "INSERT INTO tracker_batches (request_id, label) VALUES (:rid, 'bulk')",
            rid=request_id,
        )
    logged_in(page, console)

    filter_list(page, console, label="bulk")
    first = listed(page)
    assert len(first) == PAGE_SIZE
    page.get_by_role("link", name=re.compile(r"^Next")).click()
    expect(heading(page, "Batches")).to_be_visible()
    rest = listed(page)

    assert "label=bulk" in page.url
    assert first.isdisjoint(rest)
    assert first | rest == bulk
    assert page.get_by_role("link", name=re.compile(r"^Next")).count() == 0


def test_a_batch_opened_from_the_list_shows_its_row_timeline_and_file_but_no_secret(
    page: Page, console: SeededConsole
) -> None:
    seeded = console.batches
    logged_in(page, console)
    filter_list(page, console, state="downloaded")

    page.locator(f"a[href='/batches/{seeded.downloaded}']").first.click()

    expect(heading(page, f"Batch {seeded.downloaded}")).to_be_visible()
    text = page.locator("body").inner_text()
    row = query(
        console.database_url,
        "SELECT file_path, file_size FROM tracker_batches WHERE request_id = :rid",
        rid=seeded.downloaded,
    )[0]
    assert row.file_path in text
    assert f"{row.file_size} bytes" in text
    assert FILE_SHA256 in text
    assert "file verified" in text, "the timeline's last transition is missing"
    html = page.content()
    for secret in PRESIGNED_SECRETS:
        assert secret not in html, f"{secret} reached the page"
    assert FILE_CONTENT.decode().strip() not in html, "the file's contents are shown"


def test_retry_with_actions_allowed_is_recorded_as_a_transition(
    page: Page, own_console: Callable[..., SeededConsole]
) -> None:
    console = own_console("--allow-actions")
    failed = console.batches.failed
    logged_in(page, console)
    page.goto(f"{console.console.url}/batches/{failed}")
    expect(heading(page, f"Batch {failed}")).to_be_visible()

    page.get_by_role("button", name="Retry", exact=True).click()

    expect(heading(page, f"Batch {failed}")).to_be_visible()
    # A row of the timeline, not just the notice the page may show after the action.
    retried = page.get_by_role("row").filter(has_text="retried by an operator")
    expect(retried).to_have_count(1)
    expect(retried).to_contain_text("failed")
    expect(retried).to_contain_text("pending")
    transitions = query(
        console.database_url,
        "SELECT from_state, to_state, detail FROM tracker_transitions"
        " WHERE request_id = :rid ORDER BY id",
        rid=failed,
    )
    assert [tuple(t) for t in transitions][-1] == ("failed", "pending", "retried by an operator")
    state = query(
        console.database_url,
        "SELECT state FROM tracker_batches WHERE request_id = :rid",
        rid=failed,
    )
    assert state[0].state == "pending"


def test_without_allow_actions_no_page_offers_retry_or_cancel(
    page: Page, console: SeededConsole
) -> None:
    logged_in(page, console)
    for request_id in (console.batches.failed, console.batches.pending):
        page.goto(f"{console.console.url}/batches/{request_id}")
        expect(heading(page, f"Batch {request_id}")).to_be_visible()
        for action in ("Retry", "Cancel"):
            assert page.get_by_role("button", name=action, exact=True).count() == 0, action
    assert (
        query(
            console.database_url,
            "SELECT count(*) AS n FROM tracker_transitions WHERE detail LIKE '%by an operator'",
        )[0].n
        == 0
    )


def test_a_label_holding_a_script_is_shown_as_text_and_never_runs(
    page: Page, console: SeededConsole, page_events: PageEvents
) -> None:
    scripted = console.batches.scripted
    logged_in(page, console)

    filter_list(page, console, q=scripted)
    assert listed(page) == {scripted}
    assert_shown_as_text(page)

    page.goto(f"{console.console.url}/batches/{scripted}")
    expect(heading(page, f"Batch {scripted}")).to_be_visible()
    assert_shown_as_text(page)
    assert page_events.dialogs == []
    assert page_events.csp_violations == []


def assert_shown_as_text(page: Page) -> None:
    assert SCRIPT_LABEL in page.locator("body").inner_text()
    injected = page.locator("script").evaluate_all(
        "scripts => scripts.filter(s => s.textContent.includes('alert(1)')).length"
    )
    assert injected == 0, "the label became a script element"


def test_every_page_renders_under_its_content_security_policy(
    page: Page, console: SeededConsole, page_events: PageEvents, tmp_path: Path
) -> None:
    seeded = console.batches
    url = console.console.url
    answers: list[Response] = []
    page.on("response", lambda answer: answers.append(answer))

    page.goto(f"{url}{LOGIN_PATH}")
    expect(page.locator("input[name=token]")).to_be_visible()
    check_screenshot(page, tmp_path / "login.png", page.get_by_role("heading", level=1))
    log_in(page, console)
    expect(heading(page, "Overview")).to_be_visible()
    check_screenshot(page, tmp_path / "overview.png", heading(page, "Overview"))
    page.goto(f"{url}/batches")
    check_screenshot(page, tmp_path / "list.png", heading(page, "Batches"))
    page.goto(f"{url}/batches/{seeded.downloaded}")
    check_screenshot(page, tmp_path / "batch.png", heading(page, f"Batch {seeded.downloaded}"))

    documents = [a for a in answers if a.request.resource_type == "document"]
    assert len(documents) >= 4
    for answer in documents:
        policy = answer.headers.get("content-security-policy", "")
        assert "script-src 'self'" in policy, (answer.url, policy)
        assert "'unsafe-inline'" not in policy, (answer.url, policy)
    assert page_events.csp_violations == []
    assert page_events.errors == []


def check_screenshot(page: Page, path: Path, landmark: Locator) -> None:
    """The page rendered: a full-size, non-blank screenshot with its landmark on show."""
    page.wait_for_load_state("load")
    assert landmark.is_visible(), f"{landmark} is not visible"
    page.screenshot(path=path)
    picture = decode_png(path.read_bytes())
    assert (picture.width, picture.height) == (VIEWPORT["width"], VIEWPORT["height"]), path
    assert len(picture.colours()) > 1, f"{path} is a single colour"
