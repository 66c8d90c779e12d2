"""RecentlyAsked: the listener asks the database about an id once per spacing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tracker.domain.recent_hints import RecentlyAsked


def test_an_id_is_asked_once_per_spacing() -> None:
    recent = RecentlyAsked(spacing=30)
    assert recent.claim({"a", "b"}, now=100.0) == {"a", "b"}
    assert recent.claim({"a", "b", "c"}, now=110.0) == {"c"}
    assert recent.claim({"a"}, now=129.9) == set()
    # Thirty seconds after it was asked, the database is asked again.
    assert recent.claim({"a", "b", "c"}, now=130.0) == {"a", "b"}
    assert recent.claim({"c"}, now=140.0) == {"c"}


def test_forgotten_ids_are_asked_again() -> None:
    """A failed database call must not swallow the next delivery's hint."""
    recent = RecentlyAsked(spacing=30)
    assert recent.claim({"a", "b"}, now=0.0) == {"a", "b"}
    recent.forget({"a", "b"})
    assert recent.claim({"a", "b"}, now=1.0) == {"a", "b"}


def test_the_memory_is_bounded_and_drops_the_oldest() -> None:
    recent = RecentlyAsked(spacing=3600, capacity=3)
    for n, request_id in enumerate("abcde"):
        recent.claim({request_id}, now=float(n))
    assert len(recent) == 3
    assert recent.claim({"a", "b", "c", "d", "e"}, now=10.0) == {"a", "b"}


def test_no_spacing_remembers_nothing() -> None:
    recent = RecentlyAsked(spacing=0)
    assert recent.claim({"a"}, now=1.0) == {"a"}
    assert recent.claim({"a"}, now=1.0) == {"a"}


def test_a_capacity_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        RecentlyAsked(spacing=30, capacity=0)


@given(
    st.lists(
        st.tuples(st.sets(st.sampled_from("abcdef"), max_size=4), st.floats(0, 5)),
        max_size=40,
    )
)
def test_never_claims_an_id_twice_within_the_spacing(asks: list[tuple[set[str], float]]) -> None:
    recent = RecentlyAsked(spacing=10)
    now = 0.0
    last_claim: dict[str, float] = {}
    for ids, step in asks:
        now += step
        for request_id in recent.claim(ids, now):
            assert now - last_claim.get(request_id, -1e9) >= 10
            last_claim[request_id] = now
        # Every id asked is claimed unless it was claimed within the spacing.
        for request_id in ids:
            assert now - last_claim[request_id] < 10
