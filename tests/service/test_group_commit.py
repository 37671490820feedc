"""Group commit (with reaction writes): concurrent calls share database calls,
yet each keeps the semantics of a call of its own."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import asyncpg
import pytest

from nexus import errors, queries
from nexus.database import Database, call_deadline
from nexus.group_commit import GroupCommit
from nexus.queries import Query

pytestmark = pytest.mark.cluster

DatabaseT = TypeVar("DatabaseT", bound=Database)


class CountingDatabase(Database):
    """The real database, counting the calls made through it."""

    calls = 0

    async def fetch(self, query: Query, *args: Any) -> list[asyncpg.Record]:
        self.calls += 1
        return await super().fetch(query, *args)


async def open_database(kind: type[DatabaseT], db_url: str) -> DatabaseT:
    return await kind.open(db_url, min_size=1, max_size=4, statement_timeout_ms=30_000, slow_warn_ms=500, slow_error_ms=1000)


@pytest.fixture
async def counting_db(db_url: str) -> Any:
    database = await open_database(CountingDatabase, db_url)
    yield database
    await database.close()


def reaction_writer(db: Database, max_in_flight: int) -> GroupCommit:
    return GroupCommit(db, queries.APPLY_REACTIONS, max_in_flight=max_in_flight)


async def apply(writer: GroupCommit, op: str, kind: str, user: str, entry: uuid.UUID) -> Any:
    """The outcome of one reaction write."""
    (row,) = await writer.submit((entry,), (entry,), entry, op, kind, user)
    return row["outcome"]


async def create_entry(db: asyncpg.Connection, author: str, privacy: str = "public") -> uuid.UUID:
    row = await db.fetchrow(
        "SELECT entry_id FROM create_entry($1, NULL, 'post', '', '', $2, '{}', '{}', NULL)", author, privacy
    )
    return row["entry_id"]


async def test_concurrent_writes_share_calls_and_keep_per_user_order(
    counting_db: CountingDatabase, db: asyncpg.Connection
) -> None:
    entry = await create_entry(db, "alice")
    writer = reaction_writer(counting_db, max_in_flight=2)
    users = [f"user-{i % 50}" for i in range(400)]  # each user toggles 8 times, interleaved
    outcomes = await asyncio.gather(*(apply(writer, "toggle", "resonance", user, entry) for user in users))

    assert counting_db.calls < len(users) / 4, "concurrent writes were not coalesced"
    for user in set(users):
        states = [o["state"] for o, u in zip(outcomes, users, strict=True) if u == user]
        assert states == [True, False] * 4, f"{user}'s toggles did not apply in arrival order"
    rows = await db.fetchval("SELECT count(*) FROM reactions WHERE entry_id = $1", entry)
    assert rows == 0
    assert await db.fetchval("SELECT count(*) FROM reconcile_entry_counters(false)") == 0


class BatchRecordingDatabase(Database):
    """The real database, recording the entries of each batch sent."""

    batches: list[list[uuid.UUID]]

    async def fetch(self, query: Query, *args: Any) -> list[asyncpg.Record]:
        self.batches.append(list(args[1]))
        return await super().fetch(query, *args)


async def test_writes_of_many_keys_share_calls_that_reach_one_worker(db_url: str, db: asyncpg.Connection) -> None:
    """On one node a batch carries many entries (a uniform load still shares
    round trips and commits); on Citus each batch is one entry's, delegated to
    its worker. Either way every outcome is its own and the counters exact."""
    recording = await open_database(BatchRecordingDatabase, db_url)
    recording.batches = []
    try:
        entries = [await create_entry(db, "alice") for _ in range(40)]
        writer = reaction_writer(recording, max_in_flight=2)
        targets = [entries[i % 40] for i in range(320)]  # each entry liked by 8 users, interleaved
        outcomes = await asyncio.gather(*(apply(writer, "on", "resonance", f"fan-{i}", e) for i, e in enumerate(targets)))
    finally:
        await recording.close()
    if recording.distributed:
        assert all(len(set(batch)) == 1 for batch in recording.batches), "a batch on the cluster held two entries"
    else:
        assert len(recording.batches) < len(entries), "writes of different entries were not coalesced"
        assert any(len(set(batch)) > 1 for batch in recording.batches)
    for entry in entries:
        counts = [o["resonance_count"] for o, e in zip(outcomes, targets, strict=True) if e == entry]
        assert counts == list(range(1, 9)), "one key's writes must apply in arrival order"
    assert await db.fetchval("SELECT count(*) FROM reconcile_entry_counters(false)") == 0


async def test_each_outcome_counts_its_own_change(counting_db: CountingDatabase, db: asyncpg.Connection) -> None:
    entry = await create_entry(db, "alice")
    writer = reaction_writer(counting_db, max_in_flight=1)
    outcomes = await asyncio.gather(*(apply(writer, "on", "resonance", f"fan-{i}", entry) for i in range(100)))
    # Applied one after another in arrival order, so the n-th sees n likes.
    assert [o["resonance_count"] for o in outcomes] == list(range(1, 101))
    assert all(o["changed"] for o in outcomes)


async def test_a_missing_entry_fails_only_its_own_item(counting_db: CountingDatabase, db: asyncpg.Connection) -> None:
    public = await create_entry(db, "alice")
    private = await create_entry(db, "alice", "private")
    writer = reaction_writer(counting_db, max_in_flight=1)
    targets = [public, uuid.uuid4(), private, public]
    results = await asyncio.gather(
        *(apply(writer, "on", "amplification", "bob", target) for target in targets), return_exceptions=True
    )
    for missing, target in zip(results[1:3], targets[1:3], strict=True):
        assert isinstance(missing, errors.NotFound)
        assert (missing.message, missing.field) == (f"entry {target} not found", "entry_id")
    assert results[0]["changed"] and not results[3]["changed"]
    assert await db.fetchval("SELECT count(*) FROM reactions") == 1
    assert await db.fetchval("SELECT count(*) FROM entry_counter_shards WHERE entry_id = $1", private) == 0


class OverlapRecordingDatabase(Database):
    """The real database, recording which entries the batches in flight write."""

    in_flight: list[set[uuid.UUID]]
    overlaps = 0

    async def fetch(self, query: Query, *args: Any) -> list[asyncpg.Record]:
        entries = set(args[1])  # apply_reactions(route, entry_ids, ops, kinds, user_ids)
        if any(entries & other for other in self.in_flight):
            self.overlaps += 1
        self.in_flight.append(entries)
        try:
            return await super().fetch(query, *args)
        finally:
            self.in_flight.remove(entries)


async def test_batches_in_flight_never_share_a_key(db_url: str, db: asyncpg.Connection) -> None:
    recording = await open_database(OverlapRecordingDatabase, db_url)
    recording.in_flight = []
    try:
        hot = await create_entry(db, "alice")
        quiet = [await create_entry(db, "alice") for _ in range(20)]
        writer = reaction_writer(recording, max_in_flight=4)
        targets = [hot if i % 2 else quiet[i % 20] for i in range(600)]
        outcomes = await asyncio.gather(*(apply(writer, "on", "resonance", f"fan-{i}", e) for i, e in enumerate(targets)))
    finally:
        await recording.close()
    assert recording.overlaps == 0
    hot_counts = [o["resonance_count"] for o, e in zip(outcomes, targets, strict=True) if e == hot]
    assert hot_counts == list(range(1, 301)), "one key's writes must apply in arrival order"
    assert await db.fetchval("SELECT count(*) FROM reconcile_entry_counters(false)") == 0


@contextlib.asynccontextmanager
async def counter_shards_held(db_url: str, entry: uuid.UUID) -> AsyncIterator[asyncpg.Connection]:
    """A connection whose open transaction holds every counter shard of
    ``entry``: reaction writes to it wait until that transaction ends."""
    blocker = await asyncpg.connect(db_url)
    try:
        await blocker.execute("BEGIN")
        await blocker.execute(
            "INSERT INTO entry_counter_shards (entry_id, shard) SELECT $1, s FROM generate_series(0, 63) s", entry
        )
        yield blocker
    finally:
        await blocker.close()


BATCH_SEEN_ON_ONE_SERVER = pytest.mark.single_node(
    "finds the batch waiting on a lock in the one server's pg_stat_activity; on the cluster it waits on a worker"
)


async def wait_until_a_batch_waits_on_a_lock(db: asyncpg.Connection) -> None:
    deadline = time.monotonic() + 10
    while not await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%apply_reactions%' AND wait_event_type = 'Lock'"
    ):
        assert time.monotonic() < deadline, "no batch reached the database"
        await asyncio.sleep(0.01)


async def apply_within(writer: GroupCommit, seconds: float, op: str, user: str, entry: uuid.UUID) -> Any:
    """``apply`` by a caller whose deadline is ``seconds`` away."""
    call_deadline.set(time.monotonic() + seconds)
    return await apply(writer, op, "resonance", user, entry)


async def reactors(db: asyncpg.Connection, entry: uuid.UUID) -> set[str]:
    return {r["user_id"] for r in await db.fetch("SELECT user_id FROM reactions WHERE entry_id = $1", entry)}


@BATCH_SEEN_ON_ONE_SERVER
async def test_an_impatient_caller_stops_waiting_without_cutting_short_its_batch(
    counting_db: CountingDatabase, db: asyncpg.Connection, db_url: str
) -> None:
    """Two callers in one batch: the first's deadline passes while the batch
    waits on a lock. It gets DEADLINE_EXCEEDED (outcome unknown); the batch
    is not cut short, so the patient caller's reply is the committed state."""
    warmup, entry = await create_entry(db, "alice"), await create_entry(db, "alice")
    writer = reaction_writer(counting_db, max_in_flight=1)
    async with counter_shards_held(db_url, warmup) as first_blocker, counter_shards_held(db_url, entry) as second_blocker:
        first = asyncio.create_task(apply_within(writer, 30, "toggle", "first", warmup))  # in flight alone
        await wait_until_a_batch_waits_on_a_lock(db)
        impatient = asyncio.create_task(apply_within(writer, 4, "toggle", "impatient", entry))
        patient = asyncio.create_task(apply_within(writer, 30, "toggle", "patient", entry))
        await asyncio.sleep(0)  # both queue behind the first batch
        await first_blocker.execute("ROLLBACK")
        await first
        with pytest.raises(errors.DeadlineExceeded, match="outcome is unknown"):
            await impatient
        await second_blocker.execute("ROLLBACK")
        outcome = await patient
    assert counting_db.calls == 2, "impatient and patient were to share the second batch, sent once"
    # The impatient caller's write was sent and its batch committed: unknown to it, applied once.
    assert await reactors(db, entry) == {"impatient", "patient"}
    assert outcome["state"] and outcome["resonance_count"] == 2


@BATCH_SEEN_ON_ONE_SERVER
async def test_a_caller_whose_deadline_passes_before_its_batch_is_sent_writes_nothing(
    counting_db: CountingDatabase, db: asyncpg.Connection, db_url: str
) -> None:
    entry = await create_entry(db, "alice")
    writer = reaction_writer(counting_db, max_in_flight=1)
    async with counter_shards_held(db_url, entry) as blocker:
        first = asyncio.create_task(apply_within(writer, 30, "on", "first", entry))
        await wait_until_a_batch_waits_on_a_lock(db)
        with pytest.raises(errors.DeadlineExceeded, match="nothing was written"):
            await apply_within(writer, 0.3, "on", "queued", entry)
        await blocker.execute("ROLLBACK")
        await first
    assert counting_db.calls == 1, "an item whose caller had gone was sent"
    assert await reactors(db, entry) == {"first"}


@BATCH_SEEN_ON_ONE_SERVER
async def test_a_batch_cut_off_by_a_lost_connection_fails_its_items_and_is_not_resent(
    counting_db: CountingDatabase, db: asyncpg.Connection, db_url: str
) -> None:
    entry = await create_entry(db, "alice")
    writer = reaction_writer(counting_db, max_in_flight=1)
    async with counter_shards_held(db_url, entry) as blocker:
        cut_off = asyncio.create_task(apply(writer, "toggle", "resonance", "cut-off", entry))
        await wait_until_a_batch_waits_on_a_lock(db)
        await db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%apply_reactions%' "
            "AND wait_event_type = 'Lock'"
        )
        with pytest.raises(errors.Unavailable):
            await cut_off
        await blocker.execute("ROLLBACK")
        after = await apply(writer, "toggle", "resonance", "after", entry)
    assert counting_db.calls == 2, "the failed batch was sent again"
    assert await reactors(db, entry) == {"after"} and after["resonance_count"] == 1
