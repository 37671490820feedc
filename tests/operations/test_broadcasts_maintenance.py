"""MemoryService broadcasts and the maintenance runner.

Broadcasts (PublishBroadcast / SubscribeBroadcasts): a published event reaches
every connected subscriber of its user, on every replica, with its name,
payload and time; other users' subscribers get nothing; they are live only
(nothing published before a stream starts is delivered) and stored nowhere;
payloads are bounded (7000 bytes as JSON, which always fits a NOTIFY); a
subscriber that stops reading costs a bounded buffer: it later gets an
in-order, duplicate-free subset of what was published (at most once), and the
server keeps serving.

Maintenance (nexus.maintenance, db run_maintenance): removes consciousness
cache entries older than a day, events older than the retention (marking
purged_event_seq, so old resume tokens are refused), request ids older than
the idempotency retention (a retry past it creates a new memory: expected),
and turns arcs idle for 7 days DORMANT (with an arc UPDATED event; a new
cluster then forms a new arc). One replica at a time runs it, at most once per
interval, at most BATCH rows per job per run; a replica's background loop runs
it without being asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from nexus import maintenance as maintenance_module
from nexus.server import NexusServer
from nexus.v1 import memory_pb2 as pb
from nexus.v1 import memory_pb2_grpc

from support.rpc import SERVICE, Clients, auth, bad_request_fields, rpc_error
from support.servers import maintenance_runner, server_config

READ_TIMEOUT_S = 5.0
JOBS = {"cache_cleanup", "event_retention", "request_expiry", "arc_dormancy"}

# ---------------------------------------------------------------- helpers


def struct(**fields: Any) -> struct_pb2.Struct:
    payload = struct_pb2.Struct()
    payload.update(fields)
    return payload


async def publish(stub: memory_pb2_grpc.MemoryServiceStub, user: str, event: str, **fields: Any) -> None:
    request = pb.PublishBroadcastRequest(user_id=user, event=event, payload=struct(**fields))
    await stub.PublishBroadcast(request, metadata=auth(user))


@contextlib.asynccontextmanager
async def broadcasts(stub: memory_pb2_grpc.MemoryServiceStub, user: str) -> AsyncIterator[Any]:
    """A broadcast stream of the user, registered on the server when entered."""
    call = stub.SubscribeBroadcasts(pb.SubscribeBroadcastsRequest(user_id=user), metadata=auth(user))
    try:
        await asyncio.wait_for(call.initial_metadata(), READ_TIMEOUT_S)
        yield call
    finally:
        call.cancel()


async def next_broadcast(call: Any) -> pb.SubscribeBroadcastsResponse:
    return await asyncio.wait_for(call.read(), READ_TIMEOUT_S)


async def next_names(call: Any, count: int) -> list[str]:
    return [(await next_broadcast(call)).event for _ in range(count)]


@contextlib.asynccontextmanager
async def replica(
    db_url: str, channel_options: tuple[tuple[str, Any], ...] = (), **overrides: Any
) -> AsyncIterator[memory_pb2_grpc.MemoryServiceStub]:
    """Another NexusServer on the same database, and a stub connected to it."""
    server = NexusServer(server_config(db_url, **overrides))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=channel_options) as channel:
            yield memory_pb2_grpc.MemoryServiceStub(channel)
    finally:
        await server.stop(grace=0)


class Collector:
    """Reads a stream in the background, keeping the event names in order."""

    def __init__(self, call: Any) -> None:
        self.names: list[str] = []
        self._task = asyncio.create_task(self._run(call))

    async def _run(self, call: Any) -> None:
        while (message := await call.read()) is not grpc.aio.EOF:
            self.names.append(message.event)

    async def publish_until_seen(self, stub: memory_pb2_grpc.MemoryServiceStub, user: str, tag: str) -> str:
        """Publishes tag-0, tag-1 ... until this stream has read one of them (a
        marker may be dropped while the stream's buffer is full); returns it."""
        for attempt in range(40):
            await publish(stub, user, f"{tag}-{attempt}")
            for _ in range(50):
                seen = [n for n in self.names if n.startswith(f"{tag}-")]
                if seen:
                    return seen[0]
                if self._task.done():
                    self._task.result()  # raises what ended the stream
                    raise AssertionError(f"stream ended before {tag}: {self.names[-5:]}")
                await asyncio.sleep(0.01)
        raise AssertionError(f"no {tag} marker arrived; last read: {self.names[-5:]}")

    def stop(self) -> None:
        self._task.cancel()


async def table_counts(db: asyncpg.Connection) -> dict[str, int]:
    tables = await db.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")
    return {t["tablename"]: await db.fetchval(f'SELECT count(*) FROM "{t["tablename"]}"') for t in tables}


async def create_memory(clients: Clients, user: str, content: str, **fields: Any) -> pb.Memory:
    request = pb.CreateMemoryRequest(user_id=user, content=content, **fields)
    return (await clients.memories.CreateMemory(request, metadata=auth(user))).memory


async def strong_memories(clients: Clients, user: str, emotion: str, count: int) -> list[pb.Memory]:
    """count memories of gravity 0.9 with the emotion (three within 24 h form an arc)."""
    return [
        await create_memory(clients, user, f"{emotion} {i}", gravity_score=0.9, emotion_type=emotion)
        for i in range(count)
    ]


async def list_arcs(clients: Clients, user: str) -> list[pb.Arc]:
    return list((await clients.memories.ListArcs(pb.ListArcsRequest(user_id=user), metadata=auth(user))).arcs)


async def age(db: asyncpg.Connection, table: str, column: str, hours: float, where: str, *args: Any) -> None:
    """Sets column to `hours` ago on the rows of table matching where."""
    status = await db.execute(
        f"UPDATE {table} SET {column} = now() - make_interval(secs => {hours * 3600}) WHERE {where}", *args
    )
    assert status != "UPDATE 0", f"nothing to age in {table} where {where} {args}"


async def wait_for_lock_waiter(db_url: str, query: str) -> None:
    """Returns once a backend running `query` waits for a lock (bounded)."""
    conn = await asyncpg.connect(db_url)
    try:
        for _ in range(500):
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()",
                query,
            )
            if waiting:
                return
            await asyncio.sleep(0.01)
    finally:
        await conn.close()
    raise AssertionError(f"no backend running {query} waited for a lock")


async def event_seqs(db: asyncpg.Connection, user: str) -> list[int]:
    return [r["seq"] for r in await db.fetch("SELECT seq FROM memory_events WHERE user_id = $1 ORDER BY seq", user)]


# ---------------------------------------------------------------- broadcasts


async def test_subscriber_receives_event_name_payload_and_time(clients: Clients) -> None:
    async with broadcasts(clients.memories, "alice") as call:
        before = datetime.datetime.now(datetime.UTC)
        await publish(clients.memories, "alice", "memory_created", memory_id="m-1", gravity=0.9, tags=["a", "b"],
                      nested={"ok": True, "none": None})  # fmt: skip
        after = datetime.datetime.now(datetime.UTC)
        message = await next_broadcast(call)
    assert message.event == "memory_created"
    assert json_format.MessageToDict(message.payload) == {
        "memory_id": "m-1", "gravity": 0.9, "tags": ["a", "b"], "nested": {"ok": True, "none": None},
    }  # fmt: skip
    event_time = message.event_time.ToDatetime(tzinfo=datetime.UTC)
    assert before - datetime.timedelta(seconds=1) <= event_time <= after + datetime.timedelta(seconds=1)


async def test_every_subscriber_of_the_user_gets_each_broadcast_and_other_users_none(clients: Clients) -> None:
    stub = clients.memories
    async with (
        broadcasts(stub, "alice") as alice_1,
        broadcasts(stub, "alice") as alice_2,
        broadcasts(stub, "alice") as alice_3,
        broadcasts(stub, "bob") as bob,
    ):
        await publish(stub, "alice", "a1", n=1)
        await publish(stub, "bob", "b1", n=1)
        await stub.PublishBroadcast(pb.PublishBroadcastRequest(user_id="alice", event="a2"), metadata=SERVICE)
        for call in (alice_1, alice_2, alice_3):
            # bob's b1 was published between a1 and a2: none of alice's streams sees it.
            assert await next_names(call, 2) == ["a1", "a2"]
        assert await next_names(bob, 1) == ["b1"]
        await publish(stub, "bob", "b2")
        assert await next_names(bob, 1) == ["b2"]  # not alice's a2
        await publish(stub, "alice", "a3")
        assert await next_names(alice_1, 1) == ["a3"]


async def test_users_may_neither_subscribe_to_nor_publish_for_someone_else(clients: Clients) -> None:
    stub = clients.memories
    call = stub.SubscribeBroadcasts(pb.SubscribeBroadcastsRequest(user_id="alice"), metadata=auth("bob"))
    error = await rpc_error(call.read())
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    async with broadcasts(stub, "alice") as alice:
        request = pb.PublishBroadcastRequest(user_id="alice", event="forged")
        error = await rpc_error(stub.PublishBroadcast(request, metadata=auth("bob")))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        await publish(stub, "alice", "genuine")
        assert await next_names(alice, 1) == ["genuine"]


async def test_broadcast_published_on_one_replica_reaches_streams_on_another(clients: Clients, db_url: str) -> None:
    async with (
        replica(db_url) as other,
        broadcasts(other, "alice") as on_b,
        broadcasts(clients.memories, "alice") as on_a,
    ):
        await publish(clients.memories, "alice", "from_a", side="a")
        await publish(other, "alice", "from_b", side="b")
        for call in (on_a, on_b):
            first, second = await next_broadcast(call), await next_broadcast(call)
            assert (first.event, json_format.MessageToDict(first.payload)) == ("from_a", {"side": "a"})
            assert (second.event, json_format.MessageToDict(second.payload)) == ("from_b", {"side": "b"})


async def test_broadcast_published_before_subscribing_is_not_delivered(clients: Clients) -> None:
    stub = clients.memories
    async with broadcasts(stub, "alice") as probe:
        await publish(stub, "alice", "early")
        # The probe got it: the server has handled "early" before the late stream starts.
        assert await next_names(probe, 1) == ["early"]
        async with broadcasts(stub, "alice") as late:
            await publish(stub, "alice", "sentinel")
            assert await next_names(late, 1) == ["sentinel"]


async def test_publishing_writes_no_rows_anywhere(clients: Clients, db: asyncpg.Connection) -> None:
    await create_memory(clients, "alice", "something to have rows")  # non-empty memory tables too
    before = await table_counts(db)
    assert before["memory_events"] == 1 and before["memory_users"] == 1
    async with broadcasts(clients.memories, "alice") as call:
        for i in range(20):
            await publish(clients.memories, "alice", f"e{i}", i=i)
        await publish(clients.memories, "carol", "to_a_new_user")
        assert await next_names(call, 20) == [f"e{i}" for i in range(20)]
    assert await table_counts(db) == before


async def test_payload_over_7000_bytes_or_empty_event_is_invalid(clients: Clients) -> None:
    stub = clients.memories
    # '{"data":"…"}' is 11 bytes plus the string.
    over = pb.PublishBroadcastRequest(user_id="alice", event="big", payload=struct(data="x" * 6990))
    error = await rpc_error(stub.PublishBroadcast(over, metadata=auth("alice")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["payload"]
    # Non-ASCII counts as its JSON escape: 1200 × "\\u00e9" is 7200 bytes.
    escaped = pb.PublishBroadcastRequest(user_id="alice", event="big", payload=struct(data="é" * 1200))
    error = await rpc_error(stub.PublishBroadcast(escaped, metadata=auth("alice")))
    assert bad_request_fields(error) == ["payload"]
    for event in ("", "e" * 65):
        request = pb.PublishBroadcastRequest(user_id="alice", event=event, payload=struct(a=1))
        error = await rpc_error(stub.PublishBroadcast(request, metadata=auth("alice")))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(error) == ["event"]


async def test_payload_text_with_a_literal_backslash_u0000_is_not_a_nul(clients: Clients) -> None:
    # A backslash followed by "u0000" is ordinary text (a Windows path, an
    # escape sequence in documentation); only a real NUL character is refused.
    text = "C:\\u0000dir"
    assert "\x00" not in text and len(text) == 11
    async with broadcasts(clients.memories, "alice") as call:
        await publish(clients.memories, "alice", "path", path=text)
        message = await next_broadcast(call)
    assert json_format.MessageToDict(message.payload) == {"path": text}
    nul = pb.PublishBroadcastRequest(user_id="alice", event="nul", payload=struct(path="a\x00b"))
    error = await rpc_error(clients.memories.PublishBroadcast(nul, metadata=auth("alice")))
    assert bad_request_fields(error) == ["payload"]


async def test_largest_valid_broadcast_fits_the_notify_and_arrives_intact(clients: Clients) -> None:
    user = "u" * 128
    event = "\N{GRINNING FACE}" * 64  # 64 characters, 768 bytes once JSON-escaped
    data = "x" * 6989  # payload exactly 7000 bytes as JSON
    async with broadcasts(clients.memories, user) as call:
        await publish(clients.memories, user, event, data=data)
        message = await next_broadcast(call)
    assert message.event == event
    assert json_format.MessageToDict(message.payload) == {"data": data}


async def test_subscriber_that_stops_reading_gets_an_ordered_subset_and_server_keeps_serving(db_url: str) -> None:
    published = [f"n-{i:03d}" for i in range(200)]
    filler = "p" * 6000  # enough bytes to exhaust the stream's flow-control window
    # Without BDP probing the client keeps HTTP/2's 64 KiB stream window, so
    # only a few broadcasts can be in flight to a stream that does not read.
    async with replica(db_url, (("grpc.http2.bdp_probe", 0),), stream_buffer_events=4) as stub:
        async with broadcasts(stub, "alice") as slow, broadcasts(stub, "alice") as fast_call:
            fast = Collector(fast_call)
            for name in published:
                await publish(stub, "alice", name, filler=filler)
            # Once the fast stream reads a marker, the server has offered every
            # broadcast to the slow stream too.
            await fast.publish_until_seen(stub, "alice", "end")
            reader = Collector(slow)
            await reader.publish_until_seen(stub, "alice", "after")
            fast.stop()
            reader.stop()
            got = reader.names
            numbered = [n for n in got if n.startswith("n-")]
            kinds = [n.split("-")[0] for n in got]
            # At most once, in publish order: a subsequence of what was published.
            assert len(numbered) == len(set(numbered))
            assert numbered == sorted(numbered) and set(numbered) <= set(published)
            assert kinds == sorted(kinds, key=["n", "end", "after"].index), got
            # Bounded: a stream that did not read got what its 64 KiB window
            # held (~10) plus its 4-event buffer, not the 200 published.
            assert 0 < len(numbered) <= 50, len(numbered)
        # The server still serves: a new stream and a unary call.
        async with broadcasts(stub, "alice") as fresh:
            await publish(stub, "alice", "still-serving", filler=filler)
            message = await next_broadcast(fresh)
            assert (message.event, len(message.payload["filler"])) == ("still-serving", 6000)


# ---------------------------------------------------------------- maintenance


async def test_cache_entries_older_than_a_day_are_removed_newer_kept(db_url: str, db: asyncpg.Connection) -> None:
    ages_h = {"old-25h": 25, "old-48h": 48, "new-23h": 23, "new-now": 0}
    for key, hours in ages_h.items():
        await db.execute(
            "INSERT INTO consciousness_cache (user_id, cache_key, value, create_time) "
            "VALUES ('alice', $1, '{}', now() - make_interval(hours => $2))",
            key, hours,
        )  # fmt: skip
    async with maintenance_runner(db_url, maintenance_interval_s=0) as maintenance:
        done = await maintenance.run_once()
    assert set(done) == JOBS
    assert done["cache_cleanup"] == 2
    keys = {r["cache_key"] for r in await db.fetch("SELECT cache_key FROM consciousness_cache")}
    assert keys == {"new-23h", "new-now"}


async def test_events_past_retention_are_removed_and_marked_purged(
    clients: Clients, db_url: str, db: asyncpg.Connection
) -> None:
    call = clients.memories.SubscribeMemories(pb.SubscribeMemoriesRequest(user_id="alice"), metadata=auth("alice"))
    start_token = dict(await call.initial_metadata())["x-nexus-resume-token"]  # position 0
    call.cancel()
    for i in range(5):
        await create_memory(clients, "alice", f"alice {i}")
    for i in range(3):
        await create_memory(clients, "bob", f"bob {i}")
    await create_memory(clients, "carol", "carol 0")
    await age(db, "memory_events", "create_time", 73, "user_id = 'alice' AND seq <= 3")
    await age(db, "memory_events", "create_time", 71, "user_id = 'alice' AND seq = 4")  # inside 72 h
    await age(db, "memory_events", "create_time", 100, "user_id = 'bob' AND seq = 1")

    async with maintenance_runner(db_url, maintenance_interval_s=0) as maintenance:  # event_retention_hours = 72 (the default)
        done = await maintenance.run_once()
    assert done["event_retention"] == 4
    assert await event_seqs(db, "alice") == [4, 5]
    assert await event_seqs(db, "bob") == [2, 3]
    assert await event_seqs(db, "carol") == [1]
    purged = {r["user_id"]: r["purged_event_seq"] for r in await db.fetch("SELECT * FROM memory_users")}
    assert purged == {"alice": 3, "bob": 1, "carol": 0}

    # A stream resuming before the purged events is refused, not silently gapped.
    resume = pb.SubscribeMemoriesRequest(user_id="alice", resume_token=start_token)
    error = await rpc_error(clients.memories.SubscribeMemories(resume, metadata=auth("alice")).read())
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_request_ids_past_retention_stop_deduplicating_newer_ones_still_do(
    clients: Clients, db_url: str, db: asyncpg.Connection
) -> None:
    old = await create_memory(clients, "alice", "old request", request_id="req-old")
    new = await create_memory(clients, "alice", "new request", request_id="req-new")
    await age(db, "memory_requests", "create_time", 169, "request_id = 'req-old'")  # retention: 168 h
    await age(db, "memory_requests", "create_time", 167, "request_id = 'req-new'")
    async with maintenance_runner(db_url, maintenance_interval_s=0) as maintenance:
        done = await maintenance.run_once()
    assert done["request_expiry"] == 1
    assert {r["request_id"] for r in await db.fetch("SELECT request_id FROM memory_requests")} == {"req-new"}

    # Within retention a retry returns the original memory ...
    assert (await create_memory(clients, "alice", "new request", request_id="req-new")).memory_id == new.memory_id
    # ... past it, the id is forgotten: the retry creates a new memory (expected).
    again = await create_memory(clients, "alice", "old request", request_id="req-old")
    assert again.memory_id != old.memory_id
    remembered = await db.fetchval("SELECT memory_id::text FROM memory_requests WHERE request_id = 'req-old'")
    assert remembered == again.memory_id
    assert await db.fetchval("SELECT count(*) FROM memories WHERE user_id = 'alice'") == 3


async def test_idle_arc_goes_dormant_and_a_new_cluster_forms_a_new_arc(
    clients: Clients, db_url: str, db: asyncpg.Connection
) -> None:
    first = await strong_memories(clients, "alice", "joy", 3)
    await strong_memories(clients, "alice", "calm", 3)
    arcs = {a.emotion_type: a for a in await list_arcs(clients, "alice")}
    assert {e: a.evolution_stage for e, a in arcs.items()} == dict.fromkeys(["joy", "calm"], pb.EVOLUTION_STAGE_FORMING)
    old_joy = arcs["joy"]
    # A week of silence for joy (its memories are old too); calm was touched 6 days ago.
    await age(db, "memory_arcs", "update_time", 7 * 24 + 1, "arc_id = $1::uuid", old_joy.arc_id)
    await age(db, "memories", "create_time", 7 * 24 + 1, "emotion_type = 'joy'")
    await age(db, "memory_arcs", "update_time", 6 * 24, "arc_id = $1::uuid", arcs["calm"].arc_id)

    call = clients.memories.SubscribeArcs(pb.SubscribeArcsRequest(user_id="alice"), metadata=auth("alice"))
    try:
        await call.initial_metadata()
        async with maintenance_runner(db_url, maintenance_interval_s=0) as maintenance:
            done = await maintenance.run_once()
        assert done["arc_dormancy"] == 1
        event = await asyncio.wait_for(call.read(), READ_TIMEOUT_S)
    finally:
        call.cancel()
    assert (event.type, event.arc.arc_id, event.arc.evolution_stage) == (
        pb.EVENT_TYPE_UPDATED, old_joy.arc_id, pb.EVOLUTION_STAGE_DORMANT,
    )  # fmt: skip
    logged = await db.fetchrow(
        "SELECT * FROM memory_events WHERE user_id = 'alice' AND topic = 'arc' ORDER BY seq DESC LIMIT 1"
    )
    assert logged["change"] == "updated"
    assert (logged["document"]["arc_id"], logged["document"]["evolution_stage"]) == (old_joy.arc_id, "dormant")

    # The unique index covers only forming/active arcs: a new cluster forms a new joy arc.
    second = await strong_memories(clients, "alice", "joy", 3)
    listed = await list_arcs(clients, "alice")
    joy = {a.arc_id: a for a in listed if a.emotion_type == "joy"}
    (new_id,) = set(joy) - {old_joy.arc_id}
    assert joy[old_joy.arc_id].evolution_stage == pb.EVOLUTION_STAGE_DORMANT
    # (aged in one statement, the first members share a create_time: compare as sets)
    assert sorted(joy[old_joy.arc_id].memory_ids) == sorted(m.memory_id for m in first)
    assert joy[new_id].evolution_stage == pb.EVOLUTION_STAGE_FORMING
    assert list(joy[new_id].memory_ids) == [m.memory_id for m in second]
    assert [a.evolution_stage for a in listed if a.emotion_type == "calm"] == [pb.EVOLUTION_STAGE_FORMING]


@pytest.mark.single_node("waits for maintenance's lock wait in the one server's pg_stat_activity; on the cluster "
                         "it waits on the worker owning the user, under a shard query's text")
async def test_arc_that_gains_members_while_maintenance_waits_for_its_user_stays_open(
    clients: Clients, db_url: str, db: asyncpg.Connection
) -> None:
    """Maintenance picks idle arcs, then takes each user's lock. A memory that
    joins the arc in between makes it not idle: it must not go dormant."""
    await strong_memories(clients, "alice", "joy", 3)
    await age(db, "memory_arcs", "update_time", 8 * 24, "user_id = 'alice'")
    await age(db, "memories", "create_time", 8 * 24, "user_id = 'alice'")
    await strong_memories(clients, "alice", "joy", 2)  # two fresh ones: no cluster of three yet
    assert await db.fetchval("SELECT count(*) FROM memory_arc_members") == 3

    async with maintenance_runner(db_url, maintenance_interval_s=0) as maintenance:
        async with db.transaction():
            await db.execute("SELECT lock_memory_user('alice')")  # as a CreateMemory in flight holds it
            run = asyncio.create_task(maintenance.run_once())
            await wait_for_lock_waiter(db_url, "run_maintenance")
            # The third fresh memory commits while maintenance waits: the arc gains 3 members.
            await db.fetchval("SELECT create_memory('alice', 'fresh joy 2', NULL, NULL, NULL, 0.9, 'joy', '{}', '{}', "
                              "NULL, NULL, NULL)")  # fmt: skip
        done = await asyncio.wait_for(run, READ_TIMEOUT_S)
    arc = await db.fetchrow("SELECT * FROM memory_arcs WHERE user_id = 'alice'")
    assert await db.fetchval("SELECT count(*) FROM memory_arc_members WHERE arc_id = $1", arc["arc_id"]) == 6
    assert (done["arc_dormancy"], arc["evolution_stage"]) == (0, "active")


async def test_each_due_run_is_done_by_exactly_one_of_two_replicas(db_url: str, db: asyncpg.Connection) -> None:
    await db.execute(
        "INSERT INTO consciousness_cache (user_id, cache_key, value, create_time) "
        "SELECT 'alice', 'k' || i, '{}', now() - interval '2 days' FROM generate_series(1, 40) i"
    )
    hourly = {"maintenance_interval_s": 3600}
    async with maintenance_runner(db_url, **hourly) as a, maintenance_runner(db_url, **hourly) as b:
        for round_ in range(15):
            if round_:
                # The interval has passed since the last run.
                await db.execute("UPDATE maintenance_runs SET run_time = now() - interval '2 hours'")
            results = await asyncio.gather(*(m.run_once() for m in (a, b) * 4))
            ran = [r for r in results if r]
            assert len(ran) == 1, f"round {round_}: {results}"
            assert set(ran[0]) == JOBS
            if round_ == 0:
                assert ran[0]["cache_cleanup"] == 40
            # Right after a run, the next is not due on either replica.
            assert await a.run_once() == {} and await b.run_once() == {}
            runs = await db.fetch("SELECT job, run_time > now() - interval '1 minute' AS recent FROM maintenance_runs")
            assert [(r["job"], r["recent"]) for r in runs] == [("all", True)]
    assert await db.fetchval("SELECT count(*) FROM consciousness_cache") == 0


async def test_server_maintenance_with_a_long_interval_runs_once(server: NexusServer, db: asyncpg.Connection) -> None:
    assert server.maintenance is not None  # the default interval (60 s): the loop has not ticked yet
    first = await server.maintenance.run_once()
    assert set(first) == JOBS
    assert await server.maintenance.run_once() == {}
    assert await db.fetchval("SELECT count(*) FROM maintenance_runs") == 1


async def test_background_loop_runs_maintenance_unasked(db_url: str, db: asyncpg.Connection) -> None:
    await db.execute(
        "INSERT INTO consciousness_cache (user_id, cache_key, value, create_time) "
        "VALUES ('alice', 'stale', '{}', now() - interval '2 days'), ('alice', 'fresh', '{}', now())"
    )
    async with replica(db_url, maintenance_interval_s=0.05):
        for _ in range(200):
            if await db.fetchval("SELECT count(*) FROM consciousness_cache WHERE cache_key = 'stale'") == 0:
                break
            await asyncio.sleep(0.025)
    keys = [r["cache_key"] for r in await db.fetch("SELECT cache_key FROM consciousness_cache")]
    assert keys == ["fresh"]
    assert await db.fetchval("SELECT count(*) FROM maintenance_runs") == 1


async def test_jobs_remove_at_most_batch_rows_per_run_and_later_runs_continue(
    db_url: str, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(maintenance_module, "BATCH", 3)
    old = "now() - interval '30 days'"
    await db.execute(
        f"""
        INSERT INTO consciousness_cache (user_id, cache_key, value, create_time)
        SELECT 'alice', 'k' || i, '{{}}', {old} FROM generate_series(1, 7) i;
        INSERT INTO memory_requests (user_id, request_id, fingerprint, memory_id, create_time)
        SELECT 'alice', 'r' || i, 'f', gen_random_uuid(), {old} FROM generate_series(1, 7) i;
        INSERT INTO memory_users (user_id, last_event_seq) VALUES ('alice', 9);
        INSERT INTO memory_events (user_id, seq, topic, change, document, create_time)
        SELECT 'alice', i, 'memory', 'created', '{{}}', CASE WHEN i <= 7 THEN {old} ELSE now() END
        FROM generate_series(1, 9) i;
        INSERT INTO memory_arcs (user_id, arc_name, emotion_type, gravity_center, update_time)
        SELECT 'user' || i, 'joy arc', 'joy', 0.9, {old} FROM generate_series(1, 7) i;
        """
    )
    expected = [3, 3, 1, 0]
    async with maintenance_runner(db_url, maintenance_interval_s=0) as maintenance:
        for run, count in enumerate(expected):
            done = await maintenance.run_once()
            assert done == dict.fromkeys(JOBS, count), f"run {run}: {done}"
            # Events above purged_event_seq are all still there: no gap a stream could fall into.
            purged = await db.fetchval("SELECT purged_event_seq FROM memory_users WHERE user_id = 'alice'")
            seqs = await event_seqs(db, "alice")
            assert set(range(purged + 1, 10)) <= set(seqs) and all(s > purged for s in seqs[-2:])
            assert len(seqs) == 9 - sum(expected[: run + 1])
    assert await db.fetchval("SELECT count(*) FROM consciousness_cache") == 0
    assert await db.fetchval("SELECT count(*) FROM memory_requests") == 0
    assert await event_seqs(db, "alice") == [8, 9]
    assert await db.fetchval("SELECT purged_event_seq FROM memory_users WHERE user_id = 'alice'") == 7
    assert await db.fetchval("SELECT count(*) FROM memory_arcs WHERE evolution_stage = 'dormant'") == 7
    arc_events = await db.fetchval("SELECT count(*) FROM memory_events WHERE topic = 'arc' AND change = 'updated'")
    assert arc_events == 7
