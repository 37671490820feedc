"""The servers a bench loads, and the databases behind them.

By default each target is the bench's own: a ``nexus serve`` subprocess on
127.0.0.1 over a database in a temporary directory (the embedded PostgreSQL,
or a coordinator + 2 workers Citus cluster), all stopped and removed on the
way out, failure and Ctrl-C included. ``configured_target`` benches the server
and database the settings name instead, which ``--disposable-database``
declares disposable: nothing else ever writes bench data into a database the
bench did not create.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.core import BenchFailed, Processes, progress
from devtools.citus_build import citus_install
from devtools.citus_cluster import CitusCluster
from nexus import embedded
from nexus.auth import mint_token
from nexus.cli.client import ClientError, database_url, describe_rpc_error, server_address, service_metadata
from nexus.config import Config, env_var

SERVING_TIMEOUT_S = 300.0  # a first start migrates (and on Citus distributes) the schema

# Settings the bench's own server does not take from the bench's: where it listens,
# its database and secret (its own), TLS and metrics (off: plaintext load), its
# log level (one line per RPC would cost the CPU the figures are about), and its
# workers (one, but for the figure that compares one with two: bench/workers.py).
OWN_SERVER_FIXED = {"host", "port", "data_dir", "database_url", "jwt_secret", "jwt_public_key_file", "metrics_port",
                    "log_level", "workers"}


@dataclass(frozen=True)
class Target:
    """A server under load and its database."""

    label: str
    address: str
    database_url: str
    metadata: tuple[tuple[str, str], ...]
    processes: Processes
    cluster: CitusCluster | None = None  # the bench's own Citus cluster, for its fault scenarios


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(pid: int, port: int) -> int:
    """How many of the server's processes (it, or its workers) listen on the port."""
    server = psutil.Process(pid)
    count = 0
    for process in (server, *server.children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            connections = process.net_connections("tcp")
            count += any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections)
    return count


async def _wait_until_serving(address: str, port: int, server: asyncio.subprocess.Process, workers: int) -> None:
    """Polls the health Check until SERVING and every worker listens (a first one
    answers while the others still start); fails if the server exits or the time runs out."""
    deadline = time.monotonic() + SERVING_TIMEOUT_S
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if server.returncode is not None:
                raise BenchFailed(f"the bench's server exited with code {server.returncode} before serving")
            with contextlib.suppress(grpc.aio.AioRpcError):
                response = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING and _listening(server.pid, port) == workers:
                    return
            if time.monotonic() > deadline:
                raise BenchFailed(f"the bench's server on {address} was not SERVING with {workers} worker(s) after "
                                  f"{SERVING_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def own_server(
    config: Config, label: str, url: str, pgdata_dirs: tuple[Path, ...], workers: int = 1
) -> AsyncIterator[Target]:
    """A ``nexus serve`` of the bench's own on ``url`` with the bench's settings (but
    OWN_SERVER_FIXED) and ``workers`` workers, stopped afterwards."""
    secret, port = secrets.token_urlsafe(32), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    for f in dataclasses.fields(config):
        if f.name not in OWN_SERVER_FIXED and not f.name.startswith("tls_"):
            env[env_var(f.name)] = str(getattr(config, f.name))
    env.update(NEXUS_HOST="127.0.0.1", NEXUS_PORT=str(port), NEXUS_DATABASE_URL=url, NEXUS_JWT_SECRET=secret,
               NEXUS_LOG_LEVEL="warning", NEXUS_WORKERS=str(workers))
    progress(f"starting the {label} server")
    server = await asyncio.create_subprocess_exec(sys.executable, "-m", "nexus.cli", "serve", env=env)
    try:
        address = f"127.0.0.1:{port}"
        await _wait_until_serving(address, port, server, workers)
        metadata = (("authorization", f"Bearer {mint_token(secret, 'bench', service=True)}"),)
        yield Target(label, address, url, metadata, Processes(server.pid, pgdata_dirs))
    finally:
        if server.returncode is None:
            server.terminate()
            try:
                await asyncio.wait_for(server.wait(), 30)
            except TimeoutError:
                server.kill()
                await server.wait()


@contextlib.asynccontextmanager
async def single_node(config: Config) -> AsyncIterator[Target]:
    """The bench's own server on a fresh embedded PostgreSQL in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="nexus-bench-") as data_dir:
        progress("starting an embedded PostgreSQL in a temporary directory")
        pg = await asyncio.to_thread(embedded.EmbeddedPostgres.start, Path(data_dir))
        try:
            async with own_server(config, "single node", pg.url, (pg.pgdata,)) as target:
                yield target
        finally:
            await asyncio.to_thread(pg.stop)


@contextlib.asynccontextmanager
async def citus_cluster(config: Config, workers: int = 2) -> AsyncIterator[Target]:
    """The bench's own server on a fresh Citus cluster (a coordinator and ``workers``
    workers on 127.0.0.1) in a temporary directory; the server distributes the schema
    when it migrates. Stopped and removed afterwards."""
    progress("building Citus (cached after the first time)")
    pginstall = await asyncio.to_thread(citus_install)
    base_dir = Path(tempfile.mkdtemp(prefix="nexus-bench-citus-"))
    try:
        progress(f"starting a Citus cluster (coordinator + {workers} workers) in a temporary directory")
        cluster = await CitusCluster.start(pginstall, base_dir, workers=workers)
        try:
            label = f"{1 + workers}-node Citus"
            async with own_server(config, label, cluster.url, tuple(n.pgdata for n in cluster.nodes)) as target:
                yield dataclasses.replace(target, cluster=cluster)
        finally:
            await cluster.stop()
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)


@contextlib.asynccontextmanager
async def configured_target(config: Config, server_pid: int | None) -> AsyncIterator[Target]:
    """The configured server and database (``--disposable-database``); the server must
    answer SERVING before anything is written."""
    if config.client_tls:
        raise BenchFailed("the bench speaks plaintext; bench a plaintext server (or leave out --disposable-database)")
    address = server_address(config)
    try:
        metadata = service_metadata(config, "bench")
    except ClientError as exc:
        raise BenchFailed(str(exc)) from None
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        except grpc.aio.AioRpcError as exc:
            raise BenchFailed(describe_rpc_error(address, exc)) from None
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        raise BenchFailed(f"{address} is {health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)}")
    pgdata_dirs = () if config.database_url else ((config.data_dir / "pg").resolve(),)
    try:
        with database_url(config) as url:
            yield Target("configured", address, url, metadata, Processes(server_pid, pgdata_dirs))
    except ClientError as exc:
        raise BenchFailed(str(exc)) from None
