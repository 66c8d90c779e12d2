"""Fixtures for the browser tests: Debian's chromium driven by Playwright, the real
`tracker web` as a subprocess over a seeded SQLite database.

One browser for the package's tests, a fresh context (no cookies) and page for each test. The
browser is Debian's build at an explicit path (TRACKER_TEST_CHROMIUM overrides it):
Playwright's own browser download is never run, since nothing may be fetched at test time.
Without chromium the tests skip, except under CI (CI=true), where that is a failure.

Every page is watched: a JavaScript dialog, an uncaught error or a console message about
a Content-Security-Policy violation fails the test that caused it. When a test fails, a
screenshot of its page is kept in its tmp_path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Dialog,
    Error,
    Page,
    ViewportSize,
    sync_playwright,
)

from tests.browser.support import Console, Seeded, migrated_sqlite, seed, start_console
from tests.conftest import IN_CI

CHROMIUM = os.environ.get("TRACKER_TEST_CHROMIUM", "/usr/bin/chromium")
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}


# Package scope, not session: while Playwright's sync API is open its event loop counts as
# running in this thread, and every later test's asyncio.run() would refuse to start.
@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        message = f"no chromium at {CHROMIUM} (apt-get install chromium)"
        if IN_CI:
            pytest.fail(f"{message}; CI must run the browser tests")
        pytest.skip(message)
    with sync_playwright() as playwright:
        # --no-sandbox: the tests run as root, where chromium refuses its own sandbox.
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        yield launched
        launched.close()


@dataclass
class PageEvents:
    """What a page did that a console page never should."""

    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    csp_violations: list[str] = field(default_factory=list)

    def on_dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def on_page_error(self, error: Error) -> None:
        self.errors.append(str(error))

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and "Content Security Policy" in message.text:
            self.csp_violations.append(message.text)

    def problems(self) -> list[str]:
        return [
            *(f"dialog {d}" for d in self.dialogs),
            *(f"page error {e}" for e in self.errors),
            *(f"CSP violation {v}" for v in self.csp_violations),
        ]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the test, so the page fixture knows a test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def page_events() -> PageEvents:
    return PageEvents()


@pytest.fixture
def page(
    browser: Browser, page_events: PageEvents, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Page]:
    context = browser.new_context(viewport=VIEWPORT)
    new_page = context.new_page()
    new_page.set_default_timeout(10_000)
    new_page.on("dialog", page_events.on_dialog)
    new_page.on("pageerror", page_events.on_page_error)
    new_page.on("console", page_events.on_console)
    yield new_page
    call_report = getattr(request.node, "report_call", None)
    if call_report is not None and call_report.failed:
        shot = tmp_path / "failure.png"
        new_page.screenshot(path=shot)
        print(f"screenshot of the failed test's page: {shot}")
    context.close()
    assert not page_events.problems(), page_events.problems()


@dataclass(frozen=True)
class SeededConsole:
    console: Console
    database_url: str
    batches: Seeded


@contextmanager
def seeded_console(directory: Path, *args: str) -> Iterator[SeededConsole]:
    """`tracker web` (with the given arguments) over a freshly seeded database."""
    directory.mkdir(exist_ok=True)
    database_url = migrated_sqlite(directory / "tracker.db")
    output_dir = directory / "out"
    output_dir.mkdir()
    batches = seed(database_url, output_dir)
    console = start_console(database_url, directory / "console.log", *args)
    try:
        yield SeededConsole(console, database_url, batches)
    finally:
        assert console.stop() == 0, console.log_path.read_text()


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeededConsole]:
    """The read-only console, as `tracker web` starts by default.

    Shared by a module's tests, which only read: each still gets a browser context of
    its own, so no session carries over. Starting `tracker web` is most of a test's time.
    """
    with seeded_console(tmp_path_factory.mktemp("console")) as started:
        yield started


@pytest.fixture
def own_console(tmp_path: Path) -> Iterator[Callable[..., SeededConsole]]:
    """Starts a console of the test's own, for a test that writes to its database."""
    with ExitStack() as stack:

        def start(*args: str) -> SeededConsole:
            return stack.enter_context(seeded_console(tmp_path / "own", *args))

        yield start
