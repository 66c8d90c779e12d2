"""The on-final hook's environment: an allow-list, not the daemon's whole environment."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.rows import batch_row
from tracker.hooks import hook_environment, run_final_hook
from tracker.store import BatchRow

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

DAEMON_ENV = {
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "LC_TIME": "en_GB.UTF-8",
    "TZ": "UTC",
    "HOME": "/var/lib/tracker",
    "TRACKER_DATABASE_URL": "postgresql+psycopg://tracker:hunter2@db/tracker",
    "TRACKER_CONFIG": "/etc/tracker/tracker.toml",
    "TRACKER_CLIENT_SECRET": "s3cret",
    "TRACKER_CLIENT_SECRET_FILE": "/etc/tracker/client_secret",
    "CREDENTIALS_DIRECTORY": "/run/credentials/tracker.service",
    "PGPASSWORD": "hunter2",
    "AWS_SECRET_ACCESS_KEY": "aws",
    "PGSERVICE": "tracker",
    "MY_APP_TOKEN": "token",
    "LCX": "not a locale variable",
}


def batch(**overrides: object) -> BatchRow:
    return batch_row(**overrides)


def test_the_hook_sees_only_the_allow_list_and_its_batch() -> None:
    env = hook_environment(batch(), DAEMON_ENV)
    assert env == {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "LC_TIME": "en_GB.UTF-8",
        "TZ": "UTC",
        "HOME": "/var/lib/tracker",
        "TRACKER_REQUEST_ID": "abc123",
        "TRACKER_STATE": "downloaded",
        "TRACKER_LABEL": "run-1",
        "TRACKER_FILE_PATH": "/srv/out/abc123.csv",
        "TRACKER_FILE_SHA256": "ab" * 32,
        "TRACKER_LAST_ERROR": "",
    }


def test_names_the_operator_lists_are_passed_when_set() -> None:
    env = hook_environment(batch(), DAEMON_ENV, ("PGSERVICE", "MY_APP_TOKEN", "NOT_SET"))
    assert env["PGSERVICE"] == "tracker" and env["MY_APP_TOKEN"] == "token"
    assert "NOT_SET" not in env and "PGPASSWORD" not in env


def test_listing_a_credential_or_a_batch_variable_changes_nothing() -> None:
    listed = ("TRACKER_CLIENT_SECRET", "TRACKER_CLIENT_SECRET_FILE", "CREDENTIALS_DIRECTORY")
    env = hook_environment(
        batch(state="failed"), DAEMON_ENV | {"TRACKER_STATE": "forged"}, (*listed, "TRACKER_STATE")
    )
    assert not set(listed) & set(env)
    assert env["TRACKER_STATE"] == "failed"


def test_run_final_hook_passes_the_allow_list_to_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in DAEMON_ENV.items():
        monkeypatch.setenv(name, value)
    record = tmp_path / "env.json"
    script = tmp_path / "hook.py"
    script.write_text(
        f"import json, os\nopen({str(record)!r}, 'w').write(json.dumps(dict(os.environ)))\n"
    )
    code = asyncio.run(
        run_final_hook(f"{sys.executable} {script}", batch(), 20, allowed_env=("PGSERVICE",))
    )
    assert code == 0
    seen = json.loads(record.read_text())
    for absent in ("PGPASSWORD", "TRACKER_DATABASE_URL", "TRACKER_CONFIG", "AWS_SECRET_ACCESS_KEY"):
        assert absent not in seen
    assert seen["PGSERVICE"] == "tracker" and seen["TRACKER_REQUEST_ID"] == "abc123"
