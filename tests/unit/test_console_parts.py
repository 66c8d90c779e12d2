"""The console's small pure parts: the list cursor, sessions, local redirect paths, the
hourly chart's geometry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tracker.console.auth import local_path
from tracker.console.chart import PLOT_HEIGHT, WIDTH, hour_bars
from tracker.console.csrf import CsrfTokens
from tracker.console.cursor import BadCursor, decode_cursor, encode_cursor
from tracker.console.sessions import Sessions


@given(st.integers(min_value=1, max_value=2**63 - 1))
def test_a_cursor_gives_back_its_id(last_id: int) -> None:
    cursor = encode_cursor(last_id)
    assert cursor.isascii() and str(last_id) not in cursor
    assert decode_cursor(cursor) == last_id


@given(st.text(max_size=60))
def test_anything_else_is_a_bad_cursor_never_another_error(text: str) -> None:
    try:
        decoded = decode_cursor(text)
    except BadCursor:
        return
    assert decoded > 0 and encode_cursor(decoded) == text.rstrip("=")


@pytest.mark.parametrize("text", ["", "aWQ6MA", "aWQ6LTE", "aWQ6", "aWQ6MS41", "MTIz", "@@@@"])
def test_bad_cursors(text: str) -> None:
    with pytest.raises(BadCursor):
        decode_cursor(text)


def test_sessions_expire_close_and_stay_bounded() -> None:
    now = [1000.0]
    sessions = Sessions(lifetime=60, limit=3, clock=lambda: now[0])
    first = sessions.open()
    assert sessions.is_open(first)
    assert len(first) >= 40, "a random id, long enough not to be guessed"
    now[0] += 61
    assert not sessions.is_open(first)

    ids = [sessions.open() for _ in range(4)]
    assert len(set(ids)) == 4
    assert not sessions.is_open(ids[0]), "the oldest goes beyond the limit"
    assert all(sessions.is_open(session_id) for session_id in ids[1:])
    sessions.close(ids[1])
    assert not sessions.is_open(ids[1])
    assert not sessions.is_open("made-up")


def test_csrf_tokens_differ_per_session_and_per_process() -> None:
    tokens = CsrfTokens()
    mine = tokens.for_identity("session:a")
    assert tokens.matches("session:a", mine)
    assert not tokens.matches("session:b", mine)
    assert not tokens.matches("session:a", None)
    assert not tokens.matches("session:a", mine.upper())
    assert not CsrfTokens().matches("session:a", mine), "a restart draws a new key"


@pytest.mark.parametrize(
    ("candidate", "expected"),
    [
        ("/batches?state=failed&label=a", "/batches?state=failed&label=a"),
        ("/batches/abc-1", "/batches/abc-1"),
        ("//evil.example", "/"),
        ("/\\evil.example", "/"),
        ("https://evil.example/", "/"),
        ("evil", "/"),
        ("/batches\r\nSet-Cookie: x=1", "/"),
        (None, "/"),
    ],
)
def test_only_local_paths_are_followed_after_login(candidate: str | None, expected: str) -> None:
    assert local_path(candidate) == expected


def test_the_hourly_chart_scales_to_the_busiest_hour() -> None:
    start = datetime(2026, 12, 1, 0, tzinfo=UTC)
    hourly = [(start + timedelta(hours=h), calls) for h, calls in enumerate([0] * 22 + [50, 100])]
    bars = hour_bars(hourly)
    assert len(bars) == 24
    assert bars[-1].height == PLOT_HEIGHT and bars[-1].y == 0
    assert bars[-2].height == PLOT_HEIGHT / 2
    assert bars[0].height == 1.0, "an idle hour keeps a visible stub"
    assert bars[-1].x + bars[-1].width <= WIDTH
    assert bars[-1].title == "23:00 UTC: 100 calls"
    assert [bar.tick for bar in bars if bar.tick] == ["00:00", "06:00", "12:00", "18:00"]
    assert hour_bars([]) == []
    assert hour_bars([(start, 0)])[0].height == 1.0
