"""MemoryService memories and arcs against a real server and database.

Checked promises: Create/Get/Update/Delete round trips (fields echo back, the
embedding only when asked for, another user's memory is NOT_FOUND, a second
delete is NOT_FOUND); the insert rules in the database (gravity >= 0.85 tags
high_gravity and makes an identity anchor, an entity overlapping the user's
identity names case-insensitively tags identity, an unset temporal type is
inferred from whole words, an explicit one is kept, tags never repeat), also
on UpdateMemory; the update mask changes only the masked fields and is
validated; request_id idempotency (also with 20 concurrent sends and after a
delete); concurrent creates of several users written in shared commits, each
call keeping its own outcome (a conflict, a retry, a deleted request's
NOT_FOUND) and every user's count and event numbers exact; arcs (the third qualifying memory of an emotion within 24 h forms one
FORMING arc, five make it ACTIVE, weaker or other-emotion or older memories
are not members, concurrent inserts form exactly one open arc per emotion
holding every member, a delete removes the membership, ListArcs is newest
first and pages); ListMemories (newest first, every filter, the seed's
"last 7 days, gravity >= 0.7, newest 50" query, pagination that returns every
memory exactly once while memories arrive, page tokens bound to their list);
memory_users.memory_count equals the user's rows after a create/delete storm.
"""

from __future__ import annotations

import asyncio
import datetime
import random
import statistics
import uuid
from collections import Counter
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2

from nexus.v1 import memory_pb2 as pb

from support.rpc import SERVICE, Clients, all_pages, auth, bad_request_fields, rpc_error

# On the cluster, every call of this file runs inside one user's worker as it
# does on one node: the cluster pass of CI keeps the tests of racing writes
# (marked cluster), the release check runs them all.

DIM = 384
PAST, PRESENT, FUTURE = pb.TEMPORAL_TYPE_PAST, pb.TEMPORAL_TYPE_PRESENT, pb.TEMPORAL_TYPE_FUTURE
FORMING, ACTIVE = pb.EVOLUTION_STAGE_FORMING, pb.EVOLUTION_STAGE_ACTIVE

# --- helpers ------------------------------------------------------------------


async def create(
    clients: Clients, user: str, content: str = "a quiet moment", metadata: Any = SERVICE, **fields: Any
) -> pb.Memory:
    request = pb.CreateMemoryRequest(user_id=user, content=content, **fields)
    return (await clients.memories.CreateMemory(request, metadata=metadata)).memory


async def get(
    clients: Clients, user: str, memory_id: str, *, include_embedding: bool = False, metadata: Any = SERVICE
) -> pb.Memory:
    request = pb.GetMemoryRequest(user_id=user, memory_id=memory_id, include_embedding=include_embedding)
    return (await clients.memories.GetMemory(request, metadata=metadata)).memory


def update_call(clients: Clients, memory: pb.Memory, paths: list[str], metadata: Any = SERVICE) -> Any:
    request = pb.UpdateMemoryRequest(memory=memory, update_mask=field_mask_pb2.FieldMask(paths=paths))
    return clients.memories.UpdateMemory(request, metadata=metadata)


async def update(clients: Clients, memory: pb.Memory, paths: list[str]) -> pb.Memory:
    return (await update_call(clients, memory, paths)).memory


def delete_call(clients: Clients, user: str, memory_id: str) -> Any:
    return clients.memories.DeleteMemory(pb.DeleteMemoryRequest(user_id=user, memory_id=memory_id), metadata=SERVICE)


async def list_page(clients: Clients, user: str, metadata: Any = SERVICE, **filters: Any) -> pb.ListMemoriesResponse:
    return await clients.memories.ListMemories(pb.ListMemoriesRequest(user_id=user, **filters), metadata=metadata)


async def list_ids(clients: Clients, user: str, **filters: Any) -> list[str]:
    """Every memory id of a filtered list, following next_page_token to the end."""
    pages = await all_pages(
        lambda token: list_page(clients, user, page_size=3, page_token=token, **filters),
        lambda page: [m.memory_id for m in page.memories],
    )
    return [memory_id for page in pages for memory_id in page]


async def list_arcs(clients: Clients, user: str, page_size: int = 0, page_token: str = "") -> pb.ListArcsResponse:
    request = pb.ListArcsRequest(user_id=user, page_size=page_size, page_token=page_token)
    return await clients.memories.ListArcs(request, metadata=SERVICE)


async def set_identity(clients: Clients, user: str, names: list[str]) -> None:
    request = pb.SetIdentityEntitiesRequest(user_id=user, entities=names)
    await clients.memories.SetIdentityEntities(request, metadata=SERVICE)


async def existing_user(clients: Clients, user: str) -> None:
    """Makes the user's memory_users row exist, so concurrent first writes race
    for real (inserts of a brand-new row would wait on each other)."""
    await set_identity(clients, user, [])


def vector(rng: random.Random) -> list[float]:
    return [rng.uniform(-1, 1) for _ in range(DIM)]


def timestamp(value: datetime.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def ordered_newest_first(memories: list[pb.Memory]) -> bool:
    keys = [(m.create_time.ToDatetime(), m.memory_id) for m in memories]
    return keys == sorted(keys, reverse=True) and len(set(keys)) == len(keys)


async def backdate(db: asyncpg.Connection, memory_ids: list[str], interval: str) -> None:
    await db.execute(
        f"UPDATE memories SET create_time = now() - interval '{interval}' WHERE memory_id = ANY($1::uuid[])",
        memory_ids,
    )


async def memory_rows(db: asyncpg.Connection, user: str) -> int:
    return await db.fetchval("SELECT count(*) FROM memories WHERE user_id = $1", user)


async def memory_count(db: asyncpg.Connection, user: str) -> int:
    return await db.fetchval("SELECT memory_count FROM memory_users WHERE user_id = $1", user)


async def open_arcs(db: asyncpg.Connection, user: str) -> dict[str, set[str]]:
    """emotion -> the member ids of the user's FORMING/ACTIVE arc of it; fails on two open arcs of one emotion."""
    rows = await db.fetch(
        """SELECT a.emotion_type, a.arc_id, array_remove(array_agg(am.memory_id::text), NULL) AS members
           FROM memory_arcs a LEFT JOIN memory_arc_members am ON am.user_id = a.user_id AND am.arc_id = a.arc_id
           WHERE a.user_id = $1 AND a.evolution_stage IN ('forming', 'active')
           GROUP BY a.emotion_type, a.arc_id""",
        user,
    )
    emotions = [r["emotion_type"] for r in rows]
    assert len(emotions) == len(set(emotions)), f"two open arcs of one emotion: {emotions}"
    return {r["emotion_type"]: set(r["members"]) for r in rows}


# --- round trips --------------------------------------------------------------


async def test_create_and_get_echo_every_field_and_the_embedding_only_when_asked(clients: Clients) -> None:
    embedding = vector(random.Random(1))
    fields = dict(
        thread_id="thread-1", session_id="session-1", memory_trace_id="trace-1", gravity_score=0.42,
        emotion_type="wonder", entities=["Moon", "Tea"], meta_tags=["night", "kitchen"], temporal_type=PRESENT,
    )  # fmt: skip
    created = await create(clients, "alice", "tea under the moon", embedding=embedding, **fields)
    uuid.UUID(created.memory_id)
    assert created.user_id == "alice" and created.content == "tea under the moon"
    for name, value in fields.items():
        assert getattr(created, name) == value, name
    assert not created.identity_anchor
    assert list(created.embedding) == []
    assert created.create_time == created.update_time and created.create_time.seconds > 0

    plain = await get(clients, "alice", created.memory_id, metadata=auth("alice"))
    assert plain == created
    with_embedding = await get(clients, "alice", created.memory_id, include_embedding=True)
    assert list(with_embedding.embedding) == pytest.approx(embedding, rel=1e-6)
    with_embedding.ClearField("embedding")
    assert with_embedding == created

    bare = await create(clients, "alice", "no vector here")
    assert list((await get(clients, "alice", bare.memory_id, include_embedding=True)).embedding) == []


async def test_get_of_another_users_memory_is_not_found(clients: Clients) -> None:
    memory = await create(clients, "alice", "alice's secret")
    error = await rpc_error(get(clients, "bob", memory.memory_id))  # a service acting as bob
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = await rpc_error(get(clients, "bob", memory.memory_id, metadata=auth("bob")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    # Nor can bob update or delete it.
    other = pb.Memory(memory_id=memory.memory_id, user_id="bob", content="hijacked")
    assert (await rpc_error(update_call(clients, other, ["content"]))).code() == grpc.StatusCode.NOT_FOUND
    assert (await rpc_error(delete_call(clients, "bob", memory.memory_id))).code() == grpc.StatusCode.NOT_FOUND
    assert (await get(clients, "alice", memory.memory_id)).content == "alice's secret"


async def test_delete_removes_the_memory_and_a_second_delete_is_not_found(clients: Clients, db: asyncpg.Connection) -> None:
    memory = await create(clients, "alice")
    await delete_call(clients, "alice", memory.memory_id)
    assert await memory_rows(db, "alice") == 0
    assert await memory_count(db, "alice") == 0
    assert (await rpc_error(get(clients, "alice", memory.memory_id))).code() == grpc.StatusCode.NOT_FOUND
    assert (await rpc_error(delete_call(clients, "alice", memory.memory_id))).code() == grpc.StatusCode.NOT_FOUND
    assert await memory_count(db, "alice") == 0


# --- insert rules -------------------------------------------------------------


@pytest.mark.parametrize(
    ("gravity", "strong"), [(0.85, True), (0.849, False), (1.0, True), (0.0, False)], ids=str
)
async def test_gravity_at_or_above_085_tags_high_gravity_and_anchors(
    clients: Clients, db: asyncpg.Connection, gravity: float, strong: bool
) -> None:
    memory = await create(clients, "alice", gravity_score=gravity, meta_tags=["x"])
    assert list(memory.meta_tags) == (["x", "high_gravity"] if strong else ["x"])
    assert memory.identity_anchor is strong
    row = await db.fetchrow("SELECT meta_tags, identity_anchor FROM memories WHERE memory_id = $1::uuid", memory.memory_id)
    assert (row["meta_tags"], row["identity_anchor"]) == (list(memory.meta_tags), strong)


async def test_identity_tag_on_any_case_insensitive_overlap_with_the_users_identity_names(clients: Clients) -> None:
    await set_identity(clients, "alice", ["Alice", "Paris", "Nexus", "Coffee"])
    await set_identity(clients, "bob", ["Berlin"])
    cases = {
        ("paris",): True,  # one of four names is enough (the seed required all)
        ("ALICE", "london"): True,
        ("Alice", "Paris", "Nexus", "Coffee"): True,
        ("london", "tokyo"): False,
        ("berlin",): False,  # bob's identity name, not alice's
        (): False,
    }
    results = {}
    for entities, _ in cases.items():
        memory = await create(clients, "alice", entities=list(entities))
        results[entities] = "identity" in memory.meta_tags
        assert list(memory.meta_tags).count("identity") <= 1
    assert results == cases
    assert "identity" in (await create(clients, "bob", entities=["BERLIN"])).meta_tags


async def test_temporal_type_is_inferred_from_whole_words(clients: Clients) -> None:
    cases = {
        "I will call her": FUTURE,
        "We are going to the sea": FUTURE,
        "Tomorrow is the day": FUTURE,
        "next   month brings rain": FUTURE,
        "she plans a trip": FUTURE,
        "yesterday was long": PAST,
        "last  week was long": PAST,
        "I remembered her name": PAST,
        "two years ago": PAST,
        "a willow by the river": PRESENT,
        "a planet far away": PRESENT,
        "the plantation is green": PRESENT,
        "an act of remembrance": PRESENT,
        "the goodwill of friends": PRESENT,
        "everything was sorted beforehand": PRESENT,
        "a lasting weekend": PRESENT,
        "the agony": PRESENT,
        "I am here now": PRESENT,
    }
    inferred = {}
    for content in cases:
        inferred[content] = (await create(clients, "alice", content)).temporal_type
    assert inferred == cases


async def test_an_explicit_temporal_type_is_kept(clients: Clients, db: asyncpg.Connection) -> None:
    memory = await create(clients, "alice", "tomorrow I will plan", temporal_type=PAST)
    assert memory.temporal_type == PAST
    assert await db.fetchval("SELECT temporal_type FROM memories WHERE memory_id = $1::uuid", memory.memory_id) == "past"
    assert (await create(clients, "alice", "yesterday", temporal_type=FUTURE)).temporal_type == FUTURE


async def test_tags_are_never_duplicated(clients: Clients, db: asyncpg.Connection) -> None:
    await set_identity(clients, "alice", ["Paris"])
    memory = await create(
        clients, "alice", gravity_score=0.9, entities=["paris"],
        meta_tags=["a", "high_gravity", "a", "identity", "b", "high_gravity"],
    )  # fmt: skip
    assert list(memory.meta_tags) == ["a", "high_gravity", "identity", "b"]
    # The database's own rule, past the service's validation.
    tags = await db.fetchval(
        """INSERT INTO memories (user_id, content, gravity_score, entities, meta_tags, temporal_type)
           VALUES ('alice', 'direct', 0.95, '{PARIS}', '{z,z,identity,high_gravity,y,z}', 'present')
           RETURNING meta_tags"""
    )
    assert tags == ["z", "identity", "high_gravity", "y"]


async def test_update_applies_the_rules_again(clients: Clients, db: asyncpg.Connection) -> None:
    await set_identity(clients, "alice", ["Paris"])
    memory = await create(clients, "alice", "I will go", gravity_score=0.5, meta_tags=["trip"])
    assert (list(memory.meta_tags), memory.identity_anchor, memory.temporal_type) == (["trip"], False, FUTURE)

    memory.gravity_score = 0.9
    raised = await update(clients, memory, ["gravity_score"])
    assert (list(raised.meta_tags), raised.identity_anchor) == (["trip", "high_gravity"], True)

    raised.meta_tags[:] = ["fresh", "fresh"]
    retagged = await update(clients, raised, ["meta_tags"])
    assert list(retagged.meta_tags) == ["fresh", "high_gravity"]

    retagged.entities[:] = ["PARIS"]
    identified = await update(clients, retagged, ["entities"])
    assert list(identified.meta_tags) == ["fresh", "high_gravity", "identity"]

    identified.content = "yesterday I went"
    identified.temporal_type = pb.TEMPORAL_TYPE_UNSPECIFIED
    reinferred = await update(clients, identified, ["content", "temporal_type"])
    assert reinferred.temporal_type == PAST
    row = await db.fetchrow(
        "SELECT meta_tags, identity_anchor, temporal_type FROM memories WHERE memory_id = $1::uuid", memory.memory_id
    )
    assert tuple(row) == (["fresh", "high_gravity", "identity"], True, "past")

    reinferred.temporal_type = PRESENT
    assert (await update(clients, reinferred, ["temporal_type"])).temporal_type == PRESENT  # explicit: kept


# --- update mask ----------------------------------------------------------------


async def test_update_changes_only_the_masked_fields(clients: Clients, db: asyncpg.Connection) -> None:
    embedding = vector(random.Random(2))
    original = await create(
        clients, "alice", "original", thread_id="t1", session_id="s1", memory_trace_id="tr1", gravity_score=0.3,
        emotion_type="calm", entities=["Tea"], meta_tags=["old"], temporal_type=PRESENT, embedding=embedding,
    )  # fmt: skip
    replacement = pb.Memory(
        memory_id=original.memory_id, user_id="alice", content="edited", thread_id="t2", session_id="s2",
        memory_trace_id="tr2", gravity_score=0.6, emotion_type="joy", entities=["Coffee"], meta_tags=["new"],
        temporal_type=FUTURE, identity_anchor=True, embedding=vector(random.Random(3)),
    )  # fmt: skip
    updated = await update(clients, replacement, ["content", "thread_id"])

    expected = pb.Memory()
    expected.CopyFrom(original)
    expected.content, expected.thread_id = "edited", "t2"
    expected.update_time.CopyFrom(updated.update_time)
    assert updated == expected
    assert updated.update_time.ToDatetime() > original.update_time.ToDatetime()
    stored = await get(clients, "alice", original.memory_id, include_embedding=True)
    assert list(stored.embedding) == pytest.approx(embedding, rel=1e-6)
    stored.ClearField("embedding")
    assert stored == updated
    row = await db.fetchrow("SELECT content, thread_id, gravity_score, identity_anchor FROM memories")
    assert tuple(row) == ("edited", "t2", 0.3, False)

    # Clearing by mask: an empty masked value stores "none".
    cleared = await update(clients, pb.Memory(memory_id=original.memory_id, user_id="alice"), ["session_id", "embedding"])
    assert cleared.session_id == "" and cleared.thread_id == "t2"
    assert await db.fetchval("SELECT session_id IS NULL AND embedding IS NULL FROM memories") is True


@pytest.mark.parametrize("paths", [[], ["create_time"], ["content", "no_such_field"]], ids=["empty", "immutable", "unknown"])
async def test_update_mask_must_name_updatable_fields(clients: Clients, db: asyncpg.Connection, paths: list[str]) -> None:
    memory = await create(clients, "alice", "unchanged")
    memory.content = "changed"
    error = await rpc_error(update_call(clients, memory, paths))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["update_mask"]
    assert await db.fetchval("SELECT content FROM memories") == "unchanged"


async def test_update_of_a_missing_memory_is_not_found(clients: Clients, db: asyncpg.Connection) -> None:
    missing = pb.Memory(memory_id=str(uuid.uuid4()), user_id="alice", content="ghost")
    assert (await rpc_error(update_call(clients, missing, ["content"]))).code() == grpc.StatusCode.NOT_FOUND
    deleted = await create(clients, "alice")
    await delete_call(clients, "alice", deleted.memory_id)
    deleted.content = "back from the dead"
    assert (await rpc_error(update_call(clients, deleted, ["content"]))).code() == grpc.StatusCode.NOT_FOUND
    assert await memory_rows(db, "alice") == 0


# --- idempotency ----------------------------------------------------------------


async def created_events(db: asyncpg.Connection, user: str) -> int:
    return await db.fetchval(
        "SELECT count(*) FROM memory_events WHERE user_id = $1 AND topic = 'memory' AND change = 'created'", user
    )


async def test_a_retry_returns_the_same_memory_and_other_arguments_are_already_exists(
    clients: Clients, db: asyncpg.Connection
) -> None:
    args = dict(gravity_score=0.9, emotion_type="joy", entities=["Tea"], embedding=vector(random.Random(4)))
    first = await create(clients, "alice", "once", request_id="req-1", **args)
    retry = await create(clients, "alice", "once", request_id="req-1", **args)
    assert retry == first
    assert (await memory_rows(db, "alice"), await memory_count(db, "alice"), await created_events(db, "alice")) == (1, 1, 1)

    for changed in [dict(content="twice"), dict(gravity_score=0.8), dict(embedding=vector(random.Random(5)))]:
        call = create(clients, "alice", **{"content": "once", "request_id": "req-1", **args, **changed})
        assert (await rpc_error(call)).code() == grpc.StatusCode.ALREADY_EXISTS, changed
    assert await memory_rows(db, "alice") == 1
    # Request ids are per user.
    assert (await create(clients, "bob", "once", request_id="req-1", **args)).memory_id != first.memory_id


@pytest.mark.cluster
async def test_twenty_concurrent_sends_of_one_request_id_create_one_memory(clients: Clients, db: asyncpg.Connection) -> None:
    await existing_user(clients, "alice")
    args = dict(request_id="burst", gravity_score=0.95, emotion_type="joy")
    memories = await asyncio.gather(*(create(clients, "alice", "exactly once", **args) for _ in range(20)))
    assert len({m.memory_id for m in memories}) == 1
    assert await memory_rows(db, "alice") == 1
    assert await memory_count(db, "alice") == 1
    assert await created_events(db, "alice") == 1
    assert await db.fetchval("SELECT count(*) FROM memory_requests WHERE user_id = 'alice'") == 1


async def test_a_retry_after_the_memory_was_deleted_is_not_found(clients: Clients, db: asyncpg.Connection) -> None:
    memory = await create(clients, "alice", "short-lived", request_id="req-gone")
    await delete_call(clients, "alice", memory.memory_id)
    error = await rpc_error(create(clients, "alice", "short-lived", request_id="req-gone"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert await memory_rows(db, "alice") == 0 and await memory_count(db, "alice") == 0



@pytest.mark.cluster
async def test_concurrent_creates_share_commits_and_each_keeps_its_own_outcome(
    clients: Clients, db: asyncpg.Connection
) -> None:
    """Concurrent CreateMemory calls are written in batches (group commit): a
    request_id conflict or a deleted request's NOT_FOUND fails only its own
    call, a retry in the same burst gets the first memory, and every user's
    rows, count and gapless event numbers come out as if one call at a time."""
    users = ["alice", "bob", "carol"]
    for user in users:
        await existing_user(clients, user)
    taken = await create(clients, "alice", "first", request_id="taken")
    gone = await create(clients, "bob", "short-lived", request_id="gone")
    await delete_call(clients, "bob", gone.memory_id)
    rng = random.Random(12)
    calls = [create(clients, user, f"burst {i}", gravity_score=0.9, emotion_type="joy", embedding=vector(rng))
             for i in range(12) for user in users]
    calls += [create(clients, "alice", "second", request_id="taken"),  # other arguments: ALREADY_EXISTS
              create(clients, "alice", "first", request_id="taken"),  # a retry: the first memory
              create(clients, "bob", "short-lived", request_id="gone")]  # its memory was deleted: NOT_FOUND
    *created, conflict, retry, deleted = await asyncio.gather(*calls, return_exceptions=True)

    assert all(isinstance(m, pb.Memory) for m in created), created
    assert isinstance(conflict, grpc.aio.AioRpcError) and conflict.code() == grpc.StatusCode.ALREADY_EXISTS
    assert retry == taken
    assert isinstance(deleted, grpc.aio.AioRpcError) and deleted.code() == grpc.StatusCode.NOT_FOUND
    # Written in shared transactions, not one each.
    transactions = await db.fetchval("SELECT count(DISTINCT xmin::text) FROM memories WHERE content LIKE 'burst %'")
    assert transactions < len(created)
    for user in users:
        expected = 12 + (user == "alice")
        assert await memory_rows(db, user) == expected and await memory_count(db, user) == expected
        seqs = await db.fetchval("SELECT array_agg(seq ORDER BY seq) FROM memory_events WHERE user_id = $1", user)
        assert seqs == list(range(1, len(seqs) + 1))


# --- arcs -----------------------------------------------------------------------


async def test_the_third_qualifying_memory_forms_an_arc_and_the_fifth_makes_it_active(
    clients: Clients, db: asyncpg.Connection
) -> None:
    first = [await create(clients, "alice", gravity_score=g, emotion_type="joy") for g in (0.9, 0.8)]
    # Not qualifying: too weak, another emotion, no emotion.
    await create(clients, "alice", gravity_score=0.79, emotion_type="joy")
    await create(clients, "alice", gravity_score=0.95, emotion_type="grief")
    await create(clients, "alice", gravity_score=0.95)
    assert list((await list_arcs(clients, "alice")).arcs) == []

    members = [*first, await create(clients, "alice", gravity_score=0.85, emotion_type="joy")]
    arcs = list((await list_arcs(clients, "alice")).arcs)
    assert len(arcs) == 1
    arc = arcs[0]
    assert (arc.user_id, arc.emotion_type, arc.evolution_stage) == ("alice", "joy", FORMING)
    assert list(arc.memory_ids) == [m.memory_id for m in members]  # oldest first
    assert arc.gravity_center == pytest.approx(statistics.mean([0.9, 0.8, 0.85]))
    assert await open_arcs(db, "alice") == {"joy": {m.memory_id for m in members}}

    members.append(await create(clients, "alice", gravity_score=1.0, emotion_type="joy"))
    (arc,) = (await list_arcs(clients, "alice")).arcs
    assert (arc.evolution_stage, len(arc.memory_ids)) == (FORMING, 4)

    members.append(await create(clients, "alice", gravity_score=0.8, emotion_type="joy"))
    (arc,) = (await list_arcs(clients, "alice")).arcs
    assert arc.evolution_stage == ACTIVE
    assert list(arc.memory_ids) == [m.memory_id for m in members]
    assert arc.gravity_center == pytest.approx(statistics.mean(m.gravity_score for m in members))
    assert await db.fetchval("SELECT count(*) FROM memory_arcs") == 1


async def test_memories_older_than_24_hours_do_not_count_towards_an_arc(clients: Clients, db: asyncpg.Connection) -> None:
    old = [await create(clients, "alice", gravity_score=0.9, emotion_type="awe") for _ in range(2)]
    await backdate(db, [m.memory_id for m in old], "25 hours")
    recent = [await create(clients, "alice", gravity_score=0.9, emotion_type="awe")]
    assert list((await list_arcs(clients, "alice")).arcs) == []
    recent.append(await create(clients, "alice", gravity_score=0.9, emotion_type="awe"))
    assert list((await list_arcs(clients, "alice")).arcs) == []
    recent.append(await create(clients, "alice", gravity_score=0.9, emotion_type="awe"))
    (arc,) = (await list_arcs(clients, "alice")).arcs
    assert list(arc.memory_ids) == [m.memory_id for m in recent]
    assert await open_arcs(db, "alice") == {"awe": {m.memory_id for m in recent}}


async def test_an_update_that_makes_a_memory_qualify_forms_the_arc(clients: Clients, db: asyncpg.Connection) -> None:
    strong = [await create(clients, "alice", gravity_score=0.9, emotion_type="joy") for _ in range(2)]
    weak = await create(clients, "alice", gravity_score=0.5, emotion_type="calm")
    assert list((await list_arcs(clients, "alice")).arcs) == []
    weak.gravity_score, weak.emotion_type = 0.8, "joy"
    await update(clients, weak, ["gravity_score", "emotion_type"])
    (arc,) = (await list_arcs(clients, "alice")).arcs
    assert (arc.emotion_type, arc.evolution_stage) == ("joy", FORMING)
    assert list(arc.memory_ids) == [m.memory_id for m in [*strong, weak]]
    assert await open_arcs(db, "alice") == {"joy": {m.memory_id for m in [*strong, weak]}}


@pytest.mark.cluster
async def test_concurrent_strong_inserts_form_exactly_one_arc_with_every_member(
    clients: Clients, db: asyncpg.Connection
) -> None:
    await existing_user(clients, "alice")
    memories = await asyncio.gather(
        *(create(clients, "alice", f"wave {i}", gravity_score=0.8 + i / 100, emotion_type="joy") for i in range(20))
    )
    ids = {m.memory_id for m in memories}
    assert await open_arcs(db, "alice") == {"joy": ids}
    assert await db.fetchval("SELECT count(*) FROM memory_arcs") == 1
    assert await db.fetchval("SELECT count(*) FROM memory_arc_members") == 20
    assert await db.fetchval(
        "SELECT count(*) FROM memory_events WHERE user_id = 'alice' AND topic = 'arc' AND change = 'created'"
    ) == 1
    (arc,) = (await list_arcs(clients, "alice")).arcs
    assert arc.evolution_stage == ACTIVE and set(arc.memory_ids) == ids and len(arc.memory_ids) == 20
    assert arc.gravity_center == pytest.approx(statistics.mean(m.gravity_score for m in memories))
    # The unique index backs the promise: a second open arc of the emotion cannot exist.
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(
            "INSERT INTO memory_arcs (user_id, arc_name, emotion_type, gravity_center) VALUES ('alice', 'dup', 'joy', 0.9)"
        )


async def test_concurrent_inserts_of_several_emotions_form_one_arc_per_emotion(
    clients: Clients, db: asyncpg.Connection
) -> None:
    emotions = ["joy", "grief", "awe", "fear"]
    plan = [(emotion, i) for emotion in emotions for i in range(6)]
    random.Random(6).shuffle(plan)
    await existing_user(clients, "alice")
    memories = await asyncio.gather(
        *(create(clients, "alice", f"{e} {i}", gravity_score=0.9, emotion_type=e) for e, i in plan),
        *(create(clients, "bob", f"bob {i}", gravity_score=0.9, emotion_type="joy") for i in range(4)),
    )
    expected = {e: {m.memory_id for m in memories if m.user_id == "alice" and m.emotion_type == e} for e in emotions}
    assert await open_arcs(db, "alice") == expected
    assert await open_arcs(db, "bob") == {"joy": {m.memory_id for m in memories if m.user_id == "bob"}}
    arcs = (await list_arcs(clients, "alice")).arcs
    assert sorted(a.emotion_type for a in arcs) == sorted(emotions)
    assert all(a.evolution_stage == ACTIVE and len(a.memory_ids) == 6 for a in arcs)


async def test_delete_removes_the_memorys_arc_membership(clients: Clients, db: asyncpg.Connection) -> None:
    members = [await create(clients, "alice", gravity_score=g, emotion_type="joy") for g in (0.8, 0.9, 1.0, 0.9)]
    await delete_call(clients, "alice", members[2].memory_id)
    (arc,) = (await list_arcs(clients, "alice")).arcs
    kept = [members[0], members[1], members[3]]
    assert list(arc.memory_ids) == [m.memory_id for m in kept]
    assert arc.gravity_center == pytest.approx(statistics.mean(m.gravity_score for m in kept))
    assert await open_arcs(db, "alice") == {"joy": {m.memory_id for m in kept}}
    assert await db.fetchval("SELECT count(*) FROM memory_arc_members WHERE memory_id = $1::uuid", members[2].memory_id) == 0


async def test_list_arcs_is_newest_first_and_pages(clients: Clients) -> None:
    for emotion in ["joy", "grief", "awe"]:
        for _ in range(3):
            await create(clients, "alice", gravity_score=0.9, emotion_type=emotion)
    pages = await all_pages(
        lambda token: list_arcs(clients, "alice", page_size=2, page_token=token),
        lambda page: [a.emotion_type for a in page.arcs],
    )
    assert pages == [["awe", "grief"], ["joy"]]
    assert list((await list_arcs(clients, "bob")).arcs) == []
    token = (await list_arcs(clients, "alice", page_size=1)).next_page_token
    error = await rpc_error(list_arcs(clients, "bob", page_token=token))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_fields(error) == ["page_token"]


# --- ListMemories ---------------------------------------------------------------


async def test_list_memories_filters(clients: Clients, db: asyncpg.Connection) -> None:
    specs = {
        "a": dict(gravity_score=0.2, emotion_type="joy", thread_id="t1", session_id="s1", meta_tags=["work"]),
        "b": dict(gravity_score=0.75, emotion_type="sad", thread_id="t2", session_id="s1", meta_tags=["home", "work"]),
        "c": dict(gravity_score=0.9, emotion_type="joy", thread_id="t1", session_id="s2"),
        "d": dict(gravity_score=0.5, session_id="s2", meta_tags=["misc"]),
        "e": dict(gravity_score=0.95, emotion_type="calm", thread_id="t2", meta_tags=["home"]),
    }
    created = {name: await create(clients, "alice", name, **spec) for name, spec in specs.items()}
    ids = {name: memory.memory_id for name, memory in created.items()}
    await create(clients, "bob", "not alice's", gravity_score=0.95, emotion_type="joy", thread_id="t1", meta_tags=["home"])
    await backdate(db, [ids["e"]], "2 days")
    hour_ago = await db.fetchval("SELECT now() - interval '1 hour'")

    def names(*wanted: str) -> list[str]:
        return [ids[n] for n in "dcbae" if n in wanted]  # newest first: e is the oldest

    cases = [
        (dict(), names(*"abcde")),
        (dict(since=timestamp(hour_ago)), names(*"abcd")),
        (dict(since=created["c"].create_time), names(*"cd")),  # at or after
        (dict(min_gravity=0.75), names(*"bce")),
        (dict(emotion_type="joy"), names(*"ac")),
        (dict(thread_id="t1"), names(*"ac")),
        (dict(session_id="s1"), names(*"ab")),
        (dict(tags_any=["home", "misc"]), names(*"bde")),
        (dict(tags_any=["high_gravity"]), names(*"ce")),
        (dict(identity_anchor_only=True), names(*"ce")),
        (dict(min_gravity=0.7, thread_id="t2"), names(*"be")),
        (dict(since=timestamp(hour_ago), tags_any=["work"], session_id="s1", emotion_type="sad"), names("b")),
        (dict(emotion_type="fear"), []),
    ]
    for filters, expected in cases:
        assert await list_ids(clients, "alice", **filters) == expected, filters


async def test_list_memories_is_newest_first(clients: Clients) -> None:
    created = [await create(clients, "alice", f"m{i}") for i in range(7)]
    response = await list_page(clients, "alice", metadata=auth("alice"))
    assert [m.memory_id for m in response.memories] == [m.memory_id for m in reversed(created)]
    assert list(response.memories) == list(reversed(created))
    assert ordered_newest_first(list(response.memories)) and response.next_page_token == ""


async def test_the_seed_query_last_7_days_gravity_at_least_07_newest_50(clients: Clients, db: asyncpg.Connection) -> None:
    """Interleaved: 49 recent qualifying (0.7 and 0.9), 2 qualifying backdated
    to 6 days ago, 2 strong backdated to 8 days ago, 7 weak (0.69 and 0.1):
    51 qualify, so the newest 50 leave out the oldest 6-day one."""
    qualifying, six_days, eight_days = [], [], []
    for i in range(60):
        if i in (3, 17):
            six_days.append(await create(clients, "alice", f"six days {i}", gravity_score=0.8))
        elif i in (5, 30):
            eight_days.append(await create(clients, "alice", f"eight days {i}", gravity_score=0.99))
        elif i % 9 == 4:
            await create(clients, "alice", f"weak {i}", gravity_score=0.69 if i % 2 else 0.1)
        else:
            qualifying.append(await create(clients, "alice", f"strong {i}", gravity_score=0.7 if i % 2 else 0.9))
    assert len(qualifying) == 49
    await backdate(db, [six_days[0].memory_id], "6 days 1 hour")
    await backdate(db, [six_days[1].memory_id], "6 days")
    await backdate(db, [m.memory_id for m in eight_days], "8 days")
    week_ago = await db.fetchval("SELECT now() - interval '7 days'")

    request = dict(since=timestamp(week_ago), min_gravity=0.7, page_size=50)
    page = await list_page(clients, "alice", **request)
    # Newest first: the recent ones by creation, then the two from 6 days ago (the older one cut).
    expected = [m.memory_id for m in reversed(qualifying)] + [six_days[1].memory_id, six_days[0].memory_id]
    assert [m.memory_id for m in page.memories] == expected[:50]
    assert page.next_page_token
    rest = await list_page(clients, "alice", page_token=page.next_page_token, **request)
    assert [m.memory_id for m in rest.memories] == expected[50:] == [six_days[0].memory_id]
    assert rest.next_page_token == ""


@pytest.mark.cluster
async def test_pagination_returns_every_memory_once_while_memories_arrive(clients: Clients) -> None:
    originals = {(await create(clients, "alice", f"m{i}")).memory_id for i in range(23)}
    arrived, seen, page_token = set(), [], ""
    while True:
        response = await list_page(clients, "alice", page_size=4, page_token=page_token)
        seen.extend(response.memories)
        for i in range(2):
            arrived.add((await create(clients, "alice", f"late {len(seen)} {i}")).memory_id)
        page_token = response.next_page_token
        if not page_token:
            break
    counts = Counter(m.memory_id for m in seen)
    assert all(counts[memory_id] == 1 for memory_id in originals), "a memory was skipped or repeated"
    assert set(counts) <= originals | arrived and max(counts.values()) == 1
    assert ordered_newest_first(seen)


async def test_a_page_token_of_another_users_list_is_invalid(clients: Clients) -> None:
    for i in range(3):
        await create(clients, "alice", f"m{i}")
        await create(clients, "bob", f"m{i}")
    token = (await list_page(clients, "alice", page_size=1)).next_page_token
    assert token
    error = await rpc_error(list_page(clients, "bob", page_size=1, page_token=token))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_fields(error) == ["page_token"]
    error = await rpc_error(list_page(clients, "alice", page_token=token[:-2] + ("AA" if token[-2:] != "AA" else "BB")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- counters -------------------------------------------------------------------


async def test_memory_count_equals_the_users_rows_after_a_create_delete_storm(
    clients: Clients, db: asyncpg.Connection
) -> None:
    users = ["alice", "bob"]
    initial = {u: [(await create(clients, u, f"seed {i}")).memory_id for i in range(12)] for u in users}
    calls = []
    for user in users:
        calls += [create(clients, user, f"storm {i}", gravity_score=0.9, emotion_type="joy") for i in range(15)]
        calls += [delete_call(clients, user, memory_id) for memory_id in initial[user] for _ in range(2)]
    random.Random(7).shuffle(calls)
    results = await asyncio.gather(*calls, return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(f, grpc.aio.AioRpcError) and f.code() == grpc.StatusCode.NOT_FOUND for f in failures)
    assert len(failures) == sum(len(ids) for ids in initial.values())  # each id deleted exactly once
    for user in users:
        rows = await memory_rows(db, user)
        assert rows == 15
        assert await memory_count(db, user) == rows
