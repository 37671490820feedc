"""Credentials, clients and what calls return: the test JWT secret and tokens, the
stubs of every service, rich error details, paged lists, page tokens to forge."""

from __future__ import annotations

import math
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from nexus.auth import mint_token
from nexus.pagination import PageTokens
from nexus.v1 import follow_pb2_grpc, interaction_pb2_grpc, memory_pb2_grpc, token_pb2_grpc
from nexus.v1 import interaction_pb2 as pb

JWT_SECRET = "test-secret-" + "x" * 32
# The page tokens of a server configured with JWT_SECRET, to forge odd ones,
# and positions such a token may hold that the service never issues.
SERVER_TOKENS = PageTokens(JWT_SECRET.encode())
SIGNED_ODD_POSITIONS = {
    "int64-overflow": [2**63],
    "int64-underflow": [-(2**63) - 1],
    "beyond-int32": [2**40, 1],
    "huge": [2**70],
    "negative": [-1],
    "nested": [[1]],
    "infinite": [math.inf],
}


def token(subject: str, *, service: bool = False, ttl_s: int = 3600) -> str:
    return mint_token(JWT_SECRET, subject, service=service, ttl_s=ttl_s)


def auth(subject: str, *, service: bool = False) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a bearer token for ``subject``."""
    return (("authorization", f"Bearer {token(subject, service=service)}"),)


SERVICE = auth("backend", service=True)


@dataclass
class Clients:
    """The stubs of every Nexus service over one channel."""

    channel: grpc.aio.Channel

    @property
    def interactions(self) -> interaction_pb2_grpc.InteractionServiceStub:
        return interaction_pb2_grpc.InteractionServiceStub(self.channel)

    @property
    def follows(self) -> follow_pb2_grpc.FollowServiceStub:
        return follow_pb2_grpc.FollowServiceStub(self.channel)

    @property
    def tokens(self) -> token_pb2_grpc.TokenServiceStub:
        return token_pb2_grpc.TokenServiceStub(self.channel)

    @property
    def memories(self) -> memory_pb2_grpc.MemoryServiceStub:
        return memory_pb2_grpc.MemoryServiceStub(self.channel)


def new_uuid() -> str:
    return str(uuid.uuid4())


_Detail = TypeVar("_Detail", bound=Message)


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    """Awaits a call that must fail; returns its error."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def error_details(error: grpc.aio.AioRpcError, detail_type: type[_Detail]) -> list[_Detail]:
    """The details of one type (BadRequest, PreconditionFailure, ...) in the error's
    google.rpc.Status trailer, which every Nexus error carries."""
    status = rpc_status.from_call(error)
    assert status is not None, "no rich status details"
    found = []
    for detail in status.details:
        if detail.Is(detail_type.DESCRIPTOR):
            unpacked = detail_type()
            detail.Unpack(unpacked)
            found.append(unpacked)
    return found


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    """The field names of the BadRequest detail of an INVALID_ARGUMENT error."""
    return [v.field for d in error_details(error, error_details_pb2.BadRequest) for v in d.field_violations]


def precondition_types(error: grpc.aio.AioRpcError) -> list[str]:
    """The violation types (INSUFFICIENT_FUNDS, ...) of a FAILED_PRECONDITION error."""
    return [v.type for d in error_details(error, error_details_pb2.PreconditionFailure) for v in d.violations]


class _Paged(Protocol):
    next_page_token: str


_Page = TypeVar("_Page", bound=_Paged)
_Item = TypeVar("_Item")


async def all_pages(fetch: Callable[[str], Awaitable[_Page]], items: Callable[[_Page], Iterable[_Item]]) -> list[list[_Item]]:
    """The items of every page of a list, page by page: ``fetch(page_token)`` from the
    first page ("") on, following next_page_token until a page has none."""
    pages: list[list[_Item]] = []
    token = ""
    while True:
        page = await fetch(token)
        pages.append(list(items(page)))
        token = page.next_page_token
        if not token:
            return pages


def stub(channel: grpc.aio.Channel) -> interaction_pb2_grpc.InteractionServiceStub:
    return interaction_pb2_grpc.InteractionServiceStub(channel)


async def create_entry(channel: grpc.aio.Channel, author: str = "alice") -> str:
    request = pb.CreateEntryRequest(author_id=author, type="note", title="t", content="c")
    response = await stub(channel).CreateEntry(request, metadata=auth(author), timeout=10)
    return response.entry.entry_id


def toggle(channel: grpc.aio.Channel, user: str, entry_id: str, timeout: float) -> Awaitable[pb.ToggleResonanceResponse]:
    request = pb.ToggleResonanceRequest(user_id=user, entry_id=entry_id)
    return stub(channel).ToggleResonance(request, metadata=auth(user), timeout=timeout)
