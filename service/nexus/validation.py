"""Request validation: each check names the request field it rejects.

Validation happens before any database call, so bad input writes nothing.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from google.protobuf import descriptor_pool, empty_pb2, json_format, message, struct_pb2, timestamp_pb2, unknown_fields

from nexus.errors import InvalidArgument

USER_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
_UUID_PATTERN = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_WORD_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,31}")
_REQUEST_ID_PATTERN = re.compile(r"[\x21-\x7e]{1,64}")

MAX_BATCH = 1000
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# Levels of objects and arrays in a Struct ({"a": [1]} is 2). Protobuf decoders
# stop at 100 nested messages (about 33 Struct levels), and a stored Struct must
# still decode when a response wraps it one or two messages deeper.
MAX_STRUCT_DEPTH = 32
# pgvector's cosine distance divides by the float32 sums of squares of both
# vectors (src/vector.c): one that underflows to 0 or overflows to infinity
# there gives NaN distances. A squared length within float32's normal range,
# with room for the rounding of that float32 sum, keeps every distance defined.
MIN_SQUARED_NORM = 2.0**-126
MAX_SQUARED_NORM = 2.0**127


def user_id(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(field, "required")
    if not USER_ID_PATTERN.fullmatch(value):
        raise InvalidArgument(field, "must be 1-128 characters of [A-Za-z0-9_.:@-]")
    return value


def optional_user_id(value: str, field: str) -> str | None:
    return user_id(value, field) if value else None


def opaque_id(value: str, field: str) -> str:
    """An id from another system (a grant, an entry ...): same alphabet as user ids."""
    return user_id(value, field)


def optional_opaque_id(value: str, field: str) -> str | None:
    return opaque_id(value, field) if value else None


def entry_id(value: str, field: str) -> uuid.UUID:
    if not value:
        raise InvalidArgument(field, "required")
    if not _UUID_PATTERN.fullmatch(value):
        raise InvalidArgument(field, "must be a UUID")
    return uuid.UUID(value)


# Memory and arc ids are UUIDs, checked as entry ids are.
memory_id = entry_id


def entry_ids(values: Sequence[str], field: str) -> list[uuid.UUID]:
    """Up to 1000 UUIDs; duplicates collapse to their first occurrence."""
    if len(values) > MAX_BATCH:
        raise InvalidArgument(field, f"at most {MAX_BATCH} ids per call")
    return list(dict.fromkeys(entry_id(v, f"{field}[{i}]") for i, v in enumerate(values)))


def user_ids(values: Sequence[str], field: str) -> list[str]:
    """Up to 1000 user ids; duplicates collapse to their first occurrence."""
    if len(values) > MAX_BATCH:
        raise InvalidArgument(field, f"at most {MAX_BATCH} ids per call")
    return list(dict.fromkeys(user_id(v, f"{field}[{i}]") for i, v in enumerate(values)))


def amount(value: int, field: str = "amount") -> int:
    if value <= 0:
        raise InvalidArgument(field, "must be greater than zero")
    return value


def word(value: str, field: str, *, required: bool = True) -> str | None:
    """A short lowercase word: 1-32 chars of [a-z0-9_], starting with a letter."""
    if not value:
        if required:
            raise InvalidArgument(field, "required")
        return None
    if not _WORD_PATTERN.fullmatch(value):
        raise InvalidArgument(field, "must be 1-32 characters of [a-z0-9_] starting with a letter")
    return value


def text(value: str, field: str, max_chars: int) -> str:
    if len(value) > max_chars:
        raise InvalidArgument(field, f"at most {max_chars} characters")
    if "\x00" in value:
        raise InvalidArgument(field, "must not contain NUL characters")
    return value


def request_id(value: str, field: str = "request_id", *, required: bool) -> str | None:
    if not value:
        if required:
            raise InvalidArgument(field, "required")
        return None
    if not _REQUEST_ID_PATTERN.fullmatch(value):
        raise InvalidArgument(field, "must be 1-64 printable ASCII characters without spaces")
    return value


def tags(values: Iterable[str], field: str = "tags", *, max_tags: int = 32, max_chars: int = 64) -> list[str]:
    """Distinct tags in first-seen order."""
    unique = list(dict.fromkeys(values))
    if len(unique) > max_tags:
        raise InvalidArgument(field, f"at most {max_tags} tags")
    for i, tag in enumerate(unique):
        if not tag or len(tag) > max_chars or "\x00" in tag:
            raise InvalidArgument(f"{field}[{i}]", f"must be 1-{max_chars} characters")
    return unique


def metadata(value: struct_pb2.Struct, field: str = "metadata", *, max_bytes: int = 16 * 1024) -> dict[str, object]:
    """The Struct as a JSON object of at most max_bytes."""
    try:
        as_dict: dict[str, object] = json_format.MessageToDict(value)
        document = json.dumps(as_dict, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:
        raise InvalidArgument(field, "must be valid JSON (no NaN or Infinity)") from exc
    if len(document.encode()) > max_bytes:
        raise InvalidArgument(field, f"at most {max_bytes} bytes as JSON")
    if _nesting(as_dict) > MAX_STRUCT_DEPTH:
        raise InvalidArgument(field, f"at most {MAX_STRUCT_DEPTH} levels of nested objects and arrays")
    if _contains_nul(as_dict):
        raise InvalidArgument(field, "must not contain NUL characters")
    return as_dict


def _nesting(value: object) -> int:
    """Levels of objects and arrays in a JSON value: 0 for a scalar, 1 for {"a": 1}."""
    if isinstance(value, dict):
        return 1 + max(map(_nesting, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_nesting, value), default=0)
    return 0


def _contains_nul(value: object) -> bool:
    """Whether a JSON value holds a NUL in any string (PostgreSQL text cannot)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_contains_nul(k) or _contains_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_contains_nul(v) for v in value)
    return False


_Enum = TypeVar("_Enum", bound=int)  # a proto enum's number type


def enum_value(value: _Enum, field: str, allowed: Mapping[_Enum, str], *, default: str | None = None) -> str:
    """Maps a proto enum number to its database name; 0 (UNSPECIFIED) takes the default."""
    if value == 0 and default is not None:
        return default
    if value not in allowed:
        raise InvalidArgument(field, f"unknown value {value}")
    return allowed[value]


def optional_enum_value(value: _Enum, field: str, allowed: Mapping[_Enum, str]) -> str | None:
    """Like enum_value, with 0 (UNSPECIFIED) meaning none."""
    return enum_value(value, field, allowed) if value else None


def page_size(value: int, field: str = "page_size", default: int = DEFAULT_PAGE_SIZE,
              maximum: int = MAX_PAGE_SIZE) -> int:
    """0 means the default (50); above the maximum (1000) is coerced to it (AIP-158)."""
    if value < 0:
        raise InvalidArgument(field, "must not be negative")
    return min(value or default, maximum)


def unit_interval(value: float, field: str) -> float:
    """A value in 0..1 (a threshold, an intensity)."""
    if not math.isfinite(value) or not 0 <= value <= 1:
        raise InvalidArgument(field, "must be between 0 and 1")
    return value


def score(value: float, field: str) -> float:
    """A value in 0..1 that scores multiply (a gravity, a weight); a subnormal
    one (below 2.2e-308, too small for arithmetic to keep) is 0."""
    value = unit_interval(value, field)
    return value if value >= sys.float_info.min else 0.0


def timestamp(value: timestamp_pb2.Timestamp, field: str) -> datetime.datetime:
    """A Timestamp that both Python and PostgreSQL can hold: 0001-01-01 to
    9999-12-31 UTC (protobuf's own range), nanos 0..999999999."""
    try:
        return value.ToDatetime(tzinfo=datetime.UTC)
    except ValueError as exc:  # ToDatetime checks protobuf's range
        raise InvalidArgument(
            field, "must be 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z, nanos 0..999999999"
        ) from exc


def optional_timestamp(request: message.Message, field: str) -> datetime.datetime | None:
    """The request's Timestamp field of that name as timestamp() checks it; None when unset."""
    return timestamp(getattr(request, field), field) if request.HasField(field) else None


def embedding(values: Sequence[float], field: str, dim: int, *, required: bool) -> list[float] | None:
    """A vector of exactly ``dim`` finite numbers with a direction: a squared
    length within MIN_SQUARED_NORM .. MAX_SQUARED_NORM (so not all zeros)."""
    if not values:
        if required:
            raise InvalidArgument(field, "required")
        return None
    if len(values) != dim:
        raise InvalidArgument(field, f"must have {dim} dimensions, not {len(values)}")
    vector = list(values)
    if not all(math.isfinite(v) for v in vector):
        raise InvalidArgument(field, "must hold finite numbers only")
    if not MIN_SQUARED_NORM <= math.fsum(v * v for v in vector) <= MAX_SQUARED_NORM:
        raise InvalidArgument(
            field, "must have a direction: not all zeros, the sum of its squares within 2^-126 .. 2^127 (float32)"
        )
    return vector


def undecodable_request(method: str, deserialize: Callable[[bytes], Any], data: bytes) -> InvalidArgument:
    """The error for a request of ``method`` ("/package.Service/Method") that
    ``deserialize`` rejected: a string that is not UTF-8, a Struct nested past
    the decoder's depth limit, or bytes that are no protobuf message at all.
    Names the top-level field at fault, found by decoding each field alone."""
    try:
        top_level = unknown_fields.UnknownFieldSet(empty_pb2.Empty.FromString(data))
    except message.DecodeError:
        return InvalidArgument("", "the request is not a valid protobuf message")
    request_type = descriptor_pool.Default().FindMethodByName(method.lstrip("/").replace("/", ".")).input_type
    for item in top_level:  # type: ignore[attr-defined]  # iterable by __getitem__; the stubs lack __iter__
        field = request_type.fields_by_number.get(item.field_number)
        if field is None or item.wire_type != _LENGTH_DELIMITED:
            continue
        try:
            deserialize(_varint(item.field_number << 3 | _LENGTH_DELIMITED) + _varint(len(item.data)) + item.data)
        except message.DecodeError:
            return InvalidArgument(
                field.name, f"cannot be decoded: a string that is not UTF-8, or a Struct nested too deeply "
                f"(at most {MAX_STRUCT_DEPTH} levels)"
            )
    return InvalidArgument("", "the request cannot be decoded")


_LENGTH_DELIMITED = 2


def _varint(value: int) -> bytes:
    """Protobuf's base-128 encoding of a non-negative integer."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
