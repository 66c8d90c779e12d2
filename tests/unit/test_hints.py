"""Reading a webhook delivery: the request_ids it may name, and its log preview."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracker.domain.hints import MAX_CANDIDATES, PREVIEW_LIMIT, body_preview, request_ids_in
from tracker.domain.redact import REDACTED

ID = "0f3c2b1a9d8e7f6a5b4c3d2e1f0a9b8c"
OTHER = "sim-000042"
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"


def test_json_strings_at_any_depth_keys_and_values() -> None:
    body = json.dumps(
        {"event": "done", "data": [{"requests": {ID: {"status": "completed"}}}, [[OTHER]]]}
    ).encode()
    found = request_ids_in(JSON, body, "")
    assert {ID, OTHER} <= found
    # Field names and words are candidates too; the store keeps only tracked batches.
    assert {"event", "done", "status", "completed"} <= found


def test_a_string_counts_only_whole() -> None:
    body = json.dumps({"message": f"batch {ID} completed", "url": f"https://x/{OTHER}"}).encode()
    assert ID not in request_ids_in(JSON, body, "")
    assert OTHER not in request_ids_in(JSON, body, "")


def test_json_escapes_are_decoded() -> None:
    escaped = "".join(f"\\u{ord(c):04x}" for c in ID)
    assert ID in request_ids_in(JSON, f'{{"id": "{escaped}"}}'.encode(), "")


def test_json_without_a_json_content_type_and_a_truncated_document() -> None:
    body = f'[{{"request_id": "{ID}"}}, {{"request_id": "{OTHER}'.encode()
    assert ID in request_ids_in("text/plain", body, "")
    assert ID in request_ids_in(None, b"\xef\xbb\xbf  " + body, "")


def test_a_form_and_the_query_string() -> None:
    assert {ID, OTHER} <= request_ids_in(FORM, f"request_id={ID}&x={OTHER}".encode(), "")
    assert {ID, "request_id"} <= request_ids_in(None, b"", f"request_id={ID}")
    assert {ID, OTHER} <= request_ids_in(JSON, json.dumps([OTHER]).encode(), f"id={ID}")
    # Without a content type, a body holding `=` is read as a form.
    assert ID in request_ids_in(None, f"id={ID}".encode(), "")


def test_a_bare_id_as_a_plain_body() -> None:
    assert request_ids_in("text/plain", f"  {ID}\n".encode(), "") == {ID}


def test_malformed_ids_are_not_candidates() -> None:
    body = json.dumps(["-leading-dash", "a.b", "x" * 129, "", "with space", "ok_1"]).encode()
    assert request_ids_in(JSON, body, "") == {"ok_1"}


def test_unreadable_bodies_name_nothing() -> None:
    for body in (b"\xff\xfe\x00garbage", b"{", b'"', b"\\", b'{"a": "\\x"}', b"\x00" * 100):
        found = request_ids_in(JSON, body, "")
        assert all(len(c) <= 128 for c in found)
    assert request_ids_in(JSON, b'{"a": "\\x"}', "") == {"a"}


def test_ten_thousand_deep_json() -> None:
    deep = ("[" * 10_000 + json.dumps(ID) + "]" * 10_000).encode()
    assert request_ids_in(JSON, deep, "") == {ID}
    objects = ('{"a":' * 10_000 + json.dumps(ID) + "}" * 10_000).encode()
    assert request_ids_in(JSON, objects, "") == {"a", ID}


def test_candidates_are_bounded() -> None:
    huge = json.dumps([f"id{n}" for n in range(100_000)]).encode()
    found = request_ids_in(JSON, huge, "")
    assert len(found) == MAX_CANDIDATES
    assert "id0" in found
    form = "&".join(f"f{n}=v{n}" for n in range(50_000)).encode()
    assert len(request_ids_in(FORM, form, "")) == MAX_CANDIDATES
    # Duplicates count once.
    assert request_ids_in(JSON, json.dumps([ID] * 100_000).encode(), "") == {ID}


def test_preview_is_one_redacted_trimmed_line() -> None:
    body = (
        b'{"url": "https://bucket/x.csv?X-Amz-Signature=abcdef123456",\n'
        b'"token": "s3cr3t-token-value", "callback": "https://me/webhook/the-secret-path"}'
    )
    preview = body_preview(body, secrets=("the-secret-path",))
    assert "\n" not in preview
    assert "abcdef123456" not in preview
    assert "s3cr3t-token-value" not in preview
    assert "the-secret-path" not in preview
    assert REDACTED in preview
    long = body_preview(b"word " * 10_000)
    assert len(long) <= PREVIEW_LIMIT and long.endswith("...")
    assert body_preview(b"\x00\x01\xff\r\n\tend") == "\ufffd end"


def test_preview_of_a_huge_body_drops_a_cut_token() -> None:
    # The token straddles the point where the preview stops reading.
    body = b"x " * 8_190 + b"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.sig" * 100
    preview = body_preview(body, limit=100_000)
    assert "eyJ" not in preview.replace(REDACTED, "")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    content_type=st.none() | st.text(max_size=40),
    body=st.binary(max_size=2_000),
    query=st.text(max_size=200),
)
def test_arbitrary_deliveries_never_raise(
    content_type: str | None, body: bytes, query: str
) -> None:
    found = request_ids_in(content_type, body, query)
    assert len(found) <= MAX_CANDIDATES
    assert all(isinstance(c, str) and 1 <= len(c) <= 128 for c in found)
    preview = body_preview(body)
    assert len(preview) <= PREVIEW_LIMIT and "\n" not in preview


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    document=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
        ),
        max_leaves=30,
    )
)
def test_every_id_shaped_string_in_any_json_is_found(document: object) -> None:
    body = json.dumps(document).encode()
    found = request_ids_in(JSON, body, "")

    def strings(value: object) -> set[str]:
        if isinstance(value, str):
            return {value}
        if isinstance(value, list):
            return set().union(*(strings(v) for v in value)) if value else set()
        if isinstance(value, dict):
            return (
                set().union(*(strings(k) | strings(v) for k, v in value.items()))
                if value
                else set()
            )
        return set()

    from tracker.domain.request_ids import REQUEST_ID_PATTERN

    assert found == {s for s in strings(document) if REQUEST_ID_PATTERN.fullmatch(s)}


def test_preview_of_a_huge_multibyte_body_is_marked_cut() -> None:
    preview = body_preview("é".encode() * 50_000, limit=100_000)
    assert preview == "..."
    assert body_preview("ab é ".encode() * 20_000, limit=50).endswith("...")
