"""`tracker web`: the console in the foreground until SIGTERM or SIGINT (exit 0)."""

from __future__ import annotations

import asyncio
import signal

import structlog

from tracker.console.app import console_app
from tracker.console.queries import ConsoleQueries
from tracker.domain.addresses import parse_listen_address
from tracker.http_listener import start_listener
from tracker.services import read_only_services
from tracker.settings import Settings


async def serve_console(settings: Settings, *, token: str, allow_actions: bool) -> None:
    """Serve the console on TRACKER_CONSOLE_ADDR until a stop signal.

    No migration: the console only reads (and, with `allow_actions`, retries and cancels)
    a database the daemon keeps current. No access log (start_listener): a request line
    would carry nothing secret, but its headers would, and one quiet rule is simpler.
    """
    log = structlog.get_logger("tracker.console")
    host, port = parse_listen_address(settings.console_addr)
    services = read_only_services(settings)
    queries = ConsoleQueries(
        services.store, services.budget, heartbeat_timeout=settings.heartbeat_timeout
    )
    app = console_app(queries, token=token, allow_actions=allow_actions)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        runner = await start_listener(app, host, port, event="console.listening")
        log.info("console.started", allow_actions=allow_actions)
        try:
            await stop.wait()
            log.info("console.stopping")
        finally:
            await runner.cleanup()
    finally:
        services.dispose()
    log.info("console.stopped")
