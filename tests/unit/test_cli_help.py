"""`tracker run --help` names the recovery settings and the limits with their true defaults."""

from __future__ import annotations

import re

import pytest

from tracker.cli import main
from tracker.settings import Settings, load_settings


def test_run_help_lists_the_recovery_settings_with_their_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", "--help"])
    assert exited.value.code == 0
    shown = dict(re.findall(r"^\s+TRACKER_([A-Z_]+)=(\S*)", capsys.readouterr().out, re.M))
    new = {"HEARTBEAT_TIMEOUT", "MAX_RETRY_AFTER", "MAX_FILE_SIZE", "ON_FINAL_ENV"}
    assert new | {"LEASE_DURATION", "FILE_MODE"} <= set(shown)
    defaults = Settings()
    for name, value in shown.items():
        # The value shown, read as the setting would read it, is the setting's default.
        parsed = load_settings({f"TRACKER_{name}": value}) if value else defaults
        assert getattr(parsed, name.lower()) == getattr(defaults, name.lower()), name


def test_web_help_names_the_console_settings_with_their_true_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["web", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "--allow-actions" in text
    shown = dict(re.findall(r"^\s+TRACKER_(CONSOLE_[A-Z_]+)=(\S*)", text, re.M))
    assert set(shown) == {"CONSOLE_ADDR", "CONSOLE_TOKEN", "CONSOLE_TOKEN_FILE"}
    assert shown["CONSOLE_ADDR"] == Settings().console_addr
    assert shown["CONSOLE_TOKEN"] == "" and shown["CONSOLE_TOKEN_FILE"] == ""
