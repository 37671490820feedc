"""Nexus servers of a test's own: their configuration, in-process servers and
maintenance, health checks."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nexus import database
from nexus.config import Config
from nexus.maintenance import Maintenance
from nexus.server import NexusServer
from nexus.v1 import memory_pb2_grpc

from support.rpc import JWT_SECRET
from support.waiting import eventually


def server_config(database_url: str, **overrides: object) -> Config:
    """A test server's configuration: port 0, the test JWT secret, a small pool, quiet logs."""
    values: dict[str, object] = dict(
        database_url=database_url, port=0, jwt_secret=JWT_SECRET, pool_min_size=2, pool_max_size=16, log_level="warning"
    )
    values.update(overrides)
    return Config(**values)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def maintenance_runner(db_url: str, **overrides: Any) -> AsyncIterator[Maintenance]:
    """A Maintenance on its own pool (no background loop), configured as
    server_config(db_url, **overrides)."""
    db = await database.Database.open(
        db_url, min_size=1, max_size=2, statement_timeout_ms=30_000, slow_warn_ms=10_000, slow_error_ms=20_000
    )
    try:
        yield Maintenance(db, server_config(db_url, **overrides))
    finally:
        await db.close()


@contextlib.asynccontextmanager
async def serving(
    url: str, build_indexes: Sequence[str] = (), **overrides: Any
) -> AsyncIterator[memory_pb2_grpc.MemoryServiceStub]:
    """A NexusServer of its own over url, and a MemoryService stub for it.
    With build_indexes, its maintenance first runs the vector-index job, which
    must build exactly those users' indexes."""
    server = NexusServer(server_config(url, **overrides))
    await server.start()
    try:
        if build_indexes:
            assert server.maintenance is not None
            assert await server.maintenance.maintain_vector_indexes() == list(build_indexes)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield memory_pb2_grpc.MemoryServiceStub(channel)
    finally:
        await server.stop(grace=0)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> int:
    """A port p such that p .. p + count - 1 are free (as far as binding them now tells)."""
    for _ in range(100):
        base = free_port()
        with contextlib.ExitStack() as bound:
            try:
                for port in range(base, base + count):
                    bound.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
            return base
    raise RuntimeError(f"no {count} consecutive free ports found")


def own_connection(port: int) -> grpc.aio.Channel:
    """A channel to 127.0.0.1:port on a TCP connection of its own: gRPC channels with the
    same settings otherwise share one, and SO_REUSEPORT splits connections, not calls."""
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])


async def health_status(channel: grpc.aio.Channel) -> int | None:
    """The overall health status, or None when the server does not answer."""
    try:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    except grpc.aio.AioRpcError:
        return None
    return response.status


async def wait_for_health(channel: grpc.aio.Channel, status: int, timeout: float = 10.0) -> None:
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)

    async def reached() -> bool:
        return await health_status(channel) == status

    await eventually(reached, f"health {name}", timeout)


@contextlib.asynccontextmanager
async def running_server(config: Config) -> AsyncIterator[grpc.aio.Channel]:
    """An in-process NexusServer with ``config``, and a channel to it; stopped afterwards."""
    server = NexusServer(config)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield channel
    finally:
        await server.stop(grace=0)


async def next_status(watch: grpc.aio.UnaryStreamCall) -> int | None:
    """The next status a health Watch stream reports, or None when the stream ends."""
    try:
        message = await asyncio.wait_for(watch.read(), 10)
    except grpc.aio.AioRpcError:
        return None
    return None if message is grpc.aio.EOF else message.status
