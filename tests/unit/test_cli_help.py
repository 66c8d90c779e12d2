"""`tracker run --help` names the recovery settings with their true defaults."""

from __future__ import annotations

import re

import pytest

from tracker.cli import main
from tracker.settings import Settings


def test_run_help_lists_the_recovery_settings_with_their_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", "--help"])
    assert exited.value.code == 0
    shown = dict(re.findall(r"^\s+TRACKER_([A-Z_]+)=(\S+)", capsys.readouterr().out, re.M))
    assert {"LEASE_DURATION", "HEARTBEAT_TIMEOUT", "MAX_RETRY_AFTER"} <= set(shown)
    defaults = Settings()
    for name, value in shown.items():
        assert float(value) == getattr(defaults, name.lower()), name
