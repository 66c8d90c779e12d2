"""Durations as people write them, and every duration setting accepting them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tracker.domain.durations import UNIT_SECONDS, format_duration, parse_duration
from tracker.settings import SettingsError, load_settings


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 30.0),
        ("0.5", 0.5),
        (".5", 0.5),
        ("2.", 2.0),
        ("0", 0.0),
        ("90s", 90.0),
        ("15m", 900.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("7d", 604800.0),
        ("2w", 1209600.0),
        ("1w2d3h4m5s", 604800 + 2 * 86400 + 3 * 3600 + 4 * 60 + 5.0),
        ("1h 30m", 5400.0),
        ("  15m\n", 900.0),
        ("0.25s", 0.25),
        # TOML floats reach the parser through str(), which may use exponents.
        ("1e+16", 1e16),
        ("2.5e-3", 0.0025),
    ],
)
def test_accepted(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "is empty"),
        ("   ", "is empty"),
        ("-1", "must not be negative"),
        ("-5m", "must not be negative"),
        ("1h-30m", "cannot read '-30m'"),
        ("+5", "cannot read '+5'"),
        ("nan", "cannot read 'nan'"),
        ("inf", "cannot read 'inf'"),
        ("infinity", "cannot read 'infinity'"),
        ("1_000", "cannot read '1_000'"),
        ("5x", "unknown unit 'x'"),
        ("1hr", "unknown unit 'hr'"),
        ("1H", "unknown unit 'H'"),
        ("1h30", "'30' has no unit"),
        ("30m1h", "repeated or out of order"),
        ("1m1m", "repeated or out of order"),
        ("m", "cannot read 'm'"),
        ("1e400", "too large"),
        ("9" * 400 + "w", "too large"),
        # Digits from other scripts are digits to float(), not to people reading a config.
        ("\u0661\u0662", "cannot read"),
    ],
)
def test_refused_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_duration(text)
    assert reason in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.5, "0.5s"),
        (59, "59s"),
        (60, "1m"),
        (90, "1m30s"),
        (5400, "1h30m"),
        (86400, "1d"),
        (8 * 86400 + 61, "8d1m1s"),
        (1.4999999, "1.5s"),
    ],
)
def test_format(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_format_refuses_what_is_not_a_duration(bad: float) -> None:
    with pytest.raises(ValueError, match="cannot format"):
        format_duration(bad)


units = st.sampled_from(list(UNIT_SECONDS))


@given(
    st.dictionaries(units, st.integers(min_value=0, max_value=10**6), min_size=1),
    st.booleans(),
)
def test_any_ordered_combination_of_units_adds_up(parts: dict[str, int], spaced: bool) -> None:
    ordered = [unit for unit in "wdhms" if unit in parts]
    text = (" " if spaced else "").join(f"{parts[unit]}{unit}" for unit in ordered)
    assert parse_duration(text) == sum(parts[unit] * UNIT_SECONDS[unit] for unit in ordered)


@given(st.integers(min_value=0, max_value=10**9))
def test_whole_seconds_round_trip(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.floats(min_value=0, max_value=10**7, allow_nan=False, allow_infinity=False))
def test_fractions_round_trip_to_the_millisecond(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=5e-4)


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False))
def test_plain_seconds_read_as_before(seconds: float) -> None:
    # Every value the old float() parser took from a TOML number still reads the same.
    assert parse_duration(str(seconds)) == seconds


# --- the settings that take durations -------------------------------------------------

DURATION_SETTINGS = [
    ("TRACKER_SWEEP_INTERVAL", "sweep_interval"),
    ("TRACKER_POLL_MIN_INTERVAL", "poll_min_interval"),
    ("TRACKER_POLL_MAX_INTERVAL", "poll_max_interval"),
    ("TRACKER_MAX_AGE", "max_age"),
    ("TRACKER_HTTP_TIMEOUT", "http_timeout"),
    ("TRACKER_DOWNLOAD_DEADLINE", "download_deadline"),
    ("TRACKER_LEASE_DURATION", "lease_duration"),
    ("TRACKER_SHUTDOWN_GRACE", "shutdown_grace"),
]


@pytest.mark.parametrize(("variable", "name"), DURATION_SETTINGS)
def test_every_duration_setting_accepts_units(variable: str, name: str) -> None:
    # Both poll bounds at once, so min <= max holds whichever is being set.
    base = {"TRACKER_POLL_MIN_INTERVAL": "1s", "TRACKER_POLL_MAX_INTERVAL": "2h"}
    settings = load_settings(base | {variable: "1h30m"})
    assert getattr(settings, name) == 5400.0


def test_units_in_a_realistic_environment() -> None:
    settings = load_settings(
        {
            "TRACKER_MAX_AGE": "7d",
            "TRACKER_SWEEP_INTERVAL": "0.5",
            "TRACKER_POLL_MIN_INTERVAL": "30s",
            "TRACKER_POLL_MAX_INTERVAL": "15m",
            "TRACKER_DOWNLOAD_DEADLINE": "1.5h",
        }
    )
    assert settings.max_age == 604800.0
    assert settings.sweep_interval == 0.5
    assert settings.poll_policy.min_interval == 30.0
    assert settings.poll_policy.max_interval == 900.0
    assert settings.download_deadline == 5400.0


def test_units_in_a_toml_file(tmp_path: Path) -> None:
    config = tmp_path / "tracker.toml"
    config.write_text('max_age = "3d"\nsweep_interval = 2.5\nlease_duration = "5m"\n')
    settings = load_settings({}, config)
    assert (settings.max_age, settings.sweep_interval, settings.lease_duration) == (
        259200.0,
        2.5,
        300.0,
    )


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("0", "must be a positive duration"),
        ("0s", "must be a positive duration"),
        ("-5m", "must not be negative"),
        ("5 minutes", "unknown unit 'minutes'"),
        ("nan", "cannot read 'nan'"),
        ("", None),  # empty in the environment means "not set", the default applies
    ],
)
def test_bad_durations_name_the_setting_in_one_line(value: str, reason: str | None) -> None:
    environ = {"TRACKER_MAX_AGE": value}
    if reason is None:
        assert load_settings(environ).max_age == 7 * 86400.0
        return
    with pytest.raises(SettingsError) as raised:
        load_settings(environ)
    message = str(raised.value)
    assert message.startswith(f"TRACKER_MAX_AGE={value!r}: ")
    assert reason in message
    assert "\n" not in message


def test_poll_bounds_compare_after_units() -> None:
    with pytest.raises(SettingsError, match="TRACKER_POLL_MIN_INTERVAL must not exceed"):
        load_settings({"TRACKER_POLL_MIN_INTERVAL": "1h", "TRACKER_POLL_MAX_INTERVAL": "59m"})
    settings = load_settings(
        {"TRACKER_POLL_MIN_INTERVAL": "1h", "TRACKER_POLL_MAX_INTERVAL": "60m"}
    )
    assert settings.poll_min_interval == settings.poll_max_interval == 3600.0
