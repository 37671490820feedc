"""Databases of a test's own on the backend under test (one PostgreSQL, or every node
of a Citus cluster), and what tests read and hold in them directly."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from devtools.citus_build import CitusSourceMissing, citus_install
from devtools.citus_cluster import CitusCluster, copy_cluster_database, drop_cluster_database, workers_of
from nexus import database, migrations

from support.waiting import eventually


def with_database(url: str, name: str) -> str:
    """The same server's URL for another database."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


_scratch_numbers = itertools.count()


@contextlib.asynccontextmanager
async def scratch_database(
    admin_url: str, prefix: str, *, template: str | None = None, embedding_dim: int | None = None
) -> AsyncIterator[str]:
    """A database of its own on ``admin_url``'s server, dropped afterwards; yields its URL.

    A copy of ``template``, or else empty; migrated first when ``embedding_dim``
    is given (for tests that need another dimension than the template's)."""
    name = f"{prefix}_{os.getpid()}_{next(_scratch_numbers)}"
    await _admin(admin_url, f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    try:
        url = with_database(admin_url, name)
        if embedding_dim is not None:
            conn = await database.connect(url)
            try:
                await migrations.migrate(conn, embedding_dim=embedding_dim)
            finally:
                await conn.close()
        yield url
    finally:
        await _admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _admin(admin_url: str, statement: str) -> None:
    """One statement on a connection of its own: none is held while the test runs."""
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(statement)
    finally:
        await admin.close()


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


@contextlib.asynccontextmanager
async def reaction_lock(conn: asyncpg.Connection, user: str, entry_id: str) -> AsyncIterator[None]:
    """Holds an uncommitted resonance row of (user, entry): a concurrent toggle of it blocks."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute(
            "INSERT INTO reactions (user_id, entry_id, kind) VALUES ($1, $2, 'resonance')", user, uuid.UUID(entry_id)
        )
        yield
    finally:
        await transaction.rollback()


async def nexus_toggles(conn: asyncpg.Connection, condition: str) -> int:
    """Backends of the service (application_name 'nexus') on this database running apply_reactions."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")  # conn may be in a transaction, which caches the view
    return await conn.fetchval(
        f"""SELECT count(*) FROM pg_stat_activity
            WHERE application_name = 'nexus' AND datname = current_database()
              AND query LIKE '%apply_reactions%' AND {condition}"""
    )


async def wait_until_toggle_blocks(conn: asyncpg.Connection) -> None:
    await eventually(lambda: nexus_toggles(conn, "wait_event_type = 'Lock'"), "the toggle to block on the row lock")


async def reaction_exists(conn: asyncpg.Connection, user: str, entry_id: str) -> bool:
    return await conn.fetchval(
        "SELECT EXISTS (SELECT FROM reactions WHERE user_id = $1 AND entry_id = $2 AND kind = 'resonance')",
        user, uuid.UUID(entry_id),
    )


# NEXUS_TEST_BACKEND=citus: the tests on the database backend run against a Citus
# cluster (see conftest.py); databases are then created on every node.
ON_CITUS = os.environ.get("NEXUS_TEST_BACKEND", "postgres") == "citus"


async def create_test_database(admin_url: str, template: str, name: str) -> str:
    """A copy of the migrated template (on every node of a cluster); its URL."""
    if ON_CITUS:
        return await copy_cluster_database(admin_url, template, name)
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await admin.close()
    return with_database(admin_url, name)


async def drop_test_database(admin_url: str, name: str) -> None:
    if ON_CITUS:
        await drop_cluster_database(admin_url, name)
        return
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def backend_database(admin_url: str, template: str, prefix: str) -> AsyncIterator[str]:
    """A copy of the migrated template on the backend under test, dropped afterwards; yields its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    url = await create_test_database(admin_url, template, name)
    try:
        yield url
    finally:
        await drop_test_database(admin_url, name)


async def worker_of(conn: asyncpg.Connection, key: str, table: str = "balances") -> int:
    """The port of the worker holding ``key``'s shard of ``table`` (by user: balances; by entry: entries)."""
    return (await workers_of(conn, [key], table))[key]


async def users_on_both_workers(conn: asyncpg.Connection, prefix: str, per_worker: int) -> dict[int, list[str]]:
    """User ids whose balances shards sit on each worker, found from the catalog."""
    found: dict[int, list[str]] = {}
    for n in itertools.count():
        user = f"{prefix}-{n}"
        port = await worker_of(conn, user)
        if len(found.setdefault(port, [])) < per_worker:
            found[port].append(user)
        if len(found) == 2 and all(len(v) == per_worker for v in found.values()):
            return found
    raise AssertionError("unreachable")


@contextlib.asynccontextmanager
async def own_citus_cluster(
    prefix: str, *, durable: bool, shard_count: int | None = None
) -> AsyncIterator[CitusCluster]:
    """A migrated coordinator + 2 workers of the test's own on 127.0.0.1 (its ``postgres``
    database), for tests that stop, restart or add nodes; skips without a Citus build."""
    try:
        pginstall = citus_install()
    except CitusSourceMissing as missing:
        pytest.skip(f"no Citus build to start a cluster of the test's own: {missing}")
    # Not under pytest's tmp_path: PostgreSQL runs as another user when we are root, and cannot enter it.
    cluster = await CitusCluster.start(pginstall, Path(tempfile.mkdtemp(prefix=prefix)), durable=durable)
    try:
        conn = await database.connect(cluster.url)
        try:
            if shard_count is not None:
                await conn.execute(f"SET citus.shard_count = {shard_count}")
            await migrations.migrate(conn)
        finally:
            await conn.close()
        yield cluster
    finally:
        await cluster.stop()
        cluster.remove()
