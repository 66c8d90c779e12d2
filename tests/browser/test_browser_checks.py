"""The checks the console's browser tests rely on, shown to fail when they should.

A blank screenshot counts one colour; a script the CSP blocks is reported as a violation;
a dialog is caught. Without these, a passing console test could mean a blind check.
"""

from __future__ import annotations

import pytest
from playwright.sync_api import Page, Route

from tests.browser.conftest import VIEWPORT, PageEvents
from tests.browser.png import decode_png

pytestmark = pytest.mark.browser

# The console's policy (tracker/console): no inline script may run under it.
CSP = "default-src 'none'; style-src 'self'; script-src 'self'; base-uri 'none'"
ORIGIN = "http://checks.invalid"


def serve(page: Page, body: str, headers: dict[str, str] | None = None) -> None:
    """Answer every request of the page from here: nothing leaves the machine."""

    def fulfil(route: Route) -> None:
        route.fulfill(status=200, content_type="text/html", body=body, headers=headers or {})

    page.route(f"{ORIGIN}/**", fulfil)


def test_a_blank_page_screenshots_as_one_colour_and_text_as_many(page: Page) -> None:
    serve(page, "<!doctype html><title>blank</title><body></body>")
    page.goto(f"{ORIGIN}/")
    blank = decode_png(page.screenshot())
    assert (blank.width, blank.height) == (VIEWPORT["width"], VIEWPORT["height"])
    assert len(blank.colours()) == 1

    page.set_content("<h1>Overview</h1><p>some words</p>")
    rendered = decode_png(page.screenshot())
    assert len(rendered.colours()) > 1


def test_an_inline_script_under_the_policy_is_reported_and_does_not_run(
    page: Page, page_events: PageEvents
) -> None:
    serve(
        page,
        "<!doctype html><title>csp</title><h1>x</h1><script>alert(1)</script>",
        {"Content-Security-Policy": CSP},
    )
    with page.expect_console_message(lambda message: "Content Security Policy" in message.text):
        page.goto(f"{ORIGIN}/")
    assert page_events.csp_violations, "the blocked inline script was not reported"
    assert page_events.dialogs == []
    page_events.csp_violations.clear()  # seen: the page fixture must not fail on it


def test_a_dialog_is_caught(page: Page, page_events: PageEvents) -> None:
    serve(page, "<!doctype html><title>dialog</title><script>alert('caught')</script>")
    page.goto(f"{ORIGIN}/")
    assert page_events.dialogs == ["alert: caught"]
    page_events.dialogs.clear()
