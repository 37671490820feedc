"""Opaque, tamper-evident page tokens for keyset pagination.

A token is ``base64url(json([scope, position...]) + hmac)``. The scope binds it
to the list it came from (method and the list's owner), so a token cannot be
replayed against another list, and a garbage or edited token is rejected as
INVALID_ARGUMENT rather than reaching the database.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
from typing import Any

from nexus.errors import InvalidArgument

_MAC_BYTES = 16


class PageTokens:
    def __init__(self, key: bytes) -> None:
        self._key = hashlib.sha256(b"nexus page tokens\0" + key).digest()

    def encode(self, scope: str, position: list[Any]) -> str:
        body = json.dumps([scope, *position], separators=(",", ":")).encode()
        mac = hmac.new(self._key, body, hashlib.sha256).digest()[:_MAC_BYTES]
        return base64.urlsafe_b64encode(body + mac).rstrip(b"=").decode()

    def decode(self, scope: str, token: str, field: str = "page_token") -> list[Any] | None:
        """The position a token encodes, or None for an empty token (first page)."""
        if not token:
            return None
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            body, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
            expected = hmac.new(self._key, body, hashlib.sha256).digest()[:_MAC_BYTES]
            if len(raw) <= _MAC_BYTES or not hmac.compare_digest(mac, expected):
                raise ValueError("bad signature")
            decoded = json.loads(body)
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(field, "not a page token issued by this service") from exc
        if not isinstance(decoded, list) or not decoded or decoded[0] != scope:
            raise InvalidArgument(field, "page token belongs to a different list")
        return decoded[1:]


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_MICROSECOND = datetime.timedelta(microseconds=1)


def timestamp_position(value: datetime.datetime) -> int:
    """A timestamptz as exact epoch microseconds, for a token position."""
    return (value - _EPOCH) // _MICROSECOND


def position_timestamp(value: Any, field: str = "page_token") -> datetime.datetime:
    if not isinstance(value, int):
        raise InvalidArgument(field, "not a page token issued by this service")
    return _EPOCH + value * _MICROSECOND
