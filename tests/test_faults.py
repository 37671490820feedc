"""Writes while the database stalls or crashes: every process of the test's
PostgreSQL stopped (SIGSTOP) while calls with mixed deadlines arrive, then
resumed (SIGCONT); a backend killed (SIGKILL, so PostgreSQL restarts every
session and recovers) in the middle of a storm of writes.

The promise under test: an acknowledged reply is never wrong and nothing is
applied twice. A call that ends DEADLINE_EXCEEDED or UNAVAILABLE has an
unknown outcome (its write may have committed); a call that ends OK must
describe the state the database ends in.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import grpc
import psutil
import pytest

from nexus.v1 import interaction_pb2 as pb
from nexus.v1 import memory_pb2, token_pb2

from support import SERVICE, Clients, auth

# The stalls and kills signal the one server's processes; a cluster's faults are other ones.
pytestmark = pytest.mark.single_node("signals the processes of the one PostgreSQL server")

# Rounds per test: each stalls the database once. NEXUS_TEST_STALL_ROUNDS raises it for a longer hunt.
ROUNDS = int(os.environ.get("NEXUS_TEST_STALL_ROUNDS", "4"))
CALLS_PER_ROUND = 25
STALL_S = 2.5
SHORT_DEADLINE_S, LONG_DEADLINE_S = 1.0, 20.0
OUTCOME_UNKNOWN = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE}


async def postgres_processes(db: asyncpg.Connection) -> list[psutil.Process]:
    """The postmaster serving ``db`` and all its children (backends, background workers)."""
    backend = psutil.Process(await db.fetchval("SELECT pg_backend_pid()"))
    postmaster = backend.parent()
    if postmaster is None:
        pytest.skip("cannot find the postmaster of the test database")
    return [postmaster, *postmaster.children()]


@contextlib.asynccontextmanager
async def stalled_database(db: asyncpg.Connection) -> AsyncIterator[None]:
    """Every PostgreSQL process stopped for the block's duration (resumed even if it fails)."""
    try:
        processes = await postgres_processes(db)
    except psutil.AccessDenied:
        pytest.skip("the test database runs as another user: cannot stop its processes")
    for process in processes:
        process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGCONT)


def deadline_of(call: int) -> float:
    return SHORT_DEADLINE_S if call % 2 == 0 else LONG_DEADLINE_S


async def replies_during_stall(db: asyncpg.Connection, calls: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Starts ``calls`` (factories of awaitables) with the database stopped and
    resumes it after STALL_S; returns each call's reply or RpcError."""
    async with stalled_database(db):
        tasks = [asyncio.ensure_future(call()) for call in calls]
        await asyncio.wait(tasks, timeout=STALL_S)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, grpc.aio.AioRpcError):
            raise result
    return results


async def test_acknowledged_toggles_are_applied_exactly_once_across_a_stall(
    clients: Clients, db: asyncpg.Connection
) -> None:
    stub = clients.interactions
    for round_number in range(ROUNDS):
        users = [f"stall-{round_number}-{i}" for i in range(CALLS_PER_ROUND)]
        entries = []
        for user in users:
            request = pb.CreateEntryRequest(author_id=user, type="post", title="t", content="c")
            entries.append((await stub.CreateEntry(request, metadata=auth(user), timeout=10)).entry.entry_id)

        def toggle(user: str, entry_id: str, call: int) -> Callable[[], Awaitable[pb.ToggleResonanceResponse]]:
            request = pb.ToggleResonanceRequest(user_id=user, entry_id=entry_id)
            return lambda: stub.ToggleResonance(request, metadata=auth(user), timeout=deadline_of(call))

        calls = [toggle(users[call], entries[call], call) for call in range(CALLS_PER_ROUND)]
        results = await replies_during_stall(db, calls)

        for call, result in enumerate(results):
            row = await db.fetchval(
                "SELECT count(*) FROM reactions WHERE user_id = $1 AND entry_id = $2 AND kind = 'resonance'",
                users[call], uuid.UUID(entries[call]),
            )
            if isinstance(result, grpc.aio.AioRpcError):
                assert result.code() in OUTCOME_UNKNOWN, f"call {call}: {result.code()} {result.details()}"
                assert deadline_of(call) == SHORT_DEADLINE_S, f"call {call} outlived a stall shorter than its deadline"
                continue
            # One toggle of a pair nobody else touched: on, counted once, and so in the database.
            assert (result.resonated, result.counts.resonance_count) == (True, 1), (
                f"round {round_number} call {call} (deadline {deadline_of(call)} s) acknowledged "
                f"resonated={result.resonated} count={result.counts.resonance_count}"
            )
            assert row == 1, f"round {round_number} call {call} acknowledged a resonance the database lacks"
    assert await db.fetchval("SELECT count(*) FROM reconcile_entry_counters(false)") == 0


async def test_acknowledged_credits_are_in_the_ledger_exactly_once_across_a_stall(
    clients: Clients, db: asyncpg.Connection
) -> None:
    stub = clients.tokens
    for round_number in range(ROUNDS):
        user = f"payee-{round_number}"

        def credit(user: str, call: int) -> Callable[[], Awaitable[token_pb2.CreditResponse]]:
            request = token_pb2.CreditRequest(user_id=user, amount=call + 1, reason="stall", request_id=f"r{call}")
            return lambda: stub.Credit(request, metadata=SERVICE, timeout=deadline_of(call))

        results = await replies_during_stall(db, [credit(user, call) for call in range(CALLS_PER_ROUND)])

        ledger = {
            row["request_id"]: row["amount"]
            for row in await db.fetch("SELECT request_id, amount FROM token_transactions WHERE user_id = $1", user)
        }
        assert await db.fetchval(
            "SELECT count(*) FROM token_transactions WHERE user_id = $1", user
        ) == len(ledger), "a request was applied twice"
        for call, result in enumerate(results):
            if isinstance(result, grpc.aio.AioRpcError):
                assert result.code() in OUTCOME_UNKNOWN, f"call {call}: {result.code()} {result.details()}"
                continue
            assert ledger.get(f"r{call}") == call + 1, f"call {call} was acknowledged but is not in the ledger"
        assert await db.fetchval("SELECT balance FROM balances WHERE user_id = $1", user) == sum(ledger.values())
    assert await db.fetchval("SELECT count(*) FROM reconcile_balances(false)") == 0


async def test_acknowledged_memories_are_stored_once_with_exact_search_statistics_across_a_stall(
    clients: Clients, db: asyncpg.Connection
) -> None:
    """CreateMemory (group commit, the search-statistics trigger) across a stall:
    an acknowledged create is stored once as acknowledged, retries of every
    request_id afterwards add nothing twice, and the user's count, length total
    and posting rows equal a recount of the memories."""
    stub = clients.memories
    for round_number in range(ROUNDS):
        user = f"rememberer-{round_number}"

        def create(user: str, call: int, deadline_s: float) -> Callable[[], Awaitable[memory_pb2.CreateMemoryResponse]]:
            request = memory_pb2.CreateMemoryRequest(
                user_id=user, content=f"stalled note {call} " + "word " * (call % 5), gravity_score=0.5,
                request_id=f"m{call}",
            )
            return lambda: stub.CreateMemory(request, metadata=auth(user), timeout=deadline_s)

        results = await replies_during_stall(db, [create(user, call, deadline_of(call)) for call in range(CALLS_PER_ROUND)])
        stored = {row["content"]: str(row["memory_id"])
                  for row in await db.fetch("SELECT content, memory_id FROM memories WHERE user_id = $1", user)}
        for call, result in enumerate(results):
            if isinstance(result, grpc.aio.AioRpcError):
                assert result.code() in OUTCOME_UNKNOWN, f"call {call}: {result.code()} {result.details()}"
                continue
            assert stored.get(result.memory.content) == result.memory.memory_id, f"call {call} acknowledged, not stored"

        retried = await asyncio.gather(*(create(user, call, LONG_DEADLINE_S)() for call in range(CALLS_PER_ROUND)))
        for call, result in enumerate(results):
            if not isinstance(result, grpc.aio.AioRpcError):
                assert retried[call].memory.memory_id == result.memory.memory_id, f"call {call}'s retry is another memory"
        assert await db.fetchval("SELECT count(*) FROM memories WHERE user_id = $1", user) == CALLS_PER_ROUND
        kept = await db.fetchrow(
            """SELECT u.memory_count, u.search_length_total,
                      (SELECT count(*) FROM memory_terms WHERE user_id = $1) AS term_rows
               FROM memory_users u WHERE u.user_id = $1""",
            user,
        )
        recounted = await db.fetchrow(
            """SELECT count(*) AS memory_count, sum(search_length) AS search_length_total,
                      sum(length(search_vector)) AS term_rows
               FROM memories WHERE user_id = $1""",
            user,
        )
        assert dict(kept) == dict(recounted), f"round {round_number}: kept {dict(kept)} != recounted {dict(recounted)}"


async def test_a_statement_ends_in_the_server_at_its_deadline_even_when_no_cancel_can_arrive(
    clients: Clients, db: asyncpg.Connection, db_url: str
) -> None:
    """With the postmaster stopped, the cancel request sent at the deadline
    cannot get through; the session's statement_timeout (set from the call's
    remaining time) still ends the statement, instead of the 30 s ceiling."""
    author = "lock-holder"
    request = pb.CreateEntryRequest(author_id=author, type="post", title="t", content="c")
    entry_id = (await clients.interactions.CreateEntry(request, metadata=auth(author), timeout=10)).entry.entry_id
    blocker = await asyncpg.connect(db_url)
    (postmaster, *_) = await postgres_processes(db)
    try:
        await blocker.execute("BEGIN")
        await blocker.execute(
            "INSERT INTO reactions (user_id, entry_id, kind) VALUES ('bob', $1, 'resonance')", uuid.UUID(entry_id)
        )
        postmaster.send_signal(signal.SIGSTOP)
        toggle = pb.ToggleResonanceRequest(user_id="bob", entry_id=entry_id)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await clients.interactions.ToggleResonance(toggle, metadata=auth("bob"), timeout=1.0)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = asyncio.get_running_loop().time() + 5
        while await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%apply_reactions%' AND state = 'active' "
            "AND pid <> pg_backend_pid()"
        ):
            assert asyncio.get_running_loop().time() < deadline, "the statement outlived its deadline by 5 s"
            await asyncio.sleep(0.05)
    finally:
        postmaster.send_signal(signal.SIGCONT)
        await blocker.close()
    assert await db.fetchval("SELECT count(*) FROM reactions WHERE entry_id = $1", uuid.UUID(entry_id)) == 0


CRASH_STORM_CALLS = 600
CRASH_AFTER_REPLIES = 100


async def connect_when_back(db_url: str, timeout: float = 30) -> asyncpg.Connection:
    """A new connection, once PostgreSQL accepts them again (bounded)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await asyncpg.connect(db_url)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_a_database_crash_mid_storm_loses_no_acknowledged_write_and_the_service_recovers(
    clients: Clients, db: asyncpg.Connection, db_url: str
) -> None:
    stub, tokens = clients.interactions, clients.tokens
    entries = []
    for n in range(10):
        request = pb.CreateEntryRequest(author_id="author", type="post", title=f"t{n}", content="c")
        entries.append((await stub.CreateEntry(request, metadata=auth("author"), timeout=10)).entry.entry_id)

    def write(n: int) -> Awaitable[Any]:
        if n % 4 == 3:
            credit = token_pb2.CreditRequest(user_id=f"payee-{n % 5}", amount=n, reason="storm", request_id=f"r{n}")
            return tokens.Credit(credit, metadata=SERVICE, timeout=15)
        like = pb.SetResonanceRequest(user_id=f"fan-{n}", entry_id=entries[n % 10], resonated=True)
        return stub.SetResonance(like, metadata=auth(f"fan-{n}"), timeout=15)

    replies = 0
    enough_replies = asyncio.Event()
    slots = asyncio.Semaphore(40)

    async def one(n: int) -> Any:
        nonlocal replies
        async with slots:
            try:
                return await write(n)
            except grpc.aio.AioRpcError as error:
                return error
            finally:
                replies += 1
                if replies == CRASH_AFTER_REPLIES:
                    enough_replies.set()

    storm = asyncio.gather(*(one(n) for n in range(CRASH_STORM_CALLS)))
    await asyncio.wait_for(enough_replies.wait(), timeout=30)
    victim = await db.fetchval(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'nexus' AND backend_type = 'client backend' LIMIT 1"
    )
    os.kill(victim, signal.SIGKILL)  # PostgreSQL ends every session and recovers
    results = await asyncio.wait_for(storm, timeout=120)

    failures = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert failures, "the crash happened after the storm: nothing was tested"
    for failure in failures:
        assert failure.code() in OUTCOME_UNKNOWN, f"{failure.code()}: {failure.details()}"

    checker = await connect_when_back(db_url)
    try:
        for n, result in enumerate(results):
            if isinstance(result, grpc.aio.AioRpcError):
                continue
            if n % 4 == 3:
                count = await checker.fetchval(
                    "SELECT count(*) FROM token_transactions WHERE user_id = $1 AND request_id = $2", f"payee-{n % 5}", f"r{n}"
                )
            else:
                count = await checker.fetchval(
                    "SELECT count(*) FROM reactions WHERE user_id = $1 AND entry_id = $2", f"fan-{n}",
                    uuid.UUID(entries[n % 10]),
                )
            assert count == 1, f"write {n} was acknowledged but is not in the database once"
        assert await checker.fetchval("SELECT count(*) FROM reconcile_entry_counters(false)") == 0
        assert await checker.fetchval("SELECT count(*) FROM reconcile_balances(false)") == 0
    finally:
        await checker.close()

    # The service reconnects by itself: a new write succeeds within a bounded wait.
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        try:
            await stub.SetResonance(
                pb.SetResonanceRequest(user_id="after", entry_id=entries[0], resonated=True), metadata=auth("after"), timeout=5
            )
            break
        except grpc.aio.AioRpcError as error:
            assert error.code() in OUTCOME_UNKNOWN, f"{error.code()}: {error.details()}"
            assert asyncio.get_running_loop().time() < deadline, "the service did not recover within 30 s"
            await asyncio.sleep(0.1)
