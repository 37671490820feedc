"""Growing the cluster while it serves (#19): a worker added and the shards
rebalanced onto it (``citus_rebalance_start``, block writes) while clients
credit and toggle through a real NexusServer.

A cluster of the test's own (two workers, a third added mid-load), 4 shards per
table so that the move is quick. Checked afterwards: every acknowledged credit
is in its user's balance exactly once (a credit whose reply was lost may or may
not be), balances equal ledgers and counters equal rows (reconcile finds no
drift), each sequence of toggles by one user on one entry alternated, and the
hub listens on the new worker by itself: a stream opened before the move, of
a user whose shard moved there, gets that user's next event live.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import grpc
import pytest

from devtools.citus_cluster import CitusCluster
from nexus import database
from nexus.cli.reconcile import reconcile
from nexus.server import NexusServer
from nexus.v1 import interaction_pb2, interaction_pb2_grpc, memory_pb2, memory_pb2_grpc, token_pb2, token_pb2_grpc

from support.databases import own_citus_cluster, worker_of
from support.rpc import SERVICE
from support.servers import server_config

WAIT_S = 10.0
# "Live": a stream gets an event within a second or two, not when a node check
# that might be half a minute away finally notices the new worker.
LIVE_S = 3.0
USERS = 24  # with streams open: some of them have their shard moved to the new worker
SHARD_COUNT = 4


@pytest.fixture
async def growing_cluster() -> AsyncIterator[CitusCluster]:
    async with own_citus_cluster("nexus-test-grow-", durable=False, shard_count=SHARD_COUNT) as cluster:
        yield cluster


async def test_a_worker_added_and_rebalanced_under_load_loses_and_doubles_nothing(
    growing_cluster: CitusCluster,
) -> None:
    coordinator = await database.connect(growing_cluster.url)
    nexus = NexusServer(server_config(growing_cluster.url))
    await nexus.start()
    users = [f"grow-{n}" for n in range(USERS)]
    acknowledged: dict[str, int] = dict.fromkeys(users, 0)
    unknown: dict[str, int] = dict.fromkeys(users, 0)
    # Each (user, entry)'s toggle replies in order; None where the outcome is unknown.
    toggle_replies: dict[tuple[str, str], list[bool | None]] = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{nexus.port}") as channel:
            tokens = token_pb2_grpc.TokenServiceStub(channel)
            interactions = interaction_pb2_grpc.InteractionServiceStub(channel)
            memories = memory_pb2_grpc.MemoryServiceStub(channel)
            entries = [
                (await interactions.CreateEntry(interaction_pb2.CreateEntryRequest(author_id=users[0], type="post"),
                                                metadata=SERVICE)).entry.entry_id
                for _ in range(4)
            ]
            streams = {}
            for user in users:
                streams[user] = memories.SubscribeMemories(memory_pb2.SubscribeMemoriesRequest(user_id=user),
                                                           metadata=SERVICE)
                await asyncio.wait_for(streams[user].initial_metadata(), WAIT_S)
            writing = asyncio.Event()
            moved = asyncio.Event()
            numbers = itertools.count()

            async def credit_until_moved(user: str) -> None:
                while not moved.is_set():
                    request = token_pb2.CreditRequest(user_id=user, amount=1, reason="r", reference_id="r",
                                                      request_id=f"credit-{next(numbers)}")
                    try:
                        await tokens.Credit(request, metadata=SERVICE, timeout=WAIT_S)
                        acknowledged[user] += 1
                        writing.set()
                    except grpc.aio.AioRpcError as error:
                        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), error
                        unknown[user] += 1

            async def toggle_until_moved(user: str, entry: str) -> None:
                replies = toggle_replies.setdefault((user, entry), [])
                while not moved.is_set() or len(replies) < 4:
                    request = interaction_pb2.ToggleResonanceRequest(user_id=user, entry_id=entry)
                    try:
                        reply = await interactions.ToggleResonance(request, metadata=SERVICE, timeout=WAIT_S)
                    except grpc.aio.AioRpcError as error:
                        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), error
                        replies.append(None)
                    else:
                        replies.append(reply.resonated)

            async def grow() -> None:
                await writing.wait()  # the move starts under load
                await growing_cluster.add_worker()
                await coordinator.execute("SELECT citus_rebalance_start(shard_transfer_mode => 'block_writes')")
                await coordinator.execute("SELECT citus_rebalance_wait()")
                moved.set()

            await asyncio.gather(
                grow(),
                *(credit_until_moved(user) for user in users),
                *(toggle_until_moved(user, entry) for user, entry in zip(users[:4], entries, strict=True)),
            )
            new_worker = growing_cluster.workers[-1].port
            moved_users = [user for user in users if await worker_of(coordinator, user) == new_worker]
            assert moved_users, "no user's shard moved to the new worker"
            for user in moved_users:
                await memories.CreateMemory(memory_pb2.CreateMemoryRequest(user_id=user, content="after the move"),
                                            metadata=SERVICE, timeout=WAIT_S)
                event = await asyncio.wait_for(streams[user].read(), LIVE_S)
                assert event is not grpc.aio.EOF and event.memory.content == "after the move"
            for stream in streams.values():
                stream.cancel()

        assert sum(acknowledged.values()) > 0
        balances = dict(await coordinator.fetch(
            "SELECT user_id, balance FROM balances WHERE user_id = ANY ($1)", users))
        for user in users:
            assert acknowledged[user] <= balances.get(user, 0) <= acknowledged[user] + unknown[user], user
        for (user, entry), replies in toggle_replies.items():
            # Linearizable: each acknowledged toggle flips what the one before it left.
            assert all(a != b for a, b in itertools.pairwise(replies) if a is not None and b is not None), replies
            if replies[-1] is not None:
                row = await coordinator.fetchval(
                    "SELECT count(*) FROM reactions WHERE user_id = $1 AND entry_id = $2::uuid AND kind = 'resonance'",
                    user, entry)
                assert row == int(replies[-1]), (user, entry, replies)
        assert await reconcile(coordinator, fix=False) == [], "a counter or balance drifted from its rows"
    finally:
        await nexus.stop(grace=0)
        await coordinator.close()
