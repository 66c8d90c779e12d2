"""The on-final hook of a real `tracker run` gets an allow-list environment, not the daemon's."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from tests.e2e.support import Daemon, FakeApi, raw_insert, tracker_env, wait_until


def test_the_hook_does_not_inherit_the_daemons_secrets(
    e2e_database_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    run_daemon: Callable[[dict[str, str]], Daemon],
) -> None:
    api = fake_api("--completion-delay", "0.2")
    record = tmp_path / "hook-env.jsonl"
    script = tmp_path / "hook.py"
    script.write_text(
        "import json, os\n"
        f"with open({str(record)!r}, 'a') as out:\n"
        "    out.write(json.dumps(dict(os.environ)) + '\\n')\n"
    )
    config = tmp_path / "tracker.toml"
    config.write_text("on_final_timeout = 20\n")
    env = tracker_env(
        e2e_database_url,
        api.url,
        tmp_path / "out",
        TRACKER_ON_FINAL=f"{sys.executable} {script}",
        TRACKER_ON_FINAL_ENV="MY_APP_SETTING, NOT_SET_ANYWHERE",
        TRACKER_CONFIG=str(config),
        PGPASSWORD="secret-pg-password",
        AWS_SECRET_ACCESS_KEY="secret-aws-key",
        MY_APP_SETTING="passed-through",
        LANG="C.UTF-8",
        TZ="UTC",
        HOME=str(tmp_path),
    )
    daemon = run_daemon(env)
    daemon.wait_started()
    ok, failing = uuid.uuid4().hex, f"fail-{uuid.uuid4().hex[:8]}"
    raw_insert(e2e_database_url, [ok, failing])
    wait_until(lambda: record.exists() and len(record.read_text().splitlines()) >= 2, 60, "hooks")
    time.sleep(1)
    assert daemon.stop() == 0
    runs = [json.loads(line) for line in record.read_text().splitlines()]
    assert sorted(r["TRACKER_REQUEST_ID"] for r in runs) == sorted([ok, failing])
    for seen in runs:
        for withheld in (
            "PGPASSWORD",
            "AWS_SECRET_ACCESS_KEY",
            "TRACKER_DATABASE_URL",
            "TRACKER_CONFIG",
            "TRACKER_CLIENT_SECRET",
            "TRACKER_CLIENT_ID",
            "TRACKER_API_BASE_URL",
            "TRACKER_ON_FINAL",
            "NOT_SET_ANYWHERE",
        ):
            assert withheld not in seen, withheld
        assert not any("secret" in value for value in seen.values())
        assert seen["MY_APP_SETTING"] == "passed-through"
        assert (seen["PATH"], seen["LANG"], seen["TZ"], seen["HOME"]) == (
            env["PATH"],
            "C.UTF-8",
            "UTC",
            str(tmp_path),
        )
        assert seen["TRACKER_STATE"] in ("downloaded", "failed")
