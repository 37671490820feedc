"""The request validators alone: what each accepts, and that each refusal is an
InvalidArgument naming the field (the BadRequest the caller sees). No database,
no server: tests/service/test_validation.py checks the same rules through every RPC."""

from __future__ import annotations

import datetime
import math
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from google.protobuf import struct_pb2, timestamp_pb2

from nexus import validation
from nexus.errors import InvalidArgument


def refused_field(check: Callable[[], Any]) -> str:
    """The field an InvalidArgument names, for a check that must refuse."""
    with pytest.raises(InvalidArgument) as info:
        check()
    return info.value.field


@pytest.mark.parametrize("value", ["alice", "a", "u" * 128, "svc:billing@eu-1", "A_b.c-9"])
def test_user_ids_of_the_allowed_alphabet_pass(value: str) -> None:
    assert validation.user_id(value, "user_id") == value


@pytest.mark.parametrize("value", ["", "u" * 129, "al ice", "a/b", "alicé", "a\x00", "' OR 1=1"])
def test_other_user_ids_name_the_field(value: str) -> None:
    assert refused_field(lambda: validation.user_id(value, "author_id")) == "author_id"


def test_optional_ids_are_none_when_empty_and_checked_otherwise() -> None:
    assert validation.optional_user_id("", "viewer_id") is None
    assert validation.optional_opaque_id("", "grant_id") is None
    assert refused_field(lambda: validation.optional_user_id("a b", "viewer_id")) == "viewer_id"


def test_entry_ids_are_uuids_and_a_batch_names_the_bad_element() -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    assert validation.entry_id(str(first).upper(), "entry_id") == first
    assert validation.entry_ids([str(first), str(second), str(first)], "entry_ids") == [first, second]
    assert refused_field(lambda: validation.entry_id("not-a-uuid", "entry_id")) == "entry_id"
    assert refused_field(lambda: validation.entry_ids([str(first), "x"], "entry_ids")) == "entry_ids[1]"
    too_many = [str(first)] * (validation.MAX_BATCH + 1)
    assert refused_field(lambda: validation.entry_ids(too_many, "entry_ids")) == "entry_ids"


def test_user_id_batches_drop_duplicates_in_first_seen_order() -> None:
    assert validation.user_ids(["bob", "alice", "bob"], "user_ids") == ["bob", "alice"]
    assert refused_field(lambda: validation.user_ids(["bob", ""], "user_ids")) == "user_ids[1]"


@pytest.mark.parametrize("value", [0, -1])
def test_amounts_must_be_positive(value: int) -> None:
    assert refused_field(lambda: validation.amount(value)) == "amount"


def test_words_are_short_lowercase_and_start_with_a_letter() -> None:
    assert validation.word("saved_2", "action") == "saved_2"
    assert validation.word("", "emotion_type", required=False) is None
    for bad in ["", "Saved", "1st", "sa-ved", "a" * 33]:
        assert refused_field(lambda bad=bad: validation.word(bad, "action")) == "action"


def test_text_has_a_length_limit_and_no_nul() -> None:
    assert validation.text("é" * 10, "content", 10) == "é" * 10
    assert refused_field(lambda: validation.text("x" * 11, "content", 10)) == "content"
    assert refused_field(lambda: validation.text("a\x00b", "title", 10)) == "title"


def test_request_ids_are_printable_ascii_without_spaces() -> None:
    assert validation.request_id("retry-1/a", required=True) == "retry-1/a"
    assert validation.request_id("", required=False) is None
    for bad in ["", "has space", "x" * 65, "é"]:
        assert refused_field(lambda bad=bad: validation.request_id(bad, required=True)) == "request_id"


def test_tags_are_distinct_bounded_and_a_bad_one_is_named_by_index() -> None:
    assert validation.tags(["b", "a", "b"]) == ["b", "a"]
    assert refused_field(lambda: validation.tags(["ok", ""])) == "tags[1]"
    assert refused_field(lambda: validation.tags(["ok", "x" * 65])) == "tags[1]"
    assert refused_field(lambda: validation.tags([str(i) for i in range(33)])) == "tags"


def test_metadata_is_bounded_json_without_nul() -> None:
    small = struct_pb2.Struct()
    small.update({"a": [1, "two", {"b": None}]})
    assert validation.metadata(small) == {"a": [1, "two", {"b": None}]}

    big = struct_pb2.Struct()
    big.update({"blob": "x" * (16 * 1024)})
    assert refused_field(lambda: validation.metadata(big)) == "metadata"

    nested: dict[str, Any] = {}
    level = nested
    for _ in range(validation.MAX_STRUCT_DEPTH):
        level["n"] = {}
        level = level["n"]
    deep = struct_pb2.Struct()
    deep.update(nested)
    assert refused_field(lambda: validation.metadata(deep)) == "metadata"

    nul = struct_pb2.Struct()
    nul.update({"k\x00": "v"})
    assert refused_field(lambda: validation.metadata(nul, "payload")) == "payload"


def test_enum_values_map_numbers_to_names_and_zero_to_the_default() -> None:
    names = {1: "public", 2: "private"}
    assert validation.enum_value(2, "privacy", names) == "private"
    assert validation.enum_value(0, "privacy", names, default="public") == "public"
    assert validation.optional_enum_value(0, "status", names) is None
    assert refused_field(lambda: validation.enum_value(7, "privacy", names)) == "privacy"
    assert refused_field(lambda: validation.enum_value(0, "privacy", names)) == "privacy"  # no default


def test_page_size_defaults_and_caps() -> None:
    assert validation.page_size(0) == validation.DEFAULT_PAGE_SIZE
    assert validation.page_size(7) == 7
    assert validation.page_size(10**6) == validation.MAX_PAGE_SIZE
    assert refused_field(lambda: validation.page_size(-1)) == "page_size"


@pytest.mark.parametrize("value", [-0.01, 1.01, math.nan, math.inf])
def test_unit_interval_refuses_outside_zero_to_one(value: float) -> None:
    assert refused_field(lambda: validation.unit_interval(value, "gravity_score")) == "gravity_score"


def test_timestamps_within_protobufs_range_convert_to_utc() -> None:
    stamp = timestamp_pb2.Timestamp(seconds=86_400, nanos=1000)
    assert validation.timestamp(stamp, "since") == datetime.datetime(1970, 1, 2, 0, 0, 0, 1, tzinfo=datetime.UTC)
    too_late = timestamp_pb2.Timestamp(seconds=253_402_300_800)  # 10000-01-01
    assert refused_field(lambda: validation.timestamp(too_late, "since")) == "since"


def test_embeddings_have_the_dimension_finite_values_and_a_direction() -> None:
    assert validation.embedding([3.0, 4.0], "embedding", 2, required=True) == [3.0, 4.0]
    assert validation.embedding([], "embedding", 2, required=False) is None
    for bad in ([], [1.0], [1.0, math.nan], [0.0, 0.0], [1e30, 1e30]):
        assert refused_field(lambda bad=bad: validation.embedding(bad, "embedding", 2, required=True)) == "embedding"
