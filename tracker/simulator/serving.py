"""Running a simulator: in the foreground until a signal (`tracker fake-api`), or on a
background thread for tests and the demo. Loopback only."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web

from tracker.simulator.app import SIMULATOR_KEY, Simulator, build_app
from tracker.simulator.config import SimulatorConfig


def _loopback_host(host: str) -> str:
    if host == "localhost":
        # "localhost" may resolve to several (or odd) addresses; pin the IPv4 loopback.
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"the simulator binds loopback only; {host!r} is not an IP") from None
    if not address.is_loopback:
        raise ValueError(f"the simulator binds loopback only; {host!r} is not loopback")
    return host


async def _start(
    config: SimulatorConfig, host: str, port: int
) -> tuple[web.AppRunner, Simulator, str]:
    app = build_app(config)
    # access_log=None: aiohttp's access log would print presigned query strings.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        # A deep backlog so a benchmark's connection burst is queued, not refused.
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    base_url = f"http://{url_host}:{bound_port}"
    simulator = app[SIMULATOR_KEY]
    simulator.serve_at(base_url)
    return runner, simulator, base_url


def serve_forever(
    config: SimulatorConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve until SIGTERM or SIGINT (must run on the main thread); announce the base URL once."""
    bind_host = _loopback_host(host)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        runner, _, base_url = await _start(config, bind_host, port)
        signals = (signal.SIGTERM, signal.SIGINT)
        try:
            for signum in signals:
                loop.add_signal_handler(signum, stop.set)
            announce(base_url)
            if announce is print:
                # Whoever launched us is likely reading our stdout through a pipe.
                sys.stdout.flush()
            await stop.wait()
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)
            await runner.cleanup()

    asyncio.run(main())


class SimulatorHandle:
    """A simulator running on a background thread; methods are safe to call from any thread."""

    def __init__(
        self, base_url: str, loop: asyncio.AbstractEventLoop, simulator: Simulator
    ) -> None:
        self.base_url = base_url
        self._loop = loop
        self._simulator = simulator

    def _on_loop(self, fn: Callable[[], Any]) -> Any:
        async def call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout=30)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._on_loop(self._simulator.snapshot)
        return result

    def reset(self) -> None:
        self._on_loop(self._simulator.reset)

    def send_webhook(self, url: str, request_id: str) -> None:
        """Send `request_id`'s webhook to `url` when it finishes (as POST /_sim/webhooks)."""
        self._on_loop(lambda: self._simulator.webhooks.register(url, request_id))


@contextmanager
def running_simulator(config: SimulatorConfig) -> Iterator[SimulatorHandle]:
    """Run a simulator on 127.0.0.1:<free port> in a daemon thread with its own event loop."""
    started: concurrent.futures.Future[tuple[SimulatorHandle, Callable[[], None]]] = (
        concurrent.futures.Future()
    )

    async def main() -> None:
        runner, simulator, base_url = await _start(config, "127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        handle = SimulatorHandle(base_url, loop, simulator)

        def request_stop() -> None:
            loop.call_soon_threadsafe(stop.set)

        started.set_result((handle, request_stop))
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            if started.done():
                raise
            # A failure to start belongs to the caller waiting on `started`.
            started.set_exception(exc)

    thread = threading.Thread(target=run, name="deepvue-simulator", daemon=True)
    thread.start()
    handle, request_stop = started.result(timeout=30)
    try:
        yield handle
    finally:
        request_stop()
        thread.join(timeout=30)
