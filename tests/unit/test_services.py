"""The composition root: what each command gets, and what it needs to get it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tracker.deepvue import DeepvueClient
from tracker.logs import SecretScrubber
from tracker.services import open_api, open_services, read_only_services
from tracker.settings import Settings, SettingsError
from tracker.sweep import Sweeper


def _settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(
        database_url=f"sqlite:///{tmp_path}/tracker.db",
        output_dir=tmp_path / "out",
        rate_per_second=2,
        rate_per_minute=100,
        rate_per_day=10000,
        **values,  # type: ignore[arg-type]
    )


def test_the_views_need_no_credentials_and_read_the_shared_budget(tmp_path: Path) -> None:
    settings = _settings(tmp_path)

    async def migrate() -> None:
        async with open_services(
            _settings(tmp_path, client_id="me", client_secret="s"), SecretScrubber()
        ):
            pass

    asyncio.run(migrate())
    views = read_only_services(settings)
    assert views.store.count_by_state() == {}
    assert views.budget.usage_now() == {
        "second": (0, 2),
        "minute": (0, 100),
        "day": (0, 10000),
    }


@pytest.mark.parametrize("opener", [open_services, open_api])
def test_commands_that_call_deepvue_need_credentials(tmp_path: Path, opener: Any) -> None:
    async def main() -> None:
        async with opener(_settings(tmp_path), SecretScrubber()):
            pass

    with pytest.raises(SettingsError, match="TRACKER_CLIENT_ID"):
        asyncio.run(main())


def test_the_api_services_give_a_migrated_store_and_the_client(tmp_path: Path) -> None:
    settings = _settings(tmp_path, client_id="me", client_secret="s")

    async def main() -> None:
        async with open_api(settings, SecretScrubber()) as api:
            assert isinstance(api.client, DeepvueClient)
            assert api.store.enqueue("r1")

    asyncio.run(main())
    views = read_only_services(settings)
    assert views.store.count_by_state() == {"pending": 1}


def test_the_services_sweep_with_nothing_due_and_no_call_made(tmp_path: Path) -> None:
    settings = _settings(tmp_path, client_id="me", client_secret="s")

    async def main() -> None:
        async with open_services(settings, SecretScrubber()) as services:
            assert isinstance(services.sweeper, Sweeper)
            assert not services.stopping.is_set()
            report = await services.sweeper.sweep()  # nothing due: no call goes out
            assert report.claimed == 0
            assert await services.throttle.usage() == {
                "second": (0, 2),
                "minute": (0, 100),
                "day": (0, 10000),
            }

    asyncio.run(main())
