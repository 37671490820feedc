"""MemoryService: validation, auth, sessions, patterns and identity entities.

- Every bad input is INVALID_ARGUMENT with a BadRequest naming the field, and
  nothing is written: each case breaks one field of a request that is
  otherwise valid (test_base_requests_succeed proves it) and names the seeded
  memory, so a request that slipped past validation would really write.
- No token is UNAUTHENTICATED on every RPC (on the streams, at the first
  read); a user acting as another is PERMISSION_DENIED; a service token and
  the user's own token may act for the user.
- TouchSession upserts one row per session (status default ACTIVE,
  last_message_time never moving backwards, create_time kept), also under
  concurrent touches; ListSessions is most recent first, filters by status and
  pages exactly once.
- RecordPattern keeps one row per (user, pattern_type) holding the latest
  intensity and the number of calls, also under 50 concurrent calls;
  ListPatterns is strongest first (ties by pattern_type), filters by type and
  pages exactly once.
- SetIdentityEntities replaces the set, deduplicated case-insensitively
  keeping the first spelling, and later memories are tagged by the new set.
"""

from __future__ import annotations

import asyncio
import datetime
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, struct_pb2
from google.protobuf.message import Message

from nexus import database
from nexus.server import NexusServer
from nexus.v1 import memory_pb2 as pb

from support.databases import backend_database
from support.rpc import SERVICE, Clients, all_pages, auth, bad_request_fields, rpc_error
from support.servers import server_config

USER = "alice"
DIM = 384
EMBEDDING = [((i * 37) % 11 - 5) / 7 for i in range(DIM)]
MEMORY = "$memory"  # stands for the seeded memory's id
TABLES = ("memories", "memory_events", "memory_requests", "memory_sessions", "memory_patterns", "memory_users", "memory_terms")
STREAMS = {"SubscribeMemories", "SubscribeArcs", "SubscribeBroadcasts"}
RPCS = [m.name for m in pb.DESCRIPTOR.services_by_name["MemoryService"].methods]


def payload(**values: Any) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


# One valid request per RPC, for USER; the validation cases each break one field.
BASE: dict[str, Callable[[], Any]] = {
    "CreateMemory": lambda: pb.CreateMemoryRequest(
        user_id=USER, content="went to the sea", gravity_score=0.5, emotion_type="joy", entities=["Sea"],
        meta_tags=["trip"], temporal_type=pb.TEMPORAL_TYPE_PAST, embedding=EMBEDDING, request_id="create-1",
        thread_id="t1", session_id="s1",
    ),  # fmt: skip
    "GetMemory": lambda: pb.GetMemoryRequest(user_id=USER, memory_id=MEMORY),
    "UpdateMemory": lambda: pb.UpdateMemoryRequest(
        memory=pb.Memory(user_id=USER, memory_id=MEMORY, content="changed", gravity_score=0.9),
        update_mask=mask("content", "gravity_score"),
    ),
    "DeleteMemory": lambda: pb.DeleteMemoryRequest(user_id=USER, memory_id=MEMORY),
    "ListMemories": lambda: pb.ListMemoriesRequest(user_id=USER, page_size=10),
    "SearchMemories": lambda: pb.SearchMemoriesRequest(user_id=USER, embedding=EMBEDDING, top_k=5),
    "ListArcs": lambda: pb.ListArcsRequest(user_id=USER, page_size=10),
    "SetIdentityEntities": lambda: pb.SetIdentityEntitiesRequest(user_id=USER, entities=["Alice", "Wonderland"]),
    "SubscribeMemories": lambda: pb.SubscribeMemoriesRequest(user_id=USER),
    "SubscribeArcs": lambda: pb.SubscribeArcsRequest(user_id=USER),
    "PublishBroadcast": lambda: pb.PublishBroadcastRequest(user_id=USER, event="typing", payload=payload(on=True)),
    "SubscribeBroadcasts": lambda: pb.SubscribeBroadcastsRequest(user_id=USER),
    "TouchSession": lambda: pb.TouchSessionRequest(user_id=USER, session_id="s1", status=pb.SESSION_STATUS_IDLE),
    "ListSessions": lambda: pb.ListSessionsRequest(user_id=USER, page_size=10),
    "RecordPattern": lambda: pb.RecordPatternRequest(user_id=USER, pattern_type="late_night", intensity=0.4),
    "ListPatterns": lambda: pb.ListPatternsRequest(user_id=USER, page_size=10),
}


Change = Callable[[Any, "Seed"], None]


def request_for(rpc: str, seed: Seed, change: Change | None = None) -> Any:
    """BASE[rpc] naming the seeded memory, with one change applied."""
    request = BASE[rpc]()
    if rpc == "UpdateMemory":
        request.memory.memory_id = request.memory.memory_id.replace(MEMORY, seed.memory_id)
    elif hasattr(request, "memory_id"):
        request.memory_id = request.memory_id.replace(MEMORY, seed.memory_id)
    if change is not None:
        change(request, seed)
    return request


async def call(clients: Clients, rpc: str, request: Any, metadata: Any) -> Any:
    """A unary RPC's response; for a stream, its initial metadata, once the
    stream is registered (the stream is then cancelled)."""
    invocation = getattr(clients.memories, rpc)(request, metadata=metadata)
    if rpc not in STREAMS:
        return await invocation
    try:
        metadata_received = await asyncio.wait_for(invocation.initial_metadata(), timeout=10)
        assert not invocation.done(), await invocation.code()
        return metadata_received
    finally:
        invocation.cancel()


async def failure(clients: Clients, rpc: str, request: Any, metadata: Any) -> grpc.aio.AioRpcError:
    """The error a call must end with; a stream reports it at its first read."""
    invocation = getattr(clients.memories, rpc)(request, metadata=metadata)
    if rpc in STREAMS:
        return await rpc_error(asyncio.wait_for(invocation.read(), timeout=10))
    return await rpc_error(invocation)


async def snapshot(db: asyncpg.Connection) -> dict[str, tuple[int, str | None]]:
    """Each memory table's row count and a digest of its rows."""
    state = {}
    for table in TABLES:
        state[table] = tuple(
            await db.fetchrow(f"SELECT count(*), md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {table} t")
        )
    return state


async def create_memory(clients: Clients, user: str = USER, **fields: Any) -> pb.Memory:
    request = pb.CreateMemoryRequest(user_id=user, content=fields.pop("content", "a memory"), **fields)
    return (await clients.memories.CreateMemory(request, metadata=SERVICE)).memory


@dataclass
class Seed:
    memory_id: str
    other_users_memories_token: str  # a ListMemories page token of bob's list
    all_sessions_token: str  # a ListSessions page token of USER's unfiltered list


async def make_seed(clients: Clients) -> Seed:
    """A memory, sessions, a pattern, identity names and list tokens: rows
    for a request that slipped past validation to change."""
    memory = await create_memory(clients, content="the seeded memory", embedding=EMBEDDING, request_id="seed-1")
    await create_memory(clients, "bob", content="bob one")
    await create_memory(clients, "bob", content="bob two")
    for session in ("s0", "s1"):
        await clients.memories.TouchSession(pb.TouchSessionRequest(user_id=USER, session_id=session), metadata=SERVICE)
    await clients.memories.RecordPattern(pb.RecordPatternRequest(user_id=USER, pattern_type="p", intensity=0.5), metadata=SERVICE)
    await clients.memories.SetIdentityEntities(pb.SetIdentityEntitiesRequest(user_id=USER, entities=["Me"]), metadata=SERVICE)
    bob_page = await clients.memories.ListMemories(pb.ListMemoriesRequest(user_id="bob", page_size=1), metadata=SERVICE)
    sessions_page = await clients.memories.ListSessions(pb.ListSessionsRequest(user_id=USER, page_size=1), metadata=SERVICE)
    assert bob_page.next_page_token and sessions_page.next_page_token
    return Seed(memory.memory_id, bob_page.next_page_token, sessions_page.next_page_token)


@pytest.fixture
async def seed(clients: Clients) -> Seed:
    return await make_seed(clients)


@dataclass
class Shared:
    clients: Clients
    db: asyncpg.Connection
    seed: Seed


@pytest.fixture(scope="module")
async def shared(admin_url: str, template_db: str) -> AsyncIterator[Shared]:
    """One seeded server for the calls that must fail and write nothing (each
    compares the database before and after itself), so the many cases do not
    each pay for a database and a server."""
    async with backend_database(admin_url, template_db, "nexus_memory_api") as url:
        server = NexusServer(server_config(url))
        try:
            await server.start()
            db = await database.connect(url)
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                    clients = Clients(channel)
                    yield Shared(clients, db, await make_seed(clients))
            finally:
                await db.close()
        finally:
            await server.stop(grace=0)


def setter(**values: Any) -> Change:
    """A change setting request fields; `memory__x` sets request.memory.x."""

    def change(request: Any, seed: Seed) -> None:
        for name, value in values.items():
            target = request
            if name.startswith("memory__"):
                target, name = request.memory, name.removeprefix("memory__")
            if isinstance(value, list):
                del getattr(target, name)[:]
                getattr(target, name).extend(value)
            elif isinstance(value, Message):
                getattr(target, name).CopyFrom(value)
            else:
                setattr(target, name, value)

    return change


def case(rpc: str, field: str, name: str, **values: Any) -> Any:
    return pytest.param(rpc, setter(**values), field, id=f"{rpc}-{name}")


def another_lists_token(request: Any, seed: Seed) -> None:
    """A genuine page token, of another list: bob's memories, or USER's
    unfiltered sessions used for a status-filtered list."""
    if isinstance(request, pb.ListMemoriesRequest):
        request.page_token = seed.other_users_memories_token
    else:
        request.page_token, request.status = seed.all_sessions_token, pb.SESSION_STATUS_ACTIVE


MANY = [f"t{i}" for i in range(65)]
LARGEST_BLOB = 7000 - len('{"blob":""}')  # payload(blob="x" * LARGEST_BLOB) is 7000 bytes as JSON

CASES = [
    # CreateMemory
    case("CreateMemory", "user_id", "user_id-missing", user_id=""),
    case("CreateMemory", "user_id", "user_id-space", user_id="al ice"),
    case("CreateMemory", "user_id", "user_id-too-long", user_id="a" * 129),
    case("CreateMemory", "content", "content-empty", content=""),
    case("CreateMemory", "content", "content-blank", content="  \n "),
    case("CreateMemory", "content", "content-too-long", content="é" * 20_001),
    case("CreateMemory", "content", "content-nul", content="a\x00b"),
    case("CreateMemory", "gravity_score", "gravity-negative", gravity_score=-0.01),
    case("CreateMemory", "gravity_score", "gravity-above-1", gravity_score=1.01),
    case("CreateMemory", "gravity_score", "gravity-nan", gravity_score=math.nan),
    case("CreateMemory", "gravity_score", "gravity-inf", gravity_score=math.inf),
    case("CreateMemory", "emotion_type", "emotion-capital", emotion_type="Joy"),
    case("CreateMemory", "emotion_type", "emotion-two-words", emotion_type="deep joy"),
    case("CreateMemory", "emotion_type", "emotion-digit-first", emotion_type="1joy"),
    case("CreateMemory", "emotion_type", "emotion-too-long", emotion_type="j" * 33),
    case("CreateMemory", "entities", "entities-65", entities=MANY),
    case("CreateMemory", "entities[1]", "entities-empty-name", entities=["ok", ""]),
    case("CreateMemory", "meta_tags", "meta_tags-65", meta_tags=MANY),
    case("CreateMemory", "temporal_type", "temporal_type-unknown", temporal_type=9),
    case("CreateMemory", "request_id", "request_id-space", request_id="has space"),
    case("CreateMemory", "request_id", "request_id-too-long", request_id="r" * 65),
    case("CreateMemory", "request_id", "request_id-non-ascii", request_id="réq"),
    case("CreateMemory", "thread_id", "thread_id-bad", thread_id="thread/1"),
    case("CreateMemory", "embedding", "embedding-short", embedding=EMBEDDING[:-1]),
    case("CreateMemory", "embedding", "embedding-nan", embedding=[math.nan] + EMBEDDING[1:]),
    case("CreateMemory", "embedding", "embedding-zeros", embedding=[0.0] * DIM),
    # GetMemory, DeleteMemory
    case("GetMemory", "memory_id", "memory_id-not-uuid", memory_id="not-a-uuid"),
    case("GetMemory", "memory_id", "memory_id-missing", memory_id=""),
    case("GetMemory", "user_id", "user_id-missing", user_id=""),
    case("DeleteMemory", "memory_id", "memory_id-not-uuid", memory_id="1234"),
    case("DeleteMemory", "user_id", "user_id-bad", user_id="alice!"),
    # UpdateMemory
    case("UpdateMemory", "memory.user_id", "user_id-missing", memory__user_id=""),
    case("UpdateMemory", "memory.memory_id", "memory_id-not-uuid", memory__memory_id="nope"),
    case("UpdateMemory", "update_mask", "mask-empty", update_mask=mask()),
    case("UpdateMemory", "update_mask", "mask-unknown-path", update_mask=mask("content", "user_id")),
    case("UpdateMemory", "memory.content", "content-empty", memory__content=""),
    case("UpdateMemory", "memory.gravity_score", "gravity-above-1", memory__gravity_score=2.0),
    case("UpdateMemory", "memory.gravity_score", "gravity-nan", memory__gravity_score=math.nan),
    case(
        "UpdateMemory", "memory.temporal_type", "temporal_type-unknown",
        memory__temporal_type=7, update_mask=mask("temporal_type"),
    ),  # fmt: skip
    case(
        "UpdateMemory", "memory.emotion_type", "emotion-capital",
        memory__emotion_type="Sad", update_mask=mask("emotion_type"),
    ),  # fmt: skip
    case(
        "UpdateMemory", "memory.embedding", "embedding-short",
        memory__embedding=[1.0, 2.0], update_mask=mask("embedding"),
    ),  # fmt: skip
    # Lists and search
    case("ListMemories", "page_size", "page_size-negative", page_size=-1),
    case("ListMemories", "page_token", "page_token-garbage", page_token="garbage"),
    pytest.param("ListMemories", another_lists_token, "page_token", id="ListMemories-page_token-of-another-user"),
    case("ListMemories", "min_gravity", "min_gravity-above-1", min_gravity=1.5),
    case("ListMemories", "emotion_type", "emotion-capital", emotion_type="Joy"),
    case("ListArcs", "page_size", "page_size-negative", page_size=-5),
    case("ListArcs", "page_token", "page_token-garbage", page_token="AAAA"),
    case("SearchMemories", "top_k", "top_k-negative", top_k=-1),
    case("SearchMemories", "top_k", "top_k-1001", top_k=1001),
    case("SearchMemories", "query", "query-and-embedding-missing", embedding=[]),
    # SetIdentityEntities
    case("SetIdentityEntities", "entities", "entities-65", entities=MANY),
    case("SetIdentityEntities", "entities[0]", "entities-empty-name", entities=[""]),
    case("SetIdentityEntities", "user_id", "user_id-missing", user_id=""),
    # Streams and broadcasts
    case("SubscribeMemories", "resume_token", "resume_token-garbage", resume_token="garbage"),
    case("SubscribeMemories", "user_id", "user_id-missing", user_id=""),
    case("SubscribeArcs", "resume_token", "resume_token-garbage", resume_token="bm90IGEgdG9rZW4"),
    case("SubscribeBroadcasts", "user_id", "user_id-bad", user_id="a b"),
    case("PublishBroadcast", "event", "event-empty", event=""),
    case("PublishBroadcast", "event", "event-too-long", event="e" * 65),
    case("PublishBroadcast", "payload", "payload-over-7000-bytes", payload=payload(blob="x" * (LARGEST_BLOB + 1))),
    # Sessions
    case("TouchSession", "session_id", "session_id-empty", session_id=""),
    case("TouchSession", "session_id", "session_id-bad", session_id="s 1"),
    case("TouchSession", "status", "status-unknown", status=9),
    case("ListSessions", "page_size", "page_size-negative", page_size=-1),
    case("ListSessions", "status", "status-unknown", status=4),
    case("ListSessions", "page_token", "page_token-garbage", page_token="garbage"),
    pytest.param("ListSessions", another_lists_token, "page_token", id="ListSessions-page_token-of-another-filter"),
    # Patterns
    case("RecordPattern", "pattern_type", "pattern_type-empty", pattern_type=""),
    case("RecordPattern", "pattern_type", "pattern_type-too-long", pattern_type="p" * 65),
    case("RecordPattern", "intensity", "intensity-negative", intensity=-0.1),
    case("RecordPattern", "intensity", "intensity-above-1", intensity=1.5),
    case("RecordPattern", "intensity", "intensity-nan", intensity=math.nan),
    case("ListPatterns", "page_size", "page_size-negative", page_size=-1),
    case("ListPatterns", "page_token", "page_token-garbage", page_token="garbage"),
    case("ListPatterns", "pattern_type", "pattern_type-too-long", pattern_type="p" * 65),
]


# --- validation ---------------------------------------------------------------------


async def test_base_requests_succeed(clients: Clients, seed: Seed) -> None:
    assert set(BASE) == set(RPCS)  # every RPC is covered
    for rpc in RPCS:
        await call(clients, rpc, request_for(rpc, seed), SERVICE)


@pytest.mark.parametrize(("rpc", "change", "field"), CASES)
async def test_bad_input_is_invalid_argument_naming_the_field_and_writes_nothing(
    shared: Shared, rpc: str, change: Change, field: str
) -> None:
    before = await snapshot(shared.db)
    request = request_for(rpc, shared.seed, change)

    error = await failure(shared.clients, rpc, request, SERVICE)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert bad_request_fields(error) == [field]
    assert await snapshot(shared.db) == before


@pytest.mark.parametrize(
    ("rpc", "change"),
    [
        pytest.param("CreateMemory", setter(content="é" * 20_000), id="content-20000-characters"),
        pytest.param("CreateMemory", setter(entities=MANY[:64]), id="entities-64"),
        pytest.param("CreateMemory", setter(meta_tags=MANY[:64]), id="meta_tags-64"),
        pytest.param("CreateMemory", setter(request_id="r" * 64), id="request_id-64"),
        pytest.param("CreateMemory", setter(gravity_score=1.0, emotion_type="j" * 32), id="gravity-1-emotion-32"),
        pytest.param(
            "UpdateMemory", setter(memory__meta_tags=MANY[:64], update_mask=mask("meta_tags")), id="update-meta_tags-64"
        ),
        pytest.param("SetIdentityEntities", setter(entities=MANY[:64]), id="identity-entities-64"),
        pytest.param("RecordPattern", setter(pattern_type="p" * 64, intensity=1.0), id="pattern_type-64"),
        pytest.param(
            "PublishBroadcast", setter(event="e" * 64, payload=payload(blob="x" * LARGEST_BLOB)), id="payload-7000-bytes"
        ),
        pytest.param(  # the largest NOTIFY this makes: escaped emoji, longest user id, fullest payload
            "PublishBroadcast",
            setter(user_id="u" * 128, event="\U0001f600" * 64, payload=payload(blob="x" * LARGEST_BLOB)),
            id="payload-7000-bytes-with-the-longest-ids",
        ),
        pytest.param("SearchMemories", setter(top_k=1000), id="top_k-1000"),
        pytest.param("ListSessions", setter(page_size=5000), id="page_size-above-1000-is-coerced"),
    ],
)
async def test_the_documented_limits_are_accepted(
    clients: Clients, db: asyncpg.Connection, seed: Seed, rpc: str, change: Change
) -> None:
    """The proto's limits hold exactly: "at most 20000 characters", "up to 64
    each" (entities and meta_tags), "1-64 chars" ..."""
    request = request_for(rpc, seed, change)

    response = await call(clients, rpc, request, SERVICE)

    if rpc in ("CreateMemory", "UpdateMemory"):  # stored as given
        row = await db.fetchrow("SELECT * FROM memories WHERE memory_id = $1", response.memory.memory_id)
        sent = request if rpc == "CreateMemory" else request.memory
        assert set(sent.meta_tags) <= set(row["meta_tags"])
        if rpc == "CreateMemory":
            assert (row["content"], row["entities"]) == (sent.content, list(sent.entities))
            assert await db.fetchval("SELECT request_id FROM memory_requests WHERE memory_id = $1", row["memory_id"]) == (
                sent.request_id
            )


# --- auth ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer not-a-jwt"),), (("authorization", "Basic YWxpY2U6c2VjcmV0"),)],
    ids=["no-token", "garbage-token", "basic-auth"],
)
async def test_every_rpc_without_a_valid_token_is_unauthenticated(shared: Shared, metadata: Any) -> None:
    before = await snapshot(shared.db)

    codes = {rpc: (await failure(shared.clients, rpc, request_for(rpc, shared.seed), metadata)).code() for rpc in RPCS}

    assert codes == {rpc: grpc.StatusCode.UNAUTHENTICATED for rpc in RPCS}
    assert await snapshot(shared.db) == before


@pytest.mark.parametrize("caller", ["mallory", "Alice", "alice.x"])
async def test_every_rpc_acting_as_another_user_is_permission_denied(shared: Shared, caller: str) -> None:
    """User ids are exact: "Alice" is not "alice"."""
    before = await snapshot(shared.db)
    metadata = auth(caller)

    codes = {rpc: (await failure(shared.clients, rpc, request_for(rpc, shared.seed), metadata)).code() for rpc in RPCS}

    assert codes == {rpc: grpc.StatusCode.PERMISSION_DENIED for rpc in RPCS}
    assert await snapshot(shared.db) == before


@pytest.mark.parametrize("as_service", [False, True], ids=["own-token", "service-token"])
async def test_the_user_and_a_service_may_act_for_the_user(
    clients: Clients, db: asyncpg.Connection, seed: Seed, as_service: bool
) -> None:
    metadata = SERVICE if as_service else auth(USER)
    responses = {rpc: await call(clients, rpc, request_for(rpc, seed), metadata) for rpc in RPCS}

    assert responses["CreateMemory"].memory.user_id == USER
    assert responses["UpdateMemory"].memory.content == "changed"
    assert await db.fetchval("SELECT count(*) FROM memories WHERE memory_id = $1", seed.memory_id) == 0  # deleted
    assert dict(responses["SubscribeMemories"]).get("x-nexus-resume-token")
    assert await db.fetchval("SELECT identity_entities FROM memory_users WHERE user_id = $1", USER) == [
        "Alice", "Wonderland"
    ]  # fmt: skip
    assert await db.fetchval("SELECT occurrences FROM memory_patterns WHERE pattern_type = 'late_night'") == 1


# --- sessions -------------------------------------------------------------------------


async def touch(clients: Clients, session_id: str, status: int = 0, user: str = USER) -> pb.Session:
    request = pb.TouchSessionRequest(user_id=user, session_id=session_id, status=status)
    return (await clients.memories.TouchSession(request, metadata=auth(user))).session


async def session_rows(db: asyncpg.Connection, user: str = USER) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM memory_sessions WHERE user_id = $1 ORDER BY session_id", user)


def when(stamp: Any) -> datetime.datetime:
    return stamp.ToDatetime(tzinfo=datetime.UTC)


async def test_touch_session_upserts_keeping_create_time(clients: Clients, db: asyncpg.Connection) -> None:
    first = await touch(clients, "chat-1")
    second = await touch(clients, "chat-1", pb.SESSION_STATUS_IDLE)
    third = await touch(clients, "chat-1")

    assert (first.user_id, first.session_id, first.status) == (USER, "chat-1", pb.SESSION_STATUS_ACTIVE)
    assert second.status == pb.SESSION_STATUS_IDLE
    assert third.status == pb.SESSION_STATUS_ACTIVE  # UNSPECIFIED means ACTIVE, also on a refresh
    assert first.create_time == second.create_time == third.create_time
    assert when(first.last_message_time) < when(second.last_message_time) < when(third.last_message_time)
    rows = await session_rows(db)
    assert len(rows) == 1
    assert (rows[0]["status"], rows[0]["last_message_time"]) == ("active", when(third.last_message_time))


async def test_last_message_time_never_moves_backwards(clients: Clients, db: asyncpg.Connection) -> None:
    await touch(clients, "chat-1")
    future = await db.fetchval(
        "UPDATE memory_sessions SET last_message_time = now() + interval '1 hour' RETURNING last_message_time"
    )  # e.g. touched through a replica whose clock runs ahead

    touched = await touch(clients, "chat-1", pb.SESSION_STATUS_ENDED)

    assert touched.status == pb.SESSION_STATUS_ENDED
    assert when(touched.last_message_time) == future
    assert (await session_rows(db))[0]["last_message_time"] == future


async def test_concurrent_touches_of_one_session_make_one_row(clients: Clients, db: asyncpg.Connection) -> None:
    statuses = [pb.SESSION_STATUS_ACTIVE, pb.SESSION_STATUS_IDLE, pb.SESSION_STATUS_ENDED]

    sessions = await asyncio.gather(*(touch(clients, "hot", statuses[i % 3]) for i in range(40)))

    rows = await session_rows(db)
    assert len(rows) == 1
    assert {s.create_time.ToDatetime(tzinfo=datetime.UTC) for s in sessions} == {rows[0]["create_time"]}
    assert rows[0]["last_message_time"] == max(when(s.last_message_time) for s in sessions)


async def list_sessions_pages(clients: Clients, page_size: int, status: int = 0, user: str = USER) -> list[list[str]]:
    def fetch(token: str) -> Awaitable[pb.ListSessionsResponse]:
        request = pb.ListSessionsRequest(user_id=user, status=status, page_size=page_size, page_token=token)
        return clients.memories.ListSessions(request, metadata=auth(user))

    return await all_pages(fetch, lambda page: [s.session_id for s in page.sessions])


async def test_list_sessions_is_most_recent_first_filters_and_pages_exactly_once(
    clients: Clients, db: asyncpg.Connection
) -> None:
    statuses = {f"s{i:02}": [pb.SESSION_STATUS_ACTIVE, pb.SESSION_STATUS_IDLE, pb.SESSION_STATUS_ENDED][i % 3] for i in range(14)}
    for session_id in random.Random(4).sample(sorted(statuses), len(statuses)):
        await touch(clients, session_id, statuses[session_id])
    await touch(clients, "bobs", user="bob")
    # Ties: five sessions with one last_message_time (the session_id breaks them).
    await db.execute(
        "UPDATE memory_sessions SET last_message_time = now() - interval '1 minute' "
        "WHERE session_id IN ('s01', 's02', 's03', 's05', 's08')"
    )
    expected = [r["session_id"] for r in await db.fetch(
        "SELECT session_id FROM memory_sessions WHERE user_id = $1 ORDER BY last_message_time DESC, session_id DESC", USER
    )]  # fmt: skip

    everything = await list_sessions_pages(clients, 1000)
    assert everything == [expected]
    for page_size in (1, 2, 3, 5):
        pages = await list_sessions_pages(clients, page_size)
        assert [s for page in pages for s in page] == expected, page_size
        assert all(len(page) == page_size for page in pages[:-1])
    for status in (pb.SESSION_STATUS_ACTIVE, pb.SESSION_STATUS_IDLE, pb.SESSION_STATUS_ENDED):
        pages = await list_sessions_pages(clients, 2, status)
        assert [s for page in pages for s in page] == [s for s in expected if statuses[s] == status]
    assert await list_sessions_pages(clients, 10, user="bob") == [["bobs"]]


# --- patterns ---------------------------------------------------------------------------


async def record(clients: Clients, pattern_type: str, intensity: float, user: str = USER) -> pb.Pattern:
    request = pb.RecordPatternRequest(user_id=user, pattern_type=pattern_type, intensity=intensity)
    return (await clients.memories.RecordPattern(request, metadata=auth(user))).pattern


async def test_record_pattern_keeps_the_latest_intensity_and_counts_occurrences(
    clients: Clients, db: asyncpg.Connection
) -> None:
    recorded = [await record(clients, "late_night", x) for x in (0.3, 0.9, 0.5)]
    await record(clients, "late_night", 0.7, user="bob")

    assert [(p.intensity, p.occurrences) for p in recorded] == [(0.3, 1), (0.9, 2), (0.5, 3)]
    assert len({p.create_time.ToJsonString() for p in recorded}) == 1
    assert when(recorded[0].update_time) < when(recorded[1].update_time) < when(recorded[2].update_time)
    rows = await db.fetch("SELECT user_id, intensity, occurrences FROM memory_patterns ORDER BY user_id")
    assert [tuple(r) for r in rows] == [(USER, 0.5, 3), ("bob", 0.7, 1)]


async def test_fifty_concurrent_records_count_fifty_occurrences(clients: Clients, db: asyncpg.Connection) -> None:
    intensities = [i / 49 for i in range(50)]

    patterns = await asyncio.gather(*(record(clients, "burst", x) for x in intensities))

    assert sorted(p.occurrences for p in patterns) == list(range(1, 51))  # each call counted once
    row = await db.fetchrow("SELECT intensity, occurrences FROM memory_patterns WHERE pattern_type = 'burst'")
    assert row["occurrences"] == 50
    assert row["intensity"] == next(p.intensity for p in patterns if p.occurrences == 50)  # the last one's


async def list_patterns_pages(clients: Clients, page_size: int, pattern_type: str = "") -> list[list[tuple[str, float]]]:
    def fetch(token: str) -> Awaitable[pb.ListPatternsResponse]:
        request = pb.ListPatternsRequest(user_id=USER, pattern_type=pattern_type, page_size=page_size, page_token=token)
        return clients.memories.ListPatterns(request, metadata=auth(USER))

    return await all_pages(fetch, lambda page: [(p.pattern_type, p.intensity) for p in page.patterns])


async def test_list_patterns_is_strongest_first_filters_and_pages_exactly_once(clients: Clients) -> None:
    rng = random.Random(5)
    intensities = {f"type_{name}": rng.choice([0.0, 0.25, 0.5, 0.5, 0.75, 1.0, 0.1 + 0.2]) for name in "kdbjafhcgie"}
    for pattern_type, intensity in intensities.items():
        await record(clients, pattern_type, intensity)
    await record(clients, "type_z", 0.99, user="bob")
    expected = sorted(intensities.items(), key=lambda item: (-item[1], item[0]))
    assert len({x for _, x in expected}) < len(expected)  # there are ties

    assert await list_patterns_pages(clients, 100) == [expected]
    for page_size in (1, 2, 4):
        pages = await list_patterns_pages(clients, page_size)
        assert [p for page in pages for p in page] == expected, page_size
        assert all(len(page) == page_size for page in pages[:-1])
    assert await list_patterns_pages(clients, 10, "type_c") == [[("type_c", intensities["type_c"])]]
    assert await list_patterns_pages(clients, 10, "type_z") == [[]]  # bob's


# --- identity entities ----------------------------------------------------------------


async def set_identity(clients: Clients, names: list[str]) -> list[str]:
    request = pb.SetIdentityEntitiesRequest(user_id=USER, entities=names)
    return list((await clients.memories.SetIdentityEntities(request, metadata=auth(USER))).entities)


async def is_identity_tagged(clients: Clients, entities: list[str]) -> bool:
    return "identity" in (await create_memory(clients, entities=entities)).meta_tags


async def test_set_identity_entities_replaces_the_set_and_later_memories_follow_it(
    clients: Clients, db: asyncpg.Connection
) -> None:
    returned = await set_identity(clients, ["Alice", "Wonderland", "alice", "ALICE", "Rabbit"])
    assert sorted(returned) == ["Alice", "Rabbit", "Wonderland"]  # the first spelling of each
    assert sorted(await db.fetchval("SELECT identity_entities FROM memory_users WHERE user_id = $1", USER)) == sorted(returned)
    assert await is_identity_tagged(clients, ["aLiCe"])
    assert await is_identity_tagged(clients, ["someone", "RABBIT"])
    assert not await is_identity_tagged(clients, ["Hatter"])

    assert await set_identity(clients, ["Hatter"]) == ["Hatter"]
    assert await db.fetchval("SELECT identity_entities FROM memory_users WHERE user_id = $1", USER) == ["Hatter"]
    assert await is_identity_tagged(clients, ["hatter"])
    assert not await is_identity_tagged(clients, ["Alice"])

    assert await set_identity(clients, []) == []
    assert not await is_identity_tagged(clients, ["Hatter"])


async def test_set_identity_entities_keeps_the_names_in_the_order_given(clients: Clients, db: asyncpg.Connection) -> None:
    returned = await set_identity(clients, ["Alice", "Wonderland", "alice", "Rabbit", "WONDERLAND"])

    assert returned == ["Alice", "Wonderland", "Rabbit"]
    assert await db.fetchval("SELECT identity_entities FROM memory_users WHERE user_id = $1", USER) == returned
