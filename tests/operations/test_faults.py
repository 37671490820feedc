"""Writes while the database stalls or crashes: every process of the test's
PostgreSQL stopped (SIGSTOP) while calls with mixed deadlines arrive, then
resumed (SIGCONT); backends terminated (pg_terminate_backend), or one killed
(SIGKILL, so PostgreSQL restarts every session and recovers), in the middle
of a storm of writes.

The promise under test: an acknowledged reply is never wrong and nothing is
applied twice. A call that ends DEADLINE_EXCEEDED or UNAVAILABLE has an
unknown outcome (its write may have committed) unless its ErrorInfo says
NOTHING_WRITTEN, which the storms check against the final state; a call that
ends OK must describe the state the database ends in.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psutil
import pytest
from google.rpc import error_details_pb2

from nexus import errors
from nexus.config import Config
from nexus.server import HEALTH_PROBE_INTERVAL_S, HEALTH_PROBE_TIMEOUT_S, NexusServer
from nexus.v1 import interaction_pb2 as pb
from nexus.v1 import memory_pb2, token_pb2

from support.databases import connect_when_back, reaction_lock, wait_until_toggle_blocks
from support.processes import kill_postmaster
from support.rpc import JWT_SECRET, SERVICE, Clients, auth, error_details, rpc_error
from support.servers import NOT_SERVING, SERVING, wait_for_health

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


# --- storms of writes with backends ended mid-call ---------------------------------
#
# Each call of a storm writes a key no other call touches, so the final state
# tells whether it was applied: a toggle of its own (user, entry) pair, a
# credit or a memory with its own request_id, a pending transfer of its own
# created and then posted (applied: posted). Every reply is then checked
# against that state: OK means applied once; an error must be UNAVAILABLE or
# DEADLINE_EXCEEDED, and one whose ErrorInfo says NOTHING_WRITTEN must not
# have been applied (a client that trusted it and toggled again would flip
# the state back).

STORM_CALLS = 450
STORM_CALLS_MAX = 20_000  # a storm goes on past STORM_CALLS until its fault is over
# A restart of the embedded database costs seconds: fewer rounds unless hunting.
POSTMASTER_KILL_ROUNDS = max(1, ROUNDS // 2)
STORM_CONCURRENCY = 40
FAULT_AFTER_REPLIES = 60


class Storm:
    """One storm of ToggleResonance, Credit, CreateMemory and CreatePendingTransfer + PostPendingTransfer
    calls, tagged ``tag``."""

    def __init__(self, clients: Clients, tag: str) -> None:
        self.clients = clients
        self.tag = tag
        self.entries: list[str] = []

    async def prepare(self) -> None:
        author = f"author-{self.tag}"
        for n in range(10):
            request = pb.CreateEntryRequest(author_id=author, type="post", title=f"t{n}", content="c")
            reply = await self.clients.interactions.CreateEntry(request, metadata=auth(author), timeout=10)
            self.entries.append(reply.entry.entry_id)
        for n in range(5):
            credit = token_pb2.CreditRequest(user_id=f"buyer-{self.tag}-{n}", amount=10**15, request_id="fund")
            await self.clients.tokens.Credit(credit, metadata=SERVICE, timeout=10)

    async def reserve_and_post(self, n: int) -> token_pb2.PostPendingTransferResponse:
        buyer = f"buyer-{self.tag}-{n % 5}"
        hold = token_pb2.CreatePendingTransferRequest(
            from_user_id=buyer, to_user_id=f"seller-{self.tag}", amount=n, request_id=f"{self.tag}-h{n}"
        )
        created = await self.clients.tokens.CreatePendingTransfer(hold, metadata=auth(buyer), timeout=15)
        post = token_pb2.PostPendingTransferRequest(
            pending_transfer_id=created.pending_transfer.pending_transfer_id, request_id=f"{self.tag}-p{n}"
        )
        return await self.clients.tokens.PostPendingTransfer(post, metadata=auth(buyer), timeout=15)

    def call(self, n: int) -> Awaitable[Any]:
        if n % 4 == 3:
            return self.reserve_and_post(n)
        if n % 4 == 0:
            user = f"fan-{self.tag}-{n}"
            toggle = pb.ToggleResonanceRequest(user_id=user, entry_id=self.entries[n % 10])
            return self.clients.interactions.ToggleResonance(toggle, metadata=auth(user), timeout=15)
        if n % 4 == 1:
            credit = token_pb2.CreditRequest(
                user_id=f"payee-{self.tag}-{n % 5}", amount=n, reason="storm", request_id=f"{self.tag}-r{n}"
            )
            return self.clients.tokens.Credit(credit, metadata=SERVICE, timeout=15)
        user = f"writer-{self.tag}-{n % 5}"
        memory = memory_pb2.CreateMemoryRequest(
            user_id=user, content=f"storm note {n}", gravity_score=0.5, request_id=f"{self.tag}-m{n}"
        )
        return self.clients.memories.CreateMemory(memory, metadata=auth(user), timeout=15)

    async def applied(self, conn: asyncpg.Connection, n: int) -> bool:
        if n % 4 == 3:
            return await conn.fetchval(
                "SELECT EXISTS (SELECT FROM pending_transfers WHERE request_id = $1 AND status = 'posted')",
                f"{self.tag}-h{n}",
            )
        if n % 4 == 0:
            return await conn.fetchval(
                "SELECT EXISTS (SELECT FROM reactions WHERE user_id = $1 AND entry_id = $2 AND kind = 'resonance')",
                f"fan-{self.tag}-{n}", uuid.UUID(self.entries[n % 10]),
            )
        if n % 4 == 1:
            return await conn.fetchval(
                "SELECT EXISTS (SELECT FROM token_transactions WHERE user_id = $1 AND request_id = $2)",
                f"payee-{self.tag}-{n % 5}", f"{self.tag}-r{n}",
            )
        return await conn.fetchval(
            "SELECT EXISTS (SELECT FROM memory_requests WHERE user_id = $1 AND request_id = $2)",
            f"writer-{self.tag}-{n % 5}", f"{self.tag}-m{n}",
        )

    async def run(self, fault: Callable[[], Awaitable[None]], db_url: str) -> None:
        """Runs the storm: calls, STORM_CONCURRENCY at a time, until STORM_CALLS
        have been made and ``fault`` (started once FAULT_AFTER_REPLIES calls have
        replied) is over; then checks every reply against the database at ``db_url``."""
        results: dict[int, Any] = {}
        enough_replies = asyncio.Event()
        fault_over = asyncio.Event()
        made = 0

        async def caller() -> None:
            nonlocal made
            while made < STORM_CALLS or not fault_over.is_set():
                assert made < STORM_CALLS_MAX, f"the fault was not over after {STORM_CALLS_MAX} calls"
                n, made = made, made + 1
                try:
                    results[n] = await self.call(n)
                except grpc.aio.AioRpcError as error:
                    results[n] = error
                if len(results) == FAULT_AFTER_REPLIES:
                    enough_replies.set()

        storm = asyncio.gather(*(caller() for _ in range(STORM_CONCURRENCY)))
        await asyncio.wait_for(enough_replies.wait(), timeout=60)
        try:
            await fault()
        finally:
            fault_over.set()
        await asyncio.wait_for(storm, timeout=120)
        checker = await connect_when_back(db_url)
        try:
            kinds = await self.check(checker, [results[n] for n in range(len(results))])
        finally:
            await checker.close()
        assert kinds[errors.OUTCOME_UNKNOWN] + kinds[errors.NOTHING_WRITTEN], "the fault came after the storm"

    async def check(self, conn: asyncpg.Connection, results: list[Any]) -> dict[str, int]:
        """Asserts every reply's claim against the final state; counts the kinds of reply."""
        kinds = {"ok": 0, errors.OUTCOME_UNKNOWN: 0, errors.NOTHING_WRITTEN: 0}
        for n, result in enumerate(results):
            applied = await self.applied(conn, n)
            if not isinstance(result, grpc.aio.AioRpcError):
                assert applied, f"call {n} was acknowledged but is not in the database"
                kinds["ok"] += 1
                continue
            assert result.code() in OUTCOME_UNKNOWN, f"call {n}: {result.code()} {result.details()}"
            # No ErrorInfo: the client's own deadline ended the call, the outcome is unknown.
            reason = next((i.reason for i in error_details(result, error_details_pb2.ErrorInfo)), errors.OUTCOME_UNKNOWN)
            kinds[reason] += 1
            if reason == errors.NOTHING_WRITTEN:
                assert not applied, f"call {n} answered {result.code()} '{result.details()}', and was applied"
        assert await conn.fetchval("SELECT count(*) FROM reconcile_entry_counters(false)") == 0
        assert await conn.fetchval("SELECT count(*) FROM reconcile_balances(false)") == 0
        return kinds


async def write_succeeds_again(clients: Clients, entry_id: str, timeout: float = 30) -> None:
    """The service reconnects by itself: a new write succeeds within a bounded wait."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            request = pb.SetResonanceRequest(user_id="after", entry_id=entry_id, resonated=True)
            await clients.interactions.SetResonance(request, metadata=auth("after"), timeout=5)
            return
        except grpc.aio.AioRpcError as error:
            assert error.code() in OUTCOME_UNKNOWN, f"{error.code()}: {error.details()}"
            assert asyncio.get_running_loop().time() < deadline, f"the service did not recover within {timeout} s"
            await asyncio.sleep(0.1)


TERMINATION_BURSTS = 3


async def terminate_service_backends(db_url: str) -> None:
    """pg_terminate_backend of every backend of the service, TERMINATION_BURSTS
    times, each once at least one of them is running a statement: each ends
    with FATAL 57P01, whether its statement was running, committing or done (a
    backend that finishes first ends idle, unseen by any call: hence the bursts)."""
    conn = await asyncpg.connect(db_url)
    try:
        bursts = 0
        for _ in range(500):
            bursts += bool(await conn.fetchval(
                """SELECT count(*) FILTER (WHERE state = 'active') FROM (
                       SELECT state, pg_terminate_backend(pid) FROM pg_stat_activity
                       WHERE application_name = 'nexus' AND datname = current_database()
                         AND EXISTS (SELECT FROM pg_stat_activity a
                                     WHERE a.application_name = 'nexus' AND a.datname = current_database()
                                       AND a.state = 'active')) terminated"""
            ))
            if bursts == TERMINATION_BURSTS:
                return
            await asyncio.sleep(0.01)
        pytest.fail(f"the service's backends ran a statement {bursts} times of {TERMINATION_BURSTS}")
    finally:
        await conn.close()


async def test_backends_terminated_mid_storm_every_error_reply_tells_the_truth(clients: Clients, db_url: str) -> None:
    for round_number in range(ROUNDS):
        storm = Storm(clients, f"t{round_number}")
        await storm.prepare()
        await storm.run(lambda: terminate_service_backends(db_url), db_url)
        await write_succeeds_again(clients, storm.entries[0])


async def test_a_database_crash_mid_storm_every_reply_tells_the_truth_and_the_service_recovers(
    clients: Clients, db: asyncpg.Connection, db_url: str
) -> None:
    """SIGKILL of one backend: PostgreSQL ends every session, recovers, and
    refuses connections meanwhile (those calls wrote nothing)."""
    storm = Storm(clients, "crash")
    await storm.prepare()

    async def crash() -> None:
        victim = await db.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'nexus' AND datname = current_database() LIMIT 1"
        )
        assert victim is not None, "no backend of the service to kill"
        os.kill(victim, signal.SIGKILL)

    await storm.run(crash, db_url)
    await write_succeeds_again(clients, storm.entries[0])


async def test_the_embedded_postmaster_killed_mid_storm_every_reply_tells_the_truth(pg_dir: Path) -> None:
    """kill -9 of the embedded postmaster: its orphaned backends are killed and
    it is restarted by the server (nexus.embedded), which then serves again."""
    server = NexusServer(Config(data_dir=pg_dir, port=0, jwt_secret=JWT_SECRET, log_level="warning"))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            clients = Clients(channel)
            for round_number in range(POSTMASTER_KILL_ROUNDS):
                storm = Storm(clients, f"k{round_number}")
                await storm.prepare()

                async def kill() -> None:
                    kill_postmaster(pg_dir / "pg")

                await storm.run(kill, server.database_url)
                await write_succeeds_again(clients, storm.entries[0])
    finally:
        await server.stop(grace=0)


async def test_a_write_whose_backend_is_terminated_mid_call_has_an_unknown_outcome(
    clients: Clients, db: asyncpg.Connection, db_url: str
) -> None:
    """The FATAL 57P01 of a terminated backend cannot say whether the call
    committed (it can come after the commit, while the reply is sent), so the
    reply must not say nothing was written: here the toggle waits on a row
    lock when its backend is terminated."""
    author = "lock-author"
    request = pb.CreateEntryRequest(author_id=author, type="post", title="t", content="c")
    entry_id = (await clients.interactions.CreateEntry(request, metadata=auth(author), timeout=10)).entry.entry_id
    locker = await asyncpg.connect(db_url)
    try:
        async with reaction_lock(locker, "bob", entry_id):
            toggle = asyncio.ensure_future(
                clients.interactions.ToggleResonance(
                    pb.ToggleResonanceRequest(user_id="bob", entry_id=entry_id), metadata=auth("bob"), timeout=20
                )
            )
            await wait_until_toggle_blocks(db)
            await db.execute(
                """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                   WHERE application_name = 'nexus' AND datname = current_database() AND query LIKE '%apply_reactions%'"""
            )
            error = await rpc_error(toggle)
    finally:
        await locker.close()
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert [i.reason for i in error_details(error, error_details_pb2.ErrorInfo)] == [errors.OUTCOME_UNKNOWN]
    assert "nothing was written" not in (error.details() or "")


# --- health while the database stalls ------------------------------------------------

HEALTH_STALL_S = 4.0


async def test_health_is_not_serving_while_the_database_is_stalled_and_serving_after(
    server: NexusServer, db: asyncpg.Connection
) -> None:
    """Health probes the database on a connection of its own, bounded by
    HEALTH_PROBE_TIMEOUT_S: a stalled PostgreSQL (every process stopped) turns
    it NOT_SERVING within the stall, and the first answer after it SERVING."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        await wait_for_health(channel, SERVING)
        loop = asyncio.get_running_loop()
        async with stalled_database(db):
            stalled_at = loop.time()
            await wait_for_health(channel, NOT_SERVING, timeout=HEALTH_STALL_S)
            noticed_s = loop.time() - stalled_at
        await wait_for_health(channel, SERVING, timeout=HEALTH_STALL_S)
    # A probe starts within an interval and gives up after its timeout; a
    # second of slack for a loaded machine.
    bound_s = HEALTH_PROBE_INTERVAL_S + HEALTH_PROBE_TIMEOUT_S + 1.0
    assert noticed_s < bound_s, f"NOT_SERVING came {noticed_s:.1f} s into the stall (bound {bound_s} s)"
