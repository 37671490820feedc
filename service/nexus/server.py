"""A running Nexus process: database, migrations, gRPC server, health, metrics.

Start order: database (embedded or external) → migrations → pool → gRPC server
→ health SERVING. Stop order is the reverse, with health NOT_SERVING first and
in-flight calls given the grace period to finish. A worker of ``nexus serve
--workers N`` (nexus.workers) skips the first two: its parent has done them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nexus import database, embedded, migrations
from nexus.auth import Authenticator, resolve_secret
from nexus.config import Config
from nexus.interceptor import RpcInterceptor
from nexus.introspection import HealthServicer, enable_reflection
from nexus.maintenance import Maintenance
from nexus.metrics import serve_metrics
from nexus.pagination import PageTokens
from nexus.realtime import EventHub
from nexus.servicers.follow import FollowServicer
from nexus.servicers.interaction import InteractionServicer
from nexus.servicers.memory import MemoryServicer
from nexus.servicers.token import TokenServicer
from nexus.v1 import (
    follow_pb2,
    follow_pb2_grpc,
    interaction_pb2,
    interaction_pb2_grpc,
    memory_pb2,
    memory_pb2_grpc,
    token_pb2,
    token_pb2_grpc,
)

log = logging.getLogger("nexus.server")

SERVICE_NAMES = tuple(
    service.full_name
    for module in (interaction_pb2, follow_pb2, token_pb2, memory_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
)
# Health follows the database: probed every interval, NOT_SERVING when a probe
# gets no answer within the timeout (a stalled or dead database), SERVING again
# at the first answer.
HEALTH_PROBE_INTERVAL_S = 0.5
# The health service name of the cluster's workers: NOT_SERVING while this
# server cannot reach one of them (the overall status stays SERVING: calls on
# the other workers' keys go on). Always SERVING on one PostgreSQL server.
CLUSTER_HEALTH = "nexus.cluster"
HEALTH_PROBE_TIMEOUT_S = 1.0


class StartupError(Exception):
    """The server cannot start for a reason its operator must fix; the message says
    which, in one line (``nexus serve`` prints it and exits 1)."""


class ListenError(StartupError):
    """The gRPC address cannot be listened on (the port is in use, or the host is not local)."""


# What a database that cannot be reached, or refuses the connection, raises.
DATABASE_UNREACHABLE = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


async def migrate_once(url: str, config: Config, then: Callable[[asyncpg.Connection], Awaitable[None]] | None = None) -> None:
    """Applies the pending migrations on a connection of its own, then runs ``then`` on it."""
    conn = await database.connect(url)
    try:
        await migrations.migrate(
            conn, embedding_dim=config.embedding_dim, citus_without_workers=config.citus_without_workers
        )
        if then is not None:
            await then(conn)
    finally:
        await conn.close()


def make_authenticator(config: Config) -> Authenticator:
    """The token checker; StartupError when no token key is configured."""
    public_key = Path(config.jwt_public_key_file).read_text() if config.jwt_public_key_file else None
    try:
        return Authenticator(
            resolve_secret(config), public_key, leeway_s=config.jwt_leeway_s, max_lifetime_s=config.jwt_max_lifetime_s
        )
    except ValueError as exc:
        raise StartupError(f"configuration error: {exc}") from None


@dataclass(frozen=True)
class WorkerRole:
    """What makes a server worker ``index`` of ``nexus serve --workers N``: its parent
    has migrated the database and holds the port, and every worker signs page and
    resume tokens with the same key, so a token works on whichever worker the
    client's next connection lands on."""

    index: int
    page_token_key: bytes


def page_token_key(config: Config) -> bytes:
    """The key of page and resume tokens: the HS256 secret, else a random one."""
    secret = resolve_secret(config)
    if secret:
        return secret.encode()
    log.warning("event=page_tokens_per_process reason='no NEXUS_JWT_SECRET: page tokens are valid on this server only'")
    return secrets.token_bytes(32)


def check_port_free(config: Config) -> None:
    """Fails before anything starts when the port is taken: gRPC's own bind error
    comes late and does not say why. Port 0 and port sharing (reuse_port) skip it."""
    if config.port == 0 or config.reuse_port:
        return
    try:
        addresses = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in addresses:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: TIME_WAIT is no conflict
                probe.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(f"port {config.port} on {config.host} is in use") from None
        raise ListenError(f"cannot listen on {config.listen_address}: {exc}") from None




class NexusServer:
    def __init__(self, config: Config, worker: WorkerRole | None = None) -> None:
        self.config = config
        self._worker = worker
        self.port = 0
        self._embedded: embedded.EmbeddedPostgres | None = None
        self._db: database.Database | None = None
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self._hub: EventHub | None = None
        self.maintenance: Maintenance | None = None
        self._background: list[asyncio.Task[None]] = []
        self._stop_metrics: Callable[[], None] | None = None

    @property
    def database_url(self) -> str:
        return self._embedded.url if self._embedded else self.config.database_url

    async def start(self) -> None:
        config = self.config
        authenticator = make_authenticator(config)
        check_port_free(config)
        if config.embedded:
            self._embedded = await asyncio.to_thread(embedded.EmbeddedPostgres.start, config.data_dir)
        try:
            if self._worker is None:
                await migrate_once(self.database_url, config)
            self._db = await database.Database.open(
                self.database_url,
                min_size=config.pool_min_size,
                max_size=config.pool_max_size,
                statement_timeout_ms=config.statement_timeout_ms,
                slow_warn_ms=config.slow_query_warn_ms,
                slow_error_ms=config.slow_query_error_ms,
            )
            self._hub = EventHub(self.database_url, self._db, config.stream_buffer_events)
            await self._hub.start()
        except DATABASE_UNREACHABLE as exc:
            raise StartupError(f"cannot connect to the database: {exc}") from exc
        page_tokens = PageTokens(self._worker.page_token_key if self._worker else page_token_key(config))
        self.maintenance = Maintenance(self._db, config)

        server = grpc.aio.server(
            interceptors=[RpcInterceptor(authenticator)],
            # gRPC core's default backlog (1000) cancels calls of a larger burst.
            options=[
                ("grpc.server.max_pending_requests", config.max_pending_rpcs),
                ("grpc.server.max_pending_requests_hard_limit", 3 * config.max_pending_rpcs),
                # On by default in gRPC: a second server on the port would silently get half the connections.
                ("grpc.so_reuseport", int(config.reuse_port)),
            ],
        )
        feed_retention = datetime.timedelta(days=config.feed_retention_days)
        interaction_pb2_grpc.add_InteractionServiceServicer_to_server(
            InteractionServicer(self._db, page_tokens, feed_retention), server
        )
        follow_pb2_grpc.add_FollowServiceServicer_to_server(FollowServicer(self._db, page_tokens), server)
        token_pb2_grpc.add_TokenServiceServicer_to_server(TokenServicer(self._db, page_tokens), server)
        memory_pb2_grpc.add_MemoryServiceServicer_to_server(
            MemoryServicer(self._db, page_tokens, self._hub, config), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        enable_reflection((*SERVICE_NAMES, health.SERVICE_NAME), server)
        self.port = self._bind(server)
        await server.start()
        self._server = server
        if config.metrics_port:
            db = self._db
            try:
                self._stop_metrics = serve_metrics(config.host, config.metrics_port, lambda: db.pool)
            except OSError as exc:
                raise ListenError(f"cannot serve metrics on {config.host}:{config.metrics_port}: {exc.strerror}") from None
        await self._set_health(serving=True)
        await self._health.set(CLUSTER_HEALTH, health_pb2.HealthCheckResponse.SERVING)
        self._background = [
            asyncio.create_task(self._probe_database()),
            asyncio.create_task(self.maintenance.run_forever()),
            asyncio.create_task(self.maintenance.expire_forever()),
        ]
        if self._worker is None:
            log.info("event=serving address=%s port=%d embedded=%s", config.host, self.port, config.embedded)
        else:
            log.info("event=worker_serving worker=%d pid=%d port=%d metrics_port=%d",
                     self._worker.index, os.getpid(), self.port, config.metrics_port)

    def _bind(self, server: grpc.aio.Server) -> int:
        config = self.config
        try:
            if not config.tls_cert_file:
                return server.add_insecure_port(config.listen_address)
            credentials = grpc.ssl_server_credentials(
                [(Path(config.tls_key_file).read_bytes(), Path(config.tls_cert_file).read_bytes())],
                root_certificates=Path(config.tls_client_ca_file).read_bytes() if config.tls_client_ca_file else None,
                require_client_auth=bool(config.tls_client_ca_file),
            )
            return server.add_secure_port(config.listen_address, credentials)
        except RuntimeError as exc:  # gRPC's "Failed to bind", e.g. the port was taken since the check
            raise ListenError(f"cannot listen on {config.listen_address}: {exc}") from exc

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, status)

    async def _probe_database(self) -> None:
        """Keeps health in step with the database: NOT_SERVING while it is unreachable.
        An unreachable embedded database is restarted if it died and this process owns
        it (see nexus.embedded); the pool replaces dead connections when next acquired."""
        assert self._db is not None and self._hub is not None
        serving = True
        unreachable: list[str] = []
        delay = HEALTH_PROBE_INTERVAL_S
        while True:
            await asyncio.sleep(delay)
            delay = HEALTH_PROBE_INTERVAL_S
            try:
                await self._db.ping(HEALTH_PROBE_TIMEOUT_S)
                healthy = True
            except Exception:
                healthy = False
            if healthy != serving:
                serving = healthy
                await self._set_health(serving)
                log.warning("event=database_health serving=%s", serving)
            now_unreachable = self._hub.unreachable_nodes()
            if healthy and now_unreachable != unreachable:
                unreachable = now_unreachable
                status = health_pb2.HealthCheckResponse.NOT_SERVING if unreachable else health_pb2.HealthCheckResponse.SERVING
                await self._health.set(CLUSTER_HEALTH, status)
                log.warning("event=cluster_health unreachable=%s", ",".join(unreachable) or "none")
            if self._embedded is None:
                continue
            if not healthy:
                try:
                    if await asyncio.to_thread(self._embedded.restart_if_down):
                        delay = 0  # probe the restarted database at once
                except Exception as exc:  # retried at the next probe
                    log.error("event=embedded_postgres_restart_failed error=%r", exc)
            elif not self._embedded.owner:
                # The owner has gone and left the database to this process.
                await asyncio.to_thread(self._embedded.claim_ownership)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, streams ended with UNAVAILABLE (clients resume
        elsewhere), then in-flight calls get the grace period to finish."""
        grace = self.config.shutdown_grace_s if grace is None else grace
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._health.enter_graceful_shutdown()
        if self._hub is not None:
            await self._hub.close()
        if self._server is not None:
            await self._server.stop(grace)
        if self._stop_metrics is not None:
            self._stop_metrics()
        if self._db is not None:
            await self._db.close()
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)
        log.info("event=stopped")

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()
