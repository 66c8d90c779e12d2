"""The composition root: the services built from `Settings`, each handed what it uses.

`tracker run` (tracker.daemon.run_service) and `tracker sweep` open them all with
`open_services`; `tracker submit` only the store and the API client (`open_api`);
`tracker status`, `tracker watch` and `tracker web` only the read-only parts (`read_only_services`: no
credentials, no HTTP client).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tracker.budget import DatabaseBudget, Throttle
from tracker.clock import DatabaseClock
from tracker.db import create_engine_for, upgrade_database
from tracker.domain.quota import plan_windows
from tracker.instance import instance_name
from tracker.store import Store

if TYPE_CHECKING:
    import sqlalchemy as sa

    from tracker.deepvue import DeepvueClient
    from tracker.domain.model import PollPolicy
    from tracker.logs import SecretScrubber
    from tracker.metrics import Metrics
    from tracker.settings import Settings
    from tracker.sweep import Sweeper


@dataclass(frozen=True)
class Services:
    """What a sweeping command works with; the HTTP clients close when its context ends."""

    store: Store
    throttle: Throttle
    client: DeepvueClient
    sweeper: Sweeper
    # Set to stop claiming and wind the running sweep down (the daemon's signal handler).
    stopping: asyncio.Event


@dataclass(frozen=True)
class ApiServices:
    """The store and the API client, for a command that calls Deepvue but does not sweep."""

    store: Store
    client: DeepvueClient


@dataclass(frozen=True)
class ReadOnlyServices:
    """What the views read: the batches and the call budget shared by every instance."""

    store: Store
    budget: DatabaseBudget

    def dispose(self) -> None:
        """Close the database connections (a long-running reader such as `tracker web`)."""
        self.store.engine.dispose()


def make_store(settings: Settings, engine: sa.Engine) -> Store:
    # A batch finished here (or cancelled by an operator) is queued for the on-final hook.
    return Store(
        engine,
        final_hook=settings.on_final is not None,
        refused_retry=settings.poll_max_interval,
    )


def make_budget(settings: Settings, engine: sa.Engine) -> DatabaseBudget:
    # The budget lives in the database: shared by every instance, kept across restarts.
    return DatabaseBudget(
        engine,
        plan_windows(settings.rate_per_second, settings.rate_per_minute, settings.rate_per_day),
    )


def read_only_services(settings: Settings) -> ReadOnlyServices:
    """The store and the call budget, for reading; nothing is migrated or sent."""
    engine = create_engine_for(settings.database_url)
    return ReadOnlyServices(make_store(settings, engine), make_budget(settings, engine))


@asynccontextmanager
async def open_services(
    settings: Settings,
    scrubber: SecretScrubber,
    *,
    store: Store | None = None,
    policy: PollPolicy | None = None,
    metrics: Metrics | None = None,
    clock: DatabaseClock | None = None,
    owner: str | None = None,
) -> AsyncIterator[Services]:
    """Everything a sweep needs, with its HTTP clients, closed again on exit.

    Without `store`, a store over TRACKER_DATABASE_URL, migrated first (its engine disposed
    on exit). The clock is the database's (`clock`, or one read now): due times, leases and
    the maximum age must mean the same on every host sharing the database.
    """
    # The HTTP side is imported here, not at the top: the commands that only read the store
    # (list, show, status, watch) must not pay for httpx and aiohttp at start-up.
    from tracker.download import Downloader
    from tracker.file_transport import make_download_http_client
    from tracker.sweep import Sweeper

    settings.require_credentials()
    async with _migrated_store(settings, store) as store:
        if clock is None:
            clock = DatabaseClock(await asyncio.to_thread(store.database_now))
        throttle = Throttle(make_budget(settings, store.engine))
        stopping = asyncio.Event()
        async with (
            _api_client(settings, scrubber, throttle) as client,
            # A separate client for the file host: it must never carry the API's credentials.
            make_download_http_client(settings.http_timeout) as download_http,
        ):
            downloader = Downloader(
                download_http,
                output_dir=settings.output_dir,
                allowed_hosts=settings.download_allowed_hosts,
                file_mode=settings.file_mode,
                deadline=settings.download_deadline,
                max_file_size=settings.max_file_size,
            )
            sweeper = Sweeper(
                store=store,
                client=client,
                throttle=throttle,
                downloader=downloader,
                policy=policy or settings.poll_policy,
                owner=owner or instance_name(),
                stopping=stopping,
                clock=clock.now,
                concurrency=settings.concurrency,
                download_concurrency=settings.download_concurrency,
                lease_seconds=settings.lease_duration,
                shutdown_grace=settings.shutdown_grace,
                metrics=metrics,
            )
            yield Services(
                store=store, throttle=throttle, client=client, sweeper=sweeper, stopping=stopping
            )


@asynccontextmanager
async def open_api(settings: Settings, scrubber: SecretScrubber) -> AsyncIterator[ApiServices]:
    """A migrated store and the API client (its calls drawing on the shared budget)."""
    settings.require_credentials()
    async with (
        _migrated_store(settings, None) as store,
        _api_client(settings, scrubber, Throttle(make_budget(settings, store.engine))) as client,
    ):
        yield ApiServices(store=store, client=client)


@asynccontextmanager
async def _migrated_store(settings: Settings, store: Store | None) -> AsyncIterator[Store]:
    """`store`, or a new one over a migrated TRACKER_DATABASE_URL, disposed on exit."""
    if store is not None:
        yield store
        return
    engine = create_engine_for(settings.database_url)
    try:
        await asyncio.to_thread(upgrade_database, engine)
        yield make_store(settings, engine)
    finally:
        engine.dispose()


@asynccontextmanager
async def _api_client(
    settings: Settings, scrubber: SecretScrubber, throttle: Throttle
) -> AsyncIterator[DeepvueClient]:
    from tracker.deepvue import DeepvueClient, make_api_http_client, make_api_transport

    def read_secret() -> str:
        secret = settings.read_client_secret()
        scrubber.add(secret)
        return secret

    api_transport = make_api_transport()
    async with make_api_http_client(settings.http_timeout, api_transport) as api_http:
        yield DeepvueClient(
            api_http,
            base_url=settings.api_base_url,
            client_id=settings.client_id or "",
            read_secret=read_secret,
            throttle=throttle,
            status_transport=api_transport,
            max_retry_after=settings.max_retry_after,
        )
