"""MemoryService streams (SubscribeMemories / SubscribeArcs) over the durable
event log and the LISTEN hub. Promises checked, always against the
`memory_events` table of the user and topic:

- every subscriber gets exactly the table's events, in seq order, once each,
  while creates, updates and deletes race;
- resuming with an event's resume_token, or with the `x-nexus-resume-token`
  of a stream that saw nothing, delivers exactly what was missed, then live
  events; also on another server over the same database, and while a client
  keeps dropping and resuming its stream under racing writes;
- a killed LISTEN connection loses nothing: the hub reconnects and catches up,
  also events whose NOTIFY reached no listener and that no later write follows;
- a transaction holding a user's lock delays only that user's events, which
  then arrive in order with none skipped;
- an event committed through one server reaches a stream on another;
- users are isolated, and foreign, cross-topic or garbage resume tokens are
  INVALID_ARGUMENT naming resume_token;
- a consumer that falls far behind its buffer still gets everything once;
- arcs stream their own CREATED / UPDATED events, memory streams never do;
- shutdown ends streams with UNAVAILABLE and clients resume elsewhere;
- a resume token behind the retention horizon is FAILED_PRECONDITION, also
  when retention runs between a stream's position check and its log read.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from nexus.server import NexusServer
from nexus.v1 import memory_pb2 as pb
from nexus.v1 import memory_pb2_grpc

from support.rpc import Clients, auth, bad_request_fields, precondition_types, rpc_error
from support.servers import server_config

pytestmark = pytest.mark.cluster

RESUME_TOKEN = "x-nexus-resume-token"
# Bound on any one wait for an event or a condition.
WAIT_S = 10.0
END = "END"  # content of the sentinel memory written after a test's writes
EVENT_TYPES = {"created": pb.EVENT_TYPE_CREATED, "updated": pb.EVENT_TYPE_UPDATED, "deleted": pb.EVENT_TYPE_DELETED}
Stub = memory_pb2_grpc.MemoryServiceStub
Event = Any  # pb.SubscribeMemoriesResponse | pb.SubscribeArcsResponse

# --- writes -------------------------------------------------------------------


async def create(stub: Stub, user: str, content: str, gravity: float = 0.5, emotion: str = "") -> pb.Memory:
    request = pb.CreateMemoryRequest(user_id=user, content=content, gravity_score=gravity, emotion_type=emotion)
    return (await stub.CreateMemory(request, metadata=auth(user))).memory


async def update(stub: Stub, user: str, memory_id: str, content: str) -> pb.Memory:
    request = pb.UpdateMemoryRequest(
        memory=pb.Memory(user_id=user, memory_id=memory_id, content=content),
        update_mask=field_mask_pb2.FieldMask(paths=["content"]),
    )
    return (await stub.UpdateMemory(request, metadata=auth(user))).memory


async def delete(stub: Stub, user: str, memory_id: str) -> None:
    await stub.DeleteMemory(pb.DeleteMemoryRequest(user_id=user, memory_id=memory_id), metadata=auth(user))


async def create_many(stub: Stub, user: str, count: int, prefix: str = "m", **kwargs: Any) -> list[pb.Memory]:
    return list(await asyncio.gather(*(create(stub, user, f"{prefix}{i}", **kwargs) for i in range(count))))


def racing_writes(stub: Stub, user: str, seeded: list[pb.Memory], creates: int) -> list[Any]:
    """Coroutines of creates (every fourth strong `joy`, so arcs form and grow
    in between), two updates of each memory of the first half of seeded, and
    deletes of the second half."""
    half = len(seeded) // 2
    writes: list[Any] = [
        create(stub, user, f"new {i}", **({"gravity": 0.9, "emotion": "joy"} if i % 4 == 0 else {}))
        for i in range(creates)
    ]
    writes += [update(stub, user, m.memory_id, f"edit {n} of {m.content}") for m in seeded[:half] for n in (1, 2)]
    writes += [delete(stub, user, m.memory_id) for m in seeded[half:]]
    random.Random(len(writes)).shuffle(writes)
    return writes


# --- streams ------------------------------------------------------------------


def open_call(stub: Stub, user: str, resume_token: str = "", *, arcs: bool = False) -> Any:
    if arcs:
        return stub.SubscribeArcs(pb.SubscribeArcsRequest(user_id=user, resume_token=resume_token), metadata=auth(user))
    request = pb.SubscribeMemoriesRequest(user_id=user, resume_token=resume_token)
    return stub.SubscribeMemories(request, metadata=auth(user))


async def subscribe(stub: Stub, user: str, resume_token: str = "", *, arcs: bool = False) -> tuple[Any, str]:
    """An open stream (registered on the server) and its starting resume token."""
    call = open_call(stub, user, resume_token, arcs=arcs)
    metadata = await asyncio.wait_for(call.initial_metadata(), WAIT_S)
    start = metadata.get(RESUME_TOKEN)
    assert start, f"no {RESUME_TOKEN} in the initial metadata: {metadata!r}"
    return call, start


async def read_one(call: Any) -> Event:
    event = await asyncio.wait_for(call.read(), WAIT_S)
    assert event is not grpc.aio.EOF, "the stream ended"
    assert event.resume_token
    return event


async def read_events(call: Any, count: int) -> list[Event]:
    return [await read_one(call) for _ in range(count)]


async def stream_error(call: Any) -> grpc.aio.AioRpcError:
    """The error a stream must end with before sending any event (bounded)."""
    return await asyncio.wait_for(rpc_error(call.read()), WAIT_S)


def is_end(event: Event) -> bool:
    return event.memory.content == END


async def read_until_end(call: Any, limit: int = 2000) -> list[Event]:
    """Every event up to and including the sentinel memory's."""
    events: list[Event] = []
    while not events or not is_end(events[-1]):
        assert len(events) < limit, "no sentinel event"
        events.append(await read_one(call))
    return events


@asynccontextmanager
async def extra_server(db_url: str, **overrides: Any) -> AsyncIterator[tuple[NexusServer, Stub]]:
    """Another NexusServer on the same database (same JWT secret), and a stub for it."""
    nexus = NexusServer(server_config(db_url, **overrides))
    await nexus.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{nexus.port}") as channel:
            yield nexus, Stub(channel)
    finally:
        await nexus.stop(grace=0)


# --- the log ------------------------------------------------------------------


def keys(events: Iterable[Event]) -> list[tuple[Any, ...]]:
    """What identifies an event: its type and subject (content or members)."""
    out: list[tuple[Any, ...]] = []
    for e in events:
        if isinstance(e, pb.SubscribeArcsResponse):
            out.append((e.type, e.arc.arc_id, tuple(e.arc.memory_ids)))
        else:
            out.append((e.type, e.memory.memory_id, e.memory.content))
    return out


async def logged(db: asyncpg.Connection, user: str, topic: str = "memory", after: int = 0) -> list[tuple[Any, ...]]:
    """The table's events of the user and topic after seq `after`, as keys()."""
    rows = await db.fetch(
        "SELECT change, document::text AS doc FROM memory_events"
        " WHERE user_id = $1 AND topic = $2 AND seq > $3 ORDER BY seq",
        user, topic, after,
    )  # fmt: skip
    out: list[tuple[Any, ...]] = []
    for row in rows:
        doc = json.loads(row["doc"])
        if topic == "arc":
            out.append((EVENT_TYPES[row["change"]], doc["arc_id"], tuple(doc["memory_ids"])))
        else:
            out.append((EVENT_TYPES[row["change"]], doc["memory_id"], doc["content"]))
    return out


async def last_seq(db: asyncpg.Connection, user: str) -> int:
    return await db.fetchval("SELECT coalesce(max(seq), 0) FROM memory_events WHERE user_id = $1", user)


async def wait_until(check: Callable[[], Any], what: str) -> Any:
    """Polls an async check until it returns something truthy (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not (result := await check()):
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return result


def assert_exactly_once(events: list[Event]) -> None:
    tokens = [e.resume_token for e in events]
    assert len(set(tokens)) == len(tokens), "a resume token repeated: an event was delivered twice"


# --- ordering and exactly-once under racing writes ------------------------------


async def test_every_subscriber_gets_the_logged_events_in_order_once_while_writes_race(
    clients: Clients, db: asyncpg.Connection
) -> None:
    stub = clients.memories
    seeded = await create_many(stub, "alice", 40, prefix="seed ", gravity=0.9, emotion="calm")
    before = await last_seq(db, "alice")
    streams = [await subscribe(stub, "alice") for _ in range(3)]
    arc_call, _ = await subscribe(stub, "alice", arcs=True)
    readers = [asyncio.create_task(read_until_end(call)) for call, _ in streams]

    writes = racing_writes(stub, "alice", seeded, creates=140)
    assert len(writes) == 200
    first, second = writes[:100], writes[100:]
    await asyncio.gather(*first)
    # A fourth subscriber joins mid-race, resuming from before the race.
    late_call, _ = await subscribe(stub, "alice", streams[0][1])
    readers.append(asyncio.create_task(read_until_end(late_call)))
    await asyncio.gather(*second)
    await create(stub, "alice", END)

    expected = await logged(db, "alice", "memory", before)
    assert len(expected) == 200 + 1
    for events in await asyncio.wait_for(asyncio.gather(*readers), 3 * WAIT_S):
        assert keys(events) == expected
        assert_exactly_once(events)
    expected_arcs = await logged(db, "alice", "arc", before)
    assert len(expected_arcs) >= 35  # deletes of `calm` members and strong `joy` creates
    assert keys(await read_events(arc_call, len(expected_arcs))) == expected_arcs
    # The log itself has no gap: 1 .. last, as memory_users says.
    gapless = await db.fetchval(
        "SELECT count(*) = max(seq) AND max(seq) = (SELECT last_event_seq FROM memory_users WHERE user_id = 'alice') "
        "FROM memory_events WHERE user_id = 'alice'"
    )
    assert gapless
    for call in (*(c for c, _ in streams), late_call, arc_call):
        call.cancel()


# --- resume -------------------------------------------------------------------


async def test_resume_from_the_last_event_gets_exactly_the_missed_events_then_live_ones(
    clients: Clients, db: asyncpg.Connection
) -> None:
    stub = clients.memories
    call, _ = await subscribe(stub, "alice")
    await create_many(stub, "alice", 5, prefix="a")
    seen = await read_events(call, 3)
    call.cancel()
    await create_many(stub, "alice", 4, prefix="b")

    resumed, start = await subscribe(stub, "alice", seen[-1].resume_token)
    missed = await read_events(resumed, 6)
    await create(stub, "alice", "live")
    live = await read_one(resumed)
    resumed.cancel()

    assert keys(seen + missed + [live]) == await logged(db, "alice")
    assert start == seen[-1].resume_token  # the stream starts where it resumed
    assert live.memory.content == "live"


async def test_resume_with_the_initial_metadata_token_of_a_stream_that_saw_nothing(
    clients: Clients, db: asyncpg.Connection
) -> None:
    stub = clients.memories
    await create_many(stub, "alice", 2, prefix="old")
    before = await last_seq(db, "alice")
    call, start = await subscribe(stub, "alice")
    call.cancel()
    await create_many(stub, "alice", 3, prefix="new")

    resumed, _ = await subscribe(stub, "alice", start)
    events = await read_events(resumed, 3)
    resumed.cancel()

    assert keys(events) == await logged(db, "alice", after=before)
    assert len(events) == 3


async def test_resume_on_another_server_of_the_same_database(
    clients: Clients, db: asyncpg.Connection, db_url: str
) -> None:
    stub = clients.memories
    call, _ = await subscribe(stub, "alice")
    await create_many(stub, "alice", 3, prefix="a")
    seen = await read_events(call, 3)
    call.cancel()
    await create_many(stub, "alice", 4, prefix="b")

    async with extra_server(db_url) as (_, other):
        resumed, _ = await subscribe(other, "alice", seen[-1].resume_token)
        missed = await read_events(resumed, 4)
        await create(stub, "alice", END)  # through the first server
        live = await read_one(resumed)
        resumed.cancel()

    assert keys(seen + missed + [live]) == await logged(db, "alice")
    assert is_end(live)


async def test_a_client_that_keeps_dropping_and_resuming_sees_every_event_once(
    clients: Clients, db: asyncpg.Connection
) -> None:
    stub = clients.memories
    rng = random.Random(7)
    seeded = await create_many(stub, "alice", 20, prefix="seed ")
    before = await last_seq(db, "alice")
    _, start = await subscribe(stub, "alice")
    reconnects = 0

    async def reconnecting_reader() -> list[Event]:
        nonlocal reconnects
        events: list[Event] = []
        token = start
        while True:
            call, _ = await subscribe(stub, "alice", token)
            reconnects += 1
            try:
                for _ in range(rng.randint(0, 12)):
                    events.append(await read_one(call))
                    token = events[-1].resume_token
                    if is_end(events[-1]):
                        return events
            finally:
                call.cancel()

    async def writers() -> None:
        await asyncio.gather(*racing_writes(stub, "alice", seeded, creates=100))
        await create(stub, "alice", END)

    events, _ = await asyncio.wait_for(asyncio.gather(reconnecting_reader(), writers()), 6 * WAIT_S)

    assert keys(events) == await logged(db, "alice", after=before)
    assert len(events) == 100 + 20 + 10 + 1
    assert_exactly_once(events)
    assert reconnects > 5


# --- hub failures and commit order ------------------------------------------------


async def hub_pids(db: asyncpg.Connection) -> set[int]:
    await db.execute("SELECT pg_stat_clear_snapshot()")  # fresh activity, also inside a transaction
    rows = await db.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'nexus-hub' AND datname = current_database()"
    )
    return {r["pid"] for r in rows}


async def lock_waiters(db: asyncpg.Connection, count: int, function: str) -> bool:
    """Whether at least count backends wait for a lock in a query calling function."""
    await db.execute("SELECT pg_stat_clear_snapshot()")
    return await db.fetchval(
        "SELECT count(*) >= $1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE $2",
        count, f"%{function}(%",
    )  # fmt: skip


async def kill_hub(db: asyncpg.Connection) -> int:
    """Terminates the hub's LISTEN backend; returns its pid."""
    (pid,) = await hub_pids(db)
    assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)
    return pid


async def hub_replaced(db: asyncpg.Connection, old_pid: int) -> dict[str, Any]:
    """Waits for the hub's new LISTEN backend; returns its pg_stat_activity row."""

    async def new_backend() -> dict[str, Any] | None:
        await db.execute("SELECT pg_stat_clear_snapshot()")
        rows = await db.fetch(
            "SELECT pid, backend_start FROM pg_stat_activity "
            "WHERE application_name = 'nexus-hub' AND datname = current_database()"
        )
        return dict(rows[0]) if len(rows) == 1 and rows[0]["pid"] != old_pid else None

    return await wait_until(new_backend, "a new hub connection")


HUB_ON_ONE_SERVER = pytest.mark.single_node(
    "kills the hub's one LISTEN backend, found in the one server's pg_stat_activity; on the cluster the hub "
    "listens on every node"
)


@HUB_ON_ONE_SERVER
async def test_a_listen_connection_killed_while_writes_race_loses_no_event(
    clients: Clients, db: asyncpg.Connection
) -> None:
    stub = clients.memories
    streams = [await subscribe(stub, "alice") for _ in range(2)]
    readers = [asyncio.create_task(read_until_end(call)) for call, _ in streams]

    async def chain(n: int) -> None:  # sequential writes, so writing goes on across the kill
        for i in range(20):
            await create(stub, "alice", f"chain {n} write {i}")

    writers = asyncio.gather(*(chain(n) for n in range(8)))
    await wait_until(lambda: db.fetchval("SELECT count(*) >= 30 FROM memory_events"), "some writes")
    old_pid = await kill_hub(db)
    written_at_kill = await last_seq(db, "alice")
    # A stream opened while the hub may be disconnected, resuming from the start.
    late_call, _ = await subscribe(stub, "alice", streams[0][1])
    readers.append(asyncio.create_task(read_until_end(late_call)))
    await writers
    await create(stub, "alice", END)

    expected = await logged(db, "alice")
    assert len(expected) == 161
    assert written_at_kill < 160, "the writes ended before the kill"
    for events in await asyncio.wait_for(asyncio.gather(*readers), 3 * WAIT_S):
        assert keys(events) == expected
    await hub_replaced(db, old_pid)
    for call in (*(c for c, _ in streams), late_call):
        call.cancel()


@HUB_ON_ONE_SERVER
async def test_events_committed_while_the_hub_is_disconnected_arrive_without_a_later_write(
    clients: Clients, db: asyncpg.Connection, admin_url: str
) -> None:
    """Their NOTIFYs reached no listener: only the hub's catch-up after it
    reconnects can deliver them."""
    stub = clients.memories
    await create(stub, "alice", "before")
    call, _ = await subscribe(stub, "alice")
    name = await db.fetchval("SELECT quote_ident(current_database())")
    admin = await asyncpg.connect(admin_url)  # a database may not lock itself out
    await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")  # the hub cannot reconnect yet
    try:
        old_pid = await kill_hub(db)

        async def hub_gone() -> bool:
            return not await hub_pids(db)

        await wait_until(hub_gone, "the hub backend to go")
        for i in range(3):
            await db.execute(
                "SELECT create_memory('alice', $1, NULL, NULL, NULL, 0.5, NULL, '{}', '{}', NULL, NULL, NULL)",
                f"while disconnected {i}",
            )
        assert await hub_pids(db) == set()  # committed with no hub listening
    finally:
        await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        await admin.close()

    events = await read_events(call, 3)
    call.cancel()
    assert keys(events) == await logged(db, "alice", after=1)
    await hub_replaced(db, old_pid)


@pytest.mark.single_node(
    "waits for lock waiters in the one server's pg_stat_activity; on the cluster they wait on the user's worker"
)
async def test_a_held_user_lock_delays_only_that_users_events_and_skips_none(
    clients: Clients, db: asyncpg.Connection
) -> None:
    stub = clients.memories
    await create(stub, "ursula", "first")
    u_call, u_start = await subscribe(stub, "ursula")
    v_call, _ = await subscribe(stub, "victor")
    u_events: list[Event] = []

    async def read_ursula() -> None:
        for _ in range(11):
            u_events.append(await asyncio.wait_for(u_call.read(), 3 * WAIT_S))

    u_reader = asyncio.create_task(read_ursula())
    async with db.transaction():  # holds ursula's lock until the block ends
        await db.execute(
            "SELECT create_memory($1, $2, NULL, NULL, NULL, 0.5, NULL, '{}', '{}', NULL, NULL, NULL)", "ursula", "held"
        )
        u_writes = asyncio.create_task(create_many(stub, "ursula", 10, prefix="u"))
        # Her first create's batch waits for her lock; the others queue behind it in the server.
        await wait_until(lambda: lock_waiters(db, 1, "create_memories"), "ursula's writes to wait for her lock")
        await create_many(stub, "victor", 10, prefix="v")
        v_events = await read_events(v_call, 10)
        # A stream opened while the transaction is open starts before its event.
        late_call, _ = await subscribe(stub, "ursula", u_start)
        assert u_events == [] and not u_writes.done()
        assert keys(v_events) == await logged(db, "victor")
    await u_writes
    await u_reader
    late_events = await read_events(late_call, 11)

    expected = await logged(db, "ursula", after=1)
    assert keys(u_events) == expected == keys(late_events)
    assert u_events[0].memory.content == "held"
    for call in (u_call, v_call, late_call):
        call.cancel()


async def test_an_event_committed_through_one_server_reaches_a_stream_on_another(
    clients: Clients, db: asyncpg.Connection, db_url: str
) -> None:
    async with extra_server(db_url) as (_, other):
        call, _ = await subscribe(other, "alice")
        memory = await create(clients.memories, "alice", "via A")
        await update(clients.memories, "alice", memory.memory_id, "via A, edited")
        events = await read_events(call, 2)
        call.cancel()

    assert keys(events) == await logged(db, "alice")
    assert [e.memory.memory_id for e in events] == [memory.memory_id] * 2


# --- isolation and bad tokens -------------------------------------------------


async def test_subscribers_see_only_their_own_users_events(clients: Clients, db: asyncpg.Connection) -> None:
    stub = clients.memories
    streams = {user: [await subscribe(stub, user) for _ in range(2)] for user in ("alice", "bob")}
    readers = {user: [asyncio.create_task(read_until_end(c)) for c, _ in calls] for user, calls in streams.items()}

    async def writes(user: str) -> None:
        seeded = await create_many(stub, user, 10, prefix=f"{user} seed ")
        await asyncio.gather(*racing_writes(stub, user, seeded, creates=30))
        await create(stub, user, END)

    await asyncio.gather(writes("alice"), writes("bob"))

    for user, tasks in readers.items():
        expected = await logged(db, user)
        for events in await asyncio.wait_for(asyncio.gather(*tasks), 3 * WAIT_S):
            assert {e.memory.user_id for e in events} == {user}
            assert keys(events) == expected
    for call, _ in streams["alice"] + streams["bob"]:
        call.cancel()


async def assert_bad_resume_token(stub: Stub, user: str, token: str) -> None:
    error = await stream_error(open_call(stub, user, token))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert bad_request_fields(error) == ["resume_token"]


async def test_foreign_cross_topic_and_garbage_resume_tokens_are_invalid_argument(clients: Clients) -> None:
    stub = clients.memories
    bob_call, bob_start = await subscribe(stub, "bob")
    await create(stub, "bob", "bob's")
    bob_event = await read_one(bob_call)
    arc_call, arc_start = await subscribe(stub, "alice", arcs=True)
    await create_many(stub, "alice", 3, gravity=0.9, emotion="joy")  # alice's log: 3 memories, then an arc
    arc_event = await read_one(arc_call)
    bob_call.cancel()
    arc_call.cancel()

    # Every position these tokens name exists in alice's log: only their scope makes them wrong.
    tampered = bob_event.resume_token[:-3] + "AAA"
    for token in (bob_start, bob_event.resume_token, arc_start, arc_event.resume_token, "garbage", tampered):
        await assert_bad_resume_token(stub, "alice", token)
    # The tokens are still good on their own streams.
    resumed, _ = await subscribe(stub, "bob", bob_start)
    assert (await read_one(resumed)).resume_token == bob_event.resume_token
    resumed.cancel()
    resumed, _ = await subscribe(stub, "alice", arc_start, arcs=True)
    assert (await read_one(resumed)).resume_token == arc_event.resume_token
    resumed.cancel()


# --- slow consumers -------------------------------------------------------------


async def test_a_consumer_far_behind_its_buffer_gets_every_event_once(db: asyncpg.Connection, db_url: str) -> None:
    async with extra_server(db_url, stream_buffer_events=4) as (_, stub):
        call, _ = await subscribe(stub, "alice")
        # Not reading while 300 events of ~16 kB are written one by one: the
        # server sends what flow control lets it, its buffer fills with the
        # next events and the rest are dropped.
        for i in range(300):
            await create(stub, "alice", f"{i:03} " + "x" * 16_000)
        events = await read_events(call, 300)  # no later write needed to get them all
        await create(stub, "alice", END)  # and nothing more came before it
        events.append(await read_one(call))
        call.cancel()

    assert keys(events) == await logged(db, "alice")
    assert is_end(events[-1])
    assert_exactly_once(events)


# --- arcs -----------------------------------------------------------------------


async def test_arcs_stream_their_own_events_and_memory_streams_do_not(
    clients: Clients, db: asyncpg.Connection
) -> None:
    stub = clients.memories
    memory_call, _ = await subscribe(stub, "alice")
    arc_call, _ = await subscribe(stub, "alice", arcs=True)
    strong = []
    for i in range(4):
        strong.append(await create(stub, "alice", f"joy {i}", gravity=0.9, emotion="joy"))
    await create(stub, "alice", END)

    created, updated = await read_events(arc_call, 2)
    memory_events = await read_events(memory_call, 5)
    ids = [m.memory_id for m in strong]

    assert created.type == pb.EVENT_TYPE_CREATED
    assert created.arc.memory_ids == ids[:3] and created.arc.emotion_type == "joy"
    assert created.arc.evolution_stage == pb.EVOLUTION_STAGE_FORMING
    assert updated.type == pb.EVENT_TYPE_UPDATED
    assert updated.arc.arc_id == created.arc.arc_id and updated.arc.memory_ids == ids
    assert keys([created, updated]) == await logged(db, "alice", "arc")
    # The memory stream steps over the arc events: its fifth event is the sentinel.
    assert keys(memory_events) == await logged(db, "alice", "memory")
    assert [e.type for e in memory_events] == [pb.EVENT_TYPE_CREATED] * 5 and is_end(memory_events[-1])
    # And the arc stream's next event is the next arc change, not a memory.
    await create(stub, "alice", "joy 4", gravity=0.95, emotion="joy")
    fifth = await read_one(arc_call)
    assert fifth.type == pb.EVENT_TYPE_UPDATED and len(fifth.arc.memory_ids) == 5
    assert fifth.arc.evolution_stage == pb.EVOLUTION_STAGE_ACTIVE
    memory_call.cancel()
    arc_call.cancel()


# --- shutdown and retention -----------------------------------------------------


async def test_shutdown_ends_streams_with_unavailable_and_clients_resume_elsewhere(
    clients: Clients, db: asyncpg.Connection, db_url: str
) -> None:
    async with extra_server(db_url) as (nexus, other):
        calls = [(await subscribe(other, "alice"))[0] for _ in range(2)]
        arc_call, _ = await subscribe(other, "alice", arcs=True)
        await create_many(clients.memories, "alice", 3, prefix="a", gravity=0.9, emotion="joy")
        seen = [await read_events(call, 3) for call in calls]
        arc_seen = await read_events(arc_call, 1)

        stopping = asyncio.create_task(nexus.stop(grace=5))
        for call in (*calls, arc_call):
            # Well inside the grace period: the streams are ended, not left to expire.
            error = await asyncio.wait_for(stream_error(call), 3)
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        await asyncio.wait_for(stopping, WAIT_S)

    await create_many(clients.memories, "alice", 4, prefix="b", gravity=0.9, emotion="joy")
    for events in seen:
        resumed, _ = await subscribe(clients.memories, "alice", events[-1].resume_token)
        events += await read_events(resumed, 4)
        resumed.cancel()
        assert keys(events) == await logged(db, "alice")
    resumed, _ = await subscribe(clients.memories, "alice", arc_seen[-1].resume_token, arcs=True)
    arc_missed = await read_events(resumed, 4)
    resumed.cancel()
    assert keys(arc_seen + arc_missed) == await logged(db, "alice", "arc")


def assert_resume_token_expired(error: grpc.aio.AioRpcError) -> None:
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
    assert precondition_types(error) == ["RESUME_TOKEN_EXPIRED"]


async def test_a_resume_token_past_retention_is_failed_precondition(
    clients: Clients, db: asyncpg.Connection, server: NexusServer
) -> None:
    stub = clients.memories
    call, start = await subscribe(stub, "alice")
    await create_many(stub, "alice", 6)
    events = await read_events(call, 6)
    call.cancel()
    await db.execute(
        "UPDATE memory_events SET create_time = now() - interval '100 hours' WHERE user_id = 'alice' AND seq <= 4"
    )

    assert server.maintenance is not None
    done = await server.maintenance.run_once()
    assert done.get("event_retention") == 4, done
    assert await db.fetchval("SELECT array_agg(seq ORDER BY seq) FROM memory_events") == [5, 6]

    for token in (start, events[0].resume_token, events[2].resume_token):
        assert_resume_token_expired(await stream_error(open_call(stub, "alice", token)))
    # From the last purged event (4) on, nothing is missing: still resumable.
    resumed, _ = await subscribe(stub, "alice", events[3].resume_token)
    assert keys(await read_events(resumed, 2)) == keys(events[4:])
    resumed.cancel()
    # The newest token works and goes on live.
    resumed, _ = await subscribe(stub, "alice", events[-1].resume_token)
    await create(stub, "alice", END)
    assert is_end(await read_one(resumed))
    resumed.cancel()


async def test_retention_between_a_streams_position_check_and_its_log_read_is_not_a_silent_gap(
    clients: Clients, db: asyncpg.Connection
) -> None:
    """A resume token that was valid when checked, whose events retention
    removes before the stream reads them: the stream must not skip them."""
    stub = clients.memories
    call, _ = await subscribe(stub, "alice")
    await create_many(stub, "alice", 6)
    events = await read_events(call, 6)
    call.cancel()
    await db.execute(
        "UPDATE memory_events SET create_time = now() - interval '100 hours' WHERE user_id = 'alice' AND seq <= 4"
    )

    async with db.transaction():
        # Readers of the log wait while retention runs in this transaction.
        await db.execute("LOCK TABLE memory_events IN ACCESS EXCLUSIVE MODE")
        resumed, _ = await subscribe(stub, "alice", events[1].resume_token)  # valid now: nothing purged yet
        await wait_until(lambda: lock_waiters(db, 1, "memory_events_after"), "the stream to read the log")
        done = await db.fetch(
            "SELECT * FROM run_maintenance(interval '0 s', interval '72 hours', interval '168 hours', "
            "interval '24 hours', interval '7 days', 10000)"
        )
        assert dict(list(r) for r in done)["event_retention"] == 4

    try:
        delivered = await asyncio.wait_for(resumed.read(), WAIT_S)
    except grpc.aio.AioRpcError as error:
        assert_resume_token_expired(error)
    else:
        resumed.cancel()
        pytest.fail(f"events 3 and 4 were skipped without an error: after event 2 the stream sent {delivered}")
