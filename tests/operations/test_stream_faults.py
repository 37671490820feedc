"""Resumed streams across faults: every event once, in order, whatever dies.

Writers create memories for a few users (retrying each request_id until it
is acknowledged) while several readers per user follow SubscribeMemories,
reconnecting after every failure with the resume token of the last event
they got (or, before the first, the start the stream announced), and also
leaving every stream after a few events to resume at once. Each round
one fault strikes mid-storm, in turn:

- ``nexus serve`` killed with SIGKILL and started again half a second later;
- every backend of the service terminated (its pool, its LISTEN connection);
- one backend killed with SIGKILL, so PostgreSQL ends every session and recovers.

At the end every reader's events must equal the user's event log after the
reader's start: nothing skipped, nothing repeated, nothing out of order.
NEXUS_TEST_STREAM_ROUNDS raises the number of rounds for a longer hunt.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import pytest

from nexus.servicers.memory_streams import RESUME_TOKEN_METADATA
from nexus.v1 import memory_pb2, memory_pb2_grpc

from support.databases import connect_when_back
from support.processes import nexus_env, nexus_serve
from support.rpc import JWT_SECRET, SERVER_TOKENS, auth
from support.servers import SERVING, free_port, wait_for_health
from support.waiting import eventually

pytestmark = pytest.mark.single_node("kills the server's and the database's processes")

ROUNDS = int(os.environ.get("NEXUS_TEST_STREAM_ROUNDS", "3"))
USERS = ("stream-a", "stream-b")
READERS_PER_USER = 3
WRITERS = 4
WRITES_PER_ROUND = 40
RESTART_AFTER_S = 0.5


@dataclass
class Reader:
    user: str
    # Besides every fault, the reader leaves each stream after a number of
    # events drawn from this (seeded) generator, and resumes: many more
    # reconnects, at every point of the stream.
    leaving: random.Random
    start: int | None = None  # the log position the first stream announced
    events: list[tuple[str, int]] = field(default_factory=list)  # (memory_id, type) in order
    reconnects: int = 0


class Service:
    """``nexus serve`` over the test database, which the test can kill and start again."""

    def __init__(self, db_url: str, log_dir: Path) -> None:
        self.port = free_port()
        self._env = nexus_env(NEXUS_DATABASE_URL=db_url, NEXUS_JWT_SECRET=JWT_SECRET, NEXUS_PORT=self.port)
        self._log_dir = log_dir
        self._starts = 0
        self._running = contextlib.AsyncExitStack()

    async def start(self, channel: grpc.aio.Channel) -> None:
        self._starts += 1
        await self._running.enter_async_context(nexus_serve(self._env, self._log_dir / f"serve-{self._starts}.log"))
        await wait_for_health(channel, SERVING, timeout=60)

    async def kill(self) -> None:
        """SIGKILL (nexus_serve's exit), as a crash would."""
        await self._running.aclose()


async def follow(stub: memory_pb2_grpc.MemoryServiceStub, reader: Reader) -> None:
    """Reads the user's memory events for ever, resuming after every failure."""
    token = ""
    while True:
        call = stub.SubscribeMemories(
            memory_pb2.SubscribeMemoriesRequest(user_id=reader.user, resume_token=token), metadata=auth(reader.user)
        )
        try:
            metadata = dict(await call.initial_metadata() or ())
            announced = metadata.get(RESUME_TOKEN_METADATA)
            if announced is not None:
                if reader.start is None:
                    (reader.start,) = SERVER_TOKENS.decode_as(("events", "memory", reader.user), str(announced), (int,)) or [0]
                token = token or str(announced)
            received, leave_after = 0, reader.leaving.randint(1, 30)
            async for event in call:
                reader.events.append((event.memory.memory_id, event.type))
                token = event.resume_token
                received += 1
                if received == leave_after:
                    reader.reconnects += 1
                    break
        except grpc.aio.AioRpcError:
            reader.reconnects += 1
            await asyncio.sleep(0.05)  # the server or its database is down: no busy loop
        finally:
            call.cancel()


async def write(stub: memory_pb2_grpc.MemoryServiceStub, writer: int, count: list[int], stop: asyncio.Event) -> None:
    """Creates memories until stopped, each request_id retried until it is acknowledged."""
    n = 0
    while not stop.is_set():
        user = USERS[n % len(USERS)]
        request = memory_pb2.CreateMemoryRequest(
            user_id=user, content=f"writer {writer} note {n}", gravity_score=0.5, request_id=f"w{writer}-{n}"
        )
        for _ in range(600):
            try:
                await stub.CreateMemory(request, metadata=auth(user), timeout=5)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)
        else:
            pytest.fail(f"write w{writer}-{n} was never acknowledged")
        count[0] += 1
        n += 1


async def memory_log(db: asyncpg.Connection, user: str, after: int) -> list[tuple[str, int]]:
    types = {"created": memory_pb2.EVENT_TYPE_CREATED, "updated": memory_pb2.EVENT_TYPE_UPDATED,
             "deleted": memory_pb2.EVENT_TYPE_DELETED}
    rows = await db.fetch(
        """SELECT document ->> 'memory_id' AS memory_id, change FROM memory_events
           WHERE user_id = $1 AND topic = 'memory' AND seq > $2 ORDER BY seq""",
        user, after,
    )
    return [(r["memory_id"], types[r["change"]]) for r in rows]


@contextlib.asynccontextmanager
async def running(tasks: list[asyncio.Task[None]]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_resumed_streams_get_every_event_once_across_kills_of_server_and_database(
    db_url: str, tmp_path: Path
) -> None:
    service = Service(db_url, tmp_path)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        await service.start(channel)
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        readers = [Reader(user, random.Random(f"{user}-{n}")) for user in USERS for n in range(READERS_PER_USER)]
        reading = [asyncio.create_task(follow(stub, reader)) for reader in readers]
        try:
            async with running(reading):

                async def all_started() -> bool:
                    return all(reader.start is not None for reader in readers)

                await eventually(all_started, "every reader's stream to start")
                stop = asyncio.Event()
                written = [0]
                writing = [asyncio.create_task(write(stub, w, written, stop)) for w in range(WRITERS)]
                async with running(writing):
                    for round_number in range(ROUNDS):
                        target = written[0] + WRITES_PER_ROUND // 2

                        async def progressed(target: int = target) -> bool:
                            return written[0] >= target

                        await eventually(progressed, f"writes before fault {round_number}", timeout=60)
                        await strike(round_number, service, channel, db_url)
                        target = written[0] + WRITES_PER_ROUND // 2
                        await eventually(progressed, f"writes after fault {round_number}", timeout=90)
                    stop.set()
                    await asyncio.wait_for(asyncio.gather(*writing), timeout=60)

                db = await connect_when_back(db_url)
                try:

                    async def caught_up() -> bool:
                        for reader in readers:
                            if len(reader.events) < len(await memory_log(db, reader.user, reader.start or 0)):
                                return False
                        return True

                    # Until every reader has as many events as its log, or 60 s
                    # (then the comparison below names what is missing).
                    with contextlib.suppress(pytest.fail.Exception):
                        await eventually(caught_up, "every reader to reach the end of its log", timeout=60)
                    for reader in readers:
                        assert reader.start is not None
                        log = await memory_log(db, reader.user, reader.start)
                        missing = [e for e in log if e not in reader.events]
                        assert reader.events == log, (
                            f"reader of {reader.user} from {reader.start} after {reader.reconnects} reconnects: "
                            f"{len(reader.events)} events, log {len(log)}; missing {missing[:3]}"
                        )
                finally:
                    await db.close()
        finally:
            await service.kill()


async def strike(round_number: int, service: Service, channel: grpc.aio.Channel, db_url: str) -> None:
    """The round's fault, in turn: the server killed and restarted, the service's
    backends terminated, the database crashed (one backend SIGKILLed)."""
    fault = round_number % 3
    if fault == 0:
        await service.kill()
        await asyncio.sleep(RESTART_AFTER_S)  # the shape of the fault: a supervisor's restart delay
        await service.start(channel)
        return
    conn = await connect_when_back(db_url)
    try:
        if fault == 1:
            await conn.execute(
                """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                   WHERE application_name LIKE 'nexus%' AND datname = current_database()"""
            )
        else:
            victim = await conn.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'nexus' AND datname = current_database() LIMIT 1"
            )
            assert victim is not None, "no backend of the service to kill"
            os.kill(victim, signal.SIGKILL)
    finally:
        conn.terminate()
