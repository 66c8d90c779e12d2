"""The simulator's webhook deliveries: where each batch's webhook goes, when it is sent, the
injected faults (drops, delay, duplicates, wrong secret, garbage) and their counters.
Loopback URLs only; see docs/simulator.md."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from tracker.simulator.config import SimulatorConfig
from tracker.simulator.responses import now_ms

# Prefixes whose status never completes or fails: no webhook is due for them.
_NEVER_FINISH: Final = ("invalid-", "missing-", "ratelimit-")
_TIMEOUT: Final = aiohttp.ClientTimeout(total=10.0)


class NotLoopback(ValueError):
    """A webhook URL the simulator refuses: it never sends traffic off this machine."""


def loopback_url(url: str) -> str:
    """`url` if it is http(s) to a loopback address, else NotLoopback."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NotLoopback(f"webhook URL {url!r} is not http(s) with a host")
    if parts.username is not None or parts.password is not None:
        raise NotLoopback("webhook URL must not carry user info")
    if parts.hostname != "localhost":
        try:
            address = ipaddress.ip_address(parts.hostname)
        except ValueError:
            raise NotLoopback(f"webhook host {parts.hostname!r} is not an IP literal") from None
        if not address.is_loopback:
            raise NotLoopback(f"webhook host {parts.hostname!r} is not loopback")
    return url


def wrong_secret_url(url: str) -> str:
    """`url` with its secret, taken to be the last non-empty path segment, altered (same
    length, last character changed); a path without segments gets one."""
    parts = urlsplit(url)
    segments = parts.path.split("/")
    for index in range(len(segments) - 1, -1, -1):
        segment = segments[index]
        if segment:
            last = "x" if segment[-1] != "x" else "y"
            segments[index] = segment[:-1] + last
            break
    else:
        segments = ["", "wrong-secret"]
    return urlunsplit(parts._replace(path="/".join(segments)))


def payload(request_id: str, *, failed: bool) -> bytes:
    """A plausible body (Deepvue publishes none), shaped like its status envelope."""
    status = "failed" if failed else "completed"
    return json.dumps(
        {
            "request_id": request_id,
            "status": status,
            "timestamp": now_ms(),
            "data": {
                "request_id": request_id,
                "status": 500 if failed else 200,
                "message": f"batch processing {status}",
            },
        }
    ).encode()


class WebhookSender:
    """Registered webhook URLs, the pending deliveries and their counters; `reset` (with
    /_sim/reset) forgets the registrations made since start and cancels what is pending."""

    def __init__(self, config: SimulatorConfig) -> None:
        self._config = config
        if config.webhook_url is not None:
            loopback_url(config.webhook_url)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.reset()

    def reset(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        # Separate stream so webhooks never shift the error_rate sequence for a seed.
        self._rng = random.Random(f"{self._config.seed}:webhooks")
        self._default_url: str | None = self._config.webhook_url
        self._urls: dict[str, str] = {}
        self.sent = 0
        self.dropped = 0
        self.failures = 0
        self.refused = 0
        self._by_id: dict[str, dict[str, int]] = {}

    def register(self, url: str, request_id: str | None = None) -> None:
        """Send `request_id`'s webhook (or every id's without one of its own) to `url`."""
        try:
            loopback_url(url)
        except NotLoopback:
            self.refused += 1
            raise
        if request_id is None:
            self._default_url = url
        else:
            self._urls[request_id] = url

    def batch_started(self, request_id: str, finishes_in: float, *, failed: bool) -> None:
        """The id's first status call: its webhook is due when it finishes, `finishes_in`
        seconds from now (plus the configured delay), if it has a URL by now."""
        if request_id.startswith(_NEVER_FINISH):
            return
        url = self._urls.get(request_id, self._default_url)
        if url is None:
            return
        task = asyncio.get_running_loop().create_task(
            self._deliver(url, request_id, finishes_in, failed=failed)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(
        self, url: str, request_id: str, finishes_in: float, *, failed: bool
    ) -> None:
        cfg = self._config
        counts = self._by_id.setdefault(request_id, {"sent": 0, "dropped": 0, "failures": 0})
        low, high = cfg.webhook_delay
        delay = self._rng.uniform(low, high)
        if self._rng.random() < cfg.webhook_drop_rate:
            self.dropped += 1
            counts["dropped"] += 1
            return
        # Each delivery's faults are drawn now, so the sequence for a seed does not depend
        # on how the receiver answers.
        deliveries = [
            (
                self._rng.random() < cfg.webhook_wrong_secret_rate,
                self._rng.random() < cfg.webhook_garbage_rate,
            )
            for _ in range(max(1, cfg.webhook_duplicates))
        ]
        garbage = [b"\xffnot json " + self._rng.randbytes(32) for _ in deliveries]
        await asyncio.sleep(finishes_in + delay)
        for (wrong_secret, is_garbage), junk in zip(deliveries, garbage, strict=True):
            target = wrong_secret_url(url) if wrong_secret else url
            body = junk if is_garbage else payload(request_id, failed=failed)
            self.sent += 1
            counts["sent"] += 1
            if not await self._post(target, body):
                self.failures += 1
                counts["failures"] += 1

    async def _post(self, url: str, body: bytes) -> bool:
        """One POST; True if it answered 2xx."""
        loopback_url(url)
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=_TIMEOUT)
        try:
            async with self._session.post(
                url,
                data=body,
                headers={"Content-Type": "application/json"},
                allow_redirects=False,
            ) as response:
                await response.read()
                return 200 <= response.status < 300
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "webhooks_sent": self.sent,
            "webhooks_dropped": self.dropped,
            "webhook_failures": self.failures,
            "webhooks_refused": self.refused,
            "webhooks_by_id": {key: dict(value) for key, value in self._by_id.items()},
        }
