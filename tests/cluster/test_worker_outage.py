"""A Citus worker that is down is an outage of its own shards only (#19).

A cluster of the test's own (coordinator + 2 workers on loopback: stopping a
node of the session's cluster would fail every other test), a real NexusServer
on it, and users found by the catalog on each worker. One worker is crashed
(``pg_ctl stop -m immediate``) and restarted while streams of a user on each
worker are open:

- while it is down, the users of the healthy worker go on: memories, credits,
  a transfer and a balances read of several of them succeed, and their stream
  keeps delivering live (each node's LISTEN connection lives on its own);
- a write on the dead worker's user fails with UNAVAILABLE well within its
  deadline (never INTERNAL), and nothing of it is applied;
- health says what is degraded: the ``nexus.cluster`` status is NOT_SERVING
  while the overall status stays SERVING, and turns SERVING again after;
- once the worker is back, that user's writes succeed again without a restart
  of Nexus, and both streams hold exactly their user's event log: nothing lost,
  nothing twice, also around the outage.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtools.citus_cluster import CitusCluster
from nexus import database
from nexus.server import CLUSTER_HEALTH, NexusServer
from nexus.v1 import memory_pb2 as memory
from nexus.v1 import memory_pb2_grpc, token_pb2_grpc
from nexus.v1 import token_pb2 as token

from support.databases import own_citus_cluster, users_on_both_workers
from support.rpc import SERVICE, auth
from support.servers import server_config
from support.waiting import eventually

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
# A call's deadline; a call on the dead worker's keys must fail well within it.
DEADLINE_S = 10.0
FAILS_FAST_S = 3.0


@pytest.fixture
async def own_cluster() -> AsyncIterator[CitusCluster]:
    # Durable: a worker crashed with commits not yet flushed (synchronous_commit off) would lose acknowledged writes.
    async with own_citus_cluster("nexus-test-outage-", durable=True) as cluster:
        yield cluster


async def open_stream(stub: memory_pb2_grpc.MemoryServiceStub, user: str) -> grpc.aio.UnaryStreamCall:
    call = stub.SubscribeMemories(memory.SubscribeMemoriesRequest(user_id=user), metadata=auth(user))
    await asyncio.wait_for(call.initial_metadata(), DEADLINE_S)  # registered with the hub
    return call


async def next_content(call: grpc.aio.UnaryStreamCall) -> str:
    event = await asyncio.wait_for(call.read(), DEADLINE_S)
    assert event is not grpc.aio.EOF, "the stream ended"
    return str(event.memory.content)


async def remember(stub: memory_pb2_grpc.MemoryServiceStub, user: str, content: str) -> None:
    request = memory.CreateMemoryRequest(user_id=user, content=content, gravity_score=0.5)
    await stub.CreateMemory(request, metadata=auth(user), timeout=DEADLINE_S)


async def health_is(channel: grpc.aio.Channel, service: str, status: int) -> bool:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return bool(reply.status == status)


async def logged_contents(conn: asyncpg.Connection, user: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT document->>'content' AS content FROM memory_events WHERE user_id = $1 AND topic = 'memory' ORDER BY seq",
        user,
    )
    return [row["content"] for row in rows]


async def test_a_crashed_worker_stops_only_its_own_users(own_cluster: CitusCluster) -> None:
    coordinator = await database.connect(own_cluster.url)
    nexus = NexusServer(server_config(own_cluster.url))
    await nexus.start()
    try:
        by_port = await users_on_both_workers(coordinator, "outage", 2)
        dead_node = own_cluster.workers[0]
        (healthy, healthy_payee), (doomed, _) = (
            users for port, users in sorted(by_port.items(), key=lambda item: item[0] == dead_node.port)
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{nexus.port}") as channel:
            memories = memory_pb2_grpc.MemoryServiceStub(channel)
            tokens = token_pb2_grpc.TokenServiceStub(channel)
            streams = {user: await open_stream(memories, user) for user in (healthy, doomed)}
            for user, stream in streams.items():
                await remember(memories, user, "before")
                assert await next_content(stream) == "before"

            await own_cluster.crash_node(dead_node)
            # Health says what is degraded: the cluster's workers, not the whole service.
            await eventually(lambda: health_is(channel, CLUSTER_HEALTH, NOT_SERVING), "nexus.cluster NOT_SERVING")
            assert await health_is(channel, "", SERVING)

            # The healthy worker's user: writes, reads and the live stream go on.
            await remember(memories, healthy, "during")
            assert await next_content(streams[healthy]) == "during"
            await tokens.Credit(token.CreditRequest(user_id=healthy, amount=50, reason="r", reference_id="r",
                                                    request_id="credit-during"), metadata=SERVICE, timeout=DEADLINE_S)
            await tokens.Transfer(token.TransferRequest(from_user_id=healthy, to_user_id=healthy_payee, amount=20,
                                                        reason="r", reference_id="r", request_id="transfer-during"),
                                  metadata=auth(healthy), timeout=DEADLINE_S)
            balances = await tokens.GetBalances(token.GetBalancesRequest(user_ids=[healthy, healthy_payee]),
                                                metadata=SERVICE, timeout=DEADLINE_S)
            assert {b.user_id: b.balance for b in balances.balances} == {healthy: 30, healthy_payee: 20}

            # The dead worker's user: a clear UNAVAILABLE, fast, and nothing written.
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await remember(memories, doomed, "lost")
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
            assert time.monotonic() - started < FAILS_FAST_S

            await own_cluster.restart_node(dead_node)

            async def written_again() -> bool:
                try:
                    await remember(memories, doomed, "after")
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                    return False
                return True

            await eventually(written_again, "a write on the restarted worker's user", timeout=30)
            await eventually(lambda: health_is(channel, CLUSTER_HEALTH, SERVING), "nexus.cluster SERVING again")
            await remember(memories, healthy, "after")
            assert await next_content(streams[doomed]) == "after"
            assert await next_content(streams[healthy]) == "after"
            for stream in streams.values():
                stream.cancel()
        assert await logged_contents(coordinator, doomed) == ["before", "after"]
        assert await logged_contents(coordinator, healthy) == ["before", "during", "after"]
    finally:
        await nexus.stop(grace=0)
        await coordinator.close()
