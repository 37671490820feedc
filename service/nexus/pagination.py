"""Opaque, tamper-evident page tokens for keyset pagination.

A token is ``base64url(json([scope, position...]) + hmac)``. The scope binds it
to the list it came from (method and the list's owner), so a token cannot be
replayed against another list, and a garbage or edited token is rejected as
INVALID_ARGUMENT rather than reaching the database.

A scope is a tuple of its parts (``("tree", entry_id, max_depth, viewer)``),
written into the token as one string by ``scope_key``, which no two scopes
share: a user id may contain ``:`` or be the word ``None``, so parts are
escaped, and "no viewer" (None) has a spelling no string part can have.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias, TypeVar

from nexus.errors import InvalidArgument

_MAC_BYTES = 16
# The longest token this service accepts: far above any it issues (a scope of
# a few ids, a position of a few values or a reply's tree path), far below one
# that costs anything to decode.
MAX_TOKEN_CHARS = 8192
# The largest integer in a position: a PostgreSQL bigint's.
_INT64_MAX = 2**63 - 1

Scope: TypeAlias = tuple[str | int | None, ...]
Row = TypeVar("Row")


def scope_key(scope: Scope) -> str:
    """The parts joined by ``:``, each with ``\\`` and ``:`` escaped and None
    written ``\\0``: decodable, hence never the same for two scopes. A scope
    of plain parts keeps the key earlier versions wrote, so their tokens (a
    stream's resume token lives for days) stay valid across an upgrade."""
    return ":".join(
        "\\0" if part is None else str(part).replace("\\", "\\\\").replace(":", "\\:") for part in scope
    )


class PageTokens:
    def __init__(self, key: bytes) -> None:
        self._key = hashlib.sha256(b"nexus page tokens\0" + key).digest()

    def encode(self, scope: Scope, position: list[Any]) -> str:
        return self.sign(json.dumps([scope_key(scope), *position], separators=(",", ":")).encode())

    def sign(self, body: bytes) -> str:
        """A token of ``body`` as it stands (encode's JSON, or any bytes, for tests)."""
        mac = hmac.new(self._key, body, hashlib.sha256).digest()[:_MAC_BYTES]
        return base64.urlsafe_b64encode(body + mac).rstrip(b"=").decode()

    def decode(self, scope: Scope, token: str, field: str = "page_token") -> list[Any] | None:
        """The position a token encodes, or None for an empty token (first page):
        a list of strings and of numbers from 0 (integers up to PostgreSQL's
        bigint), as the service issues. ``field`` names the request field in errors."""
        if not token:
            return None
        if len(token) > MAX_TOKEN_CHARS:
            raise _not_ours(field)
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            body, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
            expected = hmac.new(self._key, body, hashlib.sha256).digest()[:_MAC_BYTES]
            if len(raw) <= _MAC_BYTES or not hmac.compare_digest(mac, expected):
                raise ValueError("bad signature")
            decoded = json.loads(body)
        except (ValueError, TypeError, RecursionError) as exc:
            raise _not_ours(field) from exc
        if not isinstance(decoded, list) or not decoded or decoded[0] != scope_key(scope):
            raise InvalidArgument(field, "token belongs to a different list or stream")
        position = decoded[1:]
        if not all(_issuable(value) for value in position):
            raise _not_ours(field)
        return position

    def decode_as(self, scope: Scope, token: str, types: tuple[type, ...], field: str = "page_token") -> list[Any] | None:
        """Like decode, for a position of exactly these types (a signed token of
        another shape is still not ours)."""
        position = self.decode(scope, token, field)
        if position is None:
            return None
        if len(position) != len(types) or not all(type(v) is t for v, t in zip(position, types, strict=True)):
            raise _not_ours(field)
        return position

    def page(
        self, scope: Scope, rows: Sequence[Row], limit: int, position: Callable[[Row], list[Any]]
    ) -> tuple[Sequence[Row], str]:
        """Splits the ``limit + 1`` rows read for a page (one more than it shows,
        to learn whether another page follows) into the page and the next page's
        token, "" after the last page. ``position`` is a row's place in the
        list's order: the keyset the next page starts after."""
        if len(rows) <= limit:
            return rows, ""
        return rows[:limit], self.encode(scope, position(rows[limit - 1]))

    def decode_time_key(self, scope: Scope, token: str) -> tuple[datetime.datetime | None, str | None]:
        """The (time, key) position of a token of a list ordered by (time, key)
        (see ``time_key``); (None, None) for the first page."""
        position = self.decode_as(scope, token, (int, str))
        if position is None:
            return None, None
        try:
            return _EPOCH + position[0] * _MICROSECOND, position[1]
        except OverflowError as exc:
            raise _not_ours() from exc


def time_key(time: datetime.datetime, key: str) -> list[Any]:
    """The position of a row in a list ordered by (time, key), for ``PageTokens.page``."""
    return [(time - _EPOCH) // _MICROSECOND, key]


def _issuable(value: Any) -> bool:
    """Whether a position holds a value the service could have put there: every
    number it issues (a time since 1970, a sequence, a tree path, an intensity)
    is at least 0."""
    if type(value) is int:
        return 0 <= value <= _INT64_MAX
    if type(value) is float:
        return 0 <= value < math.inf
    return type(value) is str


def _not_ours(field: str = "page_token") -> InvalidArgument:
    return InvalidArgument(field, "not a token issued by this service")


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_MICROSECOND = datetime.timedelta(microseconds=1)
