"""Serving an aiohttp application on one listen address (the metrics endpoint, the webhooks)."""

from __future__ import annotations

import structlog
from aiohttp import web


async def start_listener(
    app: web.Application, host: str, port: int, *, event: str
) -> web.AppRunner:
    """Serve `app` on `host:port` until the runner's `cleanup()`; log `event` with the
    addresses bound (port 0 picks a free one: read it from `runner.addresses`).

    No access log: it would print every path (the webhook's holds its secret) and every
    scrape. A short shutdown timeout: a request in flight at exit is not worth holding up
    the daemon's stop.
    """
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    structlog.get_logger("tracker.http_listener").info(
        event, addresses=[_host_port(bound) for bound in runner.addresses]
    )
    return runner


def _host_port(bound: object) -> str:
    # runner.addresses holds socket addresses: (host, port) for IPv4, (host, port, flow, scope)
    # for IPv6.
    if isinstance(bound, tuple) and len(bound) >= 2:
        host, port = str(bound[0]), bound[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(bound)
