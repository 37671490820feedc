"""Page and resume tokens alone: they round-trip, they are bound to their list,
and anything edited, forged or foreign is an InvalidArgument naming the field."""

from __future__ import annotations

import base64
import datetime
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexus.errors import InvalidArgument
from nexus.pagination import MAX_TOKEN_CHARS, PageTokens, Scope, scope_key, time_key

TOKENS = PageTokens(b"unit-test-key")
SCOPE: Scope = ("resonators", "entry-1")

scope_parts = st.one_of(st.none(), st.integers(), st.text(max_size=12))
scopes = st.lists(scope_parts, max_size=4).map(tuple)


def refusal(scope: Scope, token: str, tokens: PageTokens = TOKENS) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        tokens.decode(scope, token)
    return info.value


bigints = st.integers(0, 2**63 - 1)


@given(scope=scopes, position=st.lists(st.one_of(bigints, st.floats(0, allow_infinity=False),
                                                st.text(max_size=20)), max_size=3))
def test_a_token_decodes_to_its_position_in_its_own_scope(scope: Scope, position: list[object]) -> None:
    assert TOKENS.decode(scope, TOKENS.encode(scope, position)) == position


# Every scope starts with its list's name and then holds ids (text) or None.
ids = st.lists(st.one_of(st.none(), st.text(max_size=8)), max_size=3)
named_scopes = st.tuples(st.sampled_from(["tree", "resonators"]), ids).map(lambda parts: (parts[0], *parts[1]))


@given(a=named_scopes, b=named_scopes)
def test_no_two_scopes_share_a_key(a: Scope, b: Scope) -> None:
    """Ids may hold ``:``, ``\\`` or be the word "None": still one key per scope."""
    assert (scope_key(a) == scope_key(b)) == (a == b)


def test_scope_keys_of_ids_that_look_like_separators_differ() -> None:
    assert len({scope_key(s) for s in [("t", "a:b"), ("t", "a", "b"), ("t", None), ("t", "None"), ("t", "\\0")]}) == 5


def test_scope_keys_of_plain_parts_are_unchanged() -> None:
    """Earlier versions wrote ``":".join(parts)``: their resume tokens must stay valid."""
    assert scope_key(("events", "memory", "alice")) == "events:memory:alice"
    assert scope_key(("a:b", None)) != scope_key(("a", "b:None"))


def test_an_empty_token_is_the_first_page() -> None:
    assert TOKENS.decode(SCOPE, "") is None
    assert TOKENS.decode_time_key(SCOPE, "") == (None, None)


def test_a_token_of_another_list_is_refused() -> None:
    token = TOKENS.encode(("resonators", "entry-2"), [5])
    assert refusal(SCOPE, token).field == "page_token"
    assert "different list" in refusal(SCOPE, token).description


@pytest.mark.parametrize("token", ["garbage", "!!!", "AAAA", base64.urlsafe_b64encode(b"[1]").decode()])
def test_garbage_is_refused(token: str) -> None:
    assert refusal(SCOPE, token).field == "page_token"


def test_an_edited_or_foreign_token_is_refused() -> None:
    token = TOKENS.encode(SCOPE, [5])
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[-20] ^= 1  # a byte of the body: the MAC no longer matches
    edited = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    assert refusal(SCOPE, edited).description == "not a token issued by this service"
    assert refusal(SCOPE, token, PageTokens(b"another-key")).description == "not a token issued by this service"


def test_decode_as_refuses_a_signed_token_of_another_shape() -> None:
    assert TOKENS.decode_as(SCOPE, TOKENS.encode(SCOPE, [3, "x"]), (int, str)) == [3, "x"]
    for position in ([3], ["3", "x"], [3, "x", 4], [True, "x"]):
        with pytest.raises(InvalidArgument) as info:
            TOKENS.decode_as(SCOPE, TOKENS.encode(SCOPE, position), (int, str), field="resume_token")
        assert info.value.field == "resume_token"


def test_time_keys_round_trip_to_the_microsecond() -> None:
    time = datetime.datetime(2026, 12, 2, 7, 40, 1, 123456, tzinfo=datetime.UTC)
    assert TOKENS.decode_time_key(SCOPE, TOKENS.encode(SCOPE, time_key(time, "m-1"))) == (time, "m-1")


def test_a_time_key_out_of_range_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        TOKENS.decode_time_key(SCOPE, TOKENS.encode(SCOPE, [10**20, "m-1"]))


@pytest.mark.parametrize(
    "position",
    [[2**63], [-1], [-0.5], [2**70], [math.nan], [math.inf], [[1]], [{"a": 1}], [None], [True], ["x", [2**40, 1]]],
)
def test_a_signed_token_holding_what_the_service_never_issues_is_refused(position: list[object]) -> None:
    assert refusal(SCOPE, TOKENS.encode(SCOPE, position)).description == "not a token issued by this service"


def test_a_signed_token_nested_past_any_decoder_is_refused() -> None:
    body = b'["' + scope_key(SCOPE).encode() + b'",' + b"[" * 2500 + b"]" * 2500 + b"]"
    token = TOKENS.sign(body)
    assert len(token) <= MAX_TOKEN_CHARS  # within the size bound: the decoder itself meets the depth
    assert refusal(SCOPE, token).description == "not a token issued by this service"


def test_a_token_longer_than_any_the_service_issues_is_refused_before_decoding() -> None:
    token = TOKENS.encode(SCOPE, ["x" * MAX_TOKEN_CHARS])
    assert len(token) > MAX_TOKEN_CHARS
    assert refusal(SCOPE, token).description == "not a token issued by this service"
