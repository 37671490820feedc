"""Access to PostgreSQL: the connection pool and the one way the service calls it.

Every RPC makes one call through ``Database``: the caller's deadline bounds it
twice — asyncpg stops waiting and sends a cancel request when the time is up,
and the session's ``statement_timeout`` (the remaining time rounded up to a
step) ends the statement in the server even when that cancel request cannot
get through (a stalled postmaster). Slow calls are logged, and any database
error is translated into a ``NexusError``.

What a failed call means for a write (``errors.from_database``): a failure
before the statement was sent (no connection, the deadline already passed)
wrote nothing; so did an error PostgreSQL reported for the statement (a
constraint, a conflict, its own statement_timeout), which rolls it back. A call
that stopped waiting (its deadline), lost its connection, or whose backend
ended (a FATAL: terminated, crashed) has an unknown outcome: the write may
have committed.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from collections.abc import Sequence
from typing import Any, Self

import asyncpg
from pgvector.asyncpg import register_vector

from nexus import errors
from nexus.queries import Query

log = logging.getLogger("nexus.database")

# Monotonic time by which the current RPC must finish; set by the interceptor.
call_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("call_deadline", default=None)


# Server-side bounds a call's remaining time is rounded up to (ms): a pooled
# connection re-issues SET statement_timeout only when its step changes, so a
# steady workload pays no extra round trip, and the server ends a statement at
# most one step after its caller's deadline.
STATEMENT_TIMEOUT_STEPS_MS = (250, 500, 1_000, 2_000, 4_000, 8_000, 15_000, 30_000, 60_000)


class _Connection(asyncpg.Connection):
    """A pooled connection that remembers its session's statement_timeout."""

    __slots__ = ("statement_timeout_ms",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.statement_timeout_ms: int | None = None

    async def bound_statements(self, timeout_ms: int, timeout_s: float) -> None:
        """Makes the session's statement_timeout ``timeout_ms`` (a round trip only if it differs)."""
        if self.statement_timeout_ms == timeout_ms:
            return
        self.statement_timeout_ms = None  # unknown until the server has answered
        await self.execute(f"SET statement_timeout = {int(timeout_ms)}", timeout=timeout_s)
        self.statement_timeout_ms = timeout_ms


def statement_timeout_step(remaining_s: float, ceiling_ms: int) -> int:
    """The server-side bound for a call with ``remaining_s`` left: the next step up, at most the ceiling."""
    remaining_ms = remaining_s * 1000
    step = next((step for step in STATEMENT_TIMEOUT_STEPS_MS if step >= remaining_ms), ceiling_ms)
    return min(step, ceiling_ms)


async def _init_connection(conn: asyncpg.Connection) -> None:
    for json_type in ("json", "jsonb"):
        await conn.set_type_codec(json_type, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    # pgvector's types in binary: a list of floats goes as a vector, and a
    # vector comes back as a pgvector.Vector. A connection opened before the
    # baseline migration created the extension (the migrator's own, on an empty
    # database) has no vectors to carry.
    schema = await conn.fetchval(
        "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector'"
    )
    if schema is not None:
        await register_vector(conn, schema=schema)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release hook. The default reset costs a round trip per call; pooled
    connections here hold no session state to reset (no LISTEN, cursors or
    session advisory locks) but their statement_timeout, which _Connection
    tracks and every call sets to its own bound."""


async def connect(url: str, **kwargs: Any) -> asyncpg.Connection:
    """A single connection with the service's codecs (for migrations, tools, tests)."""
    conn = await asyncpg.connect(url, **kwargs)
    await _init_connection(conn)
    return conn


class Database:
    """A pool plus the service's calling conventions."""

    def __init__(
        self, url: str, pool: asyncpg.Pool, statement_timeout_ms: int, slow_warn_ms: int, slow_error_ms: int,
        distributed: bool = False,
    ) -> None:
        self._url = url
        self.pool = pool
        self._probe: asyncpg.Connection | None = None
        # A Citus database: a cancelled call may have committed on a worker.
        self.distributed = distributed
        self._ceiling_ms = statement_timeout_ms
        self._ceiling_s = statement_timeout_ms / 1000
        self._slow_warn_s = slow_warn_ms / 1000
        self._slow_error_s = slow_error_ms / 1000

    @classmethod
    async def open(
        cls, url: str, *, min_size: int, max_size: int, statement_timeout_ms: int, slow_warn_ms: int, slow_error_ms: int
    ) -> Self:
        pool = await asyncpg.create_pool(
            url,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            reset=_keep_session,
            connection_class=_Connection,
            # A server-side ceiling as well, in case the client side never gets to cancel.
            server_settings={"statement_timeout": str(statement_timeout_ms), "application_name": "nexus"},
        )
        distributed = await pool.fetchval("SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus')")
        return cls(url, pool, statement_timeout_ms, slow_warn_ms, slow_error_ms, distributed)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.terminate()
        await self.pool.close()

    def _timeout(self) -> float:
        deadline = call_deadline.get()
        if deadline is None:
            return self._ceiling_s
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise errors.DeadlineExceeded.not_sent()
        return min(remaining, self._ceiling_s)

    @staticmethod
    def _left(timeout: float, started: float) -> float:
        """Seconds left of ``timeout`` since ``started``; DeadlineExceeded (nothing sent) if none."""
        left = timeout - (time.perf_counter() - started)
        if left <= 0:
            raise errors.DeadlineExceeded.not_sent()
        return left

    async def fetch(self, query: Query, *args: Any) -> list[asyncpg.Record]:
        return await self._call(query, "fetch", args)

    async def fetchone(self, query: Query, *args: Any) -> asyncpg.Record:
        """For a stored function that returns exactly one row (or raises)."""
        row = await self._call(query, "fetchrow", args)
        if row is None:
            raise RuntimeError(f"{query.name} returned no row")
        return row

    async def fetchval(self, query: Query, *args: Any) -> Any:
        return await self._call(query, "fetchval", args)

    async def execute(self, query: Query, *args: Any) -> str:
        return await self._call(query, "execute", args)

    async def _call(self, query: Query, method: str, args: Sequence[Any]) -> Any:
        timeout = self._timeout()
        started = time.perf_counter()
        sent = False
        try:
            # No timeout on acquire (it would spawn a task per call): an RPC
            # waiting for a connection past its deadline is cancelled by gRPC,
            # and a group-commit batch keeps its callers' deadline on the query.
            async with self.pool.acquire() as conn:
                try:
                    await conn.bound_statements(statement_timeout_step(self._left(timeout, started), self._ceiling_ms),
                                                self._left(timeout, started))
                    left = self._left(timeout, started)
                    sent = True
                    return await getattr(conn, method)(query.sql, *args, timeout=left)
                except asyncpg.InternalClientError:
                    # The connection is in a state it cannot leave (an operation
                    # cut short by a lost server): drop it, the pool opens a new one.
                    conn.terminate()
                    raise
        except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError) as exc:
            raise errors.from_database(exc, sent=sent, distributed=self.distributed) from exc
        finally:
            elapsed = time.perf_counter() - started
            if elapsed >= self._slow_warn_s:
                level = logging.ERROR if elapsed >= self._slow_error_s else logging.WARNING
                log.log(level, "event=slow_query query=%s duration_ms=%.1f", query.name, elapsed * 1000)

    async def ping(self, timeout_s: float) -> None:
        """Raises Unavailable unless the database answers ``SELECT 1`` within
        ``timeout_s``, on a connection of its own: a busy pool is not a sick
        database, and a stalled one must not keep the answer waiting. The
        bound includes (re)opening that connection: a database that takes longer
        to accept one is not serving either."""
        try:
            async with asyncio.timeout(timeout_s):
                if self._probe is None or self._probe.is_closed():
                    self._probe = await asyncpg.connect(self._url, server_settings={"application_name": "nexus-health"})
                await self._probe.fetchval("SELECT 1")
        except Exception as exc:  # any failure to reach the database means "not serving"
            if self._probe is not None:
                self._probe.terminate()  # it may be stuck mid-query; the next ping connects afresh
                self._probe = None
            raise errors.Unavailable.refused() from exc
