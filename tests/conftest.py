"""Test harness: a real PostgreSQL, a real Nexus server on port 0, real clients.

The database is the embedded server (started once per session in a temporary
directory) unless NEXUS_TEST_DATABASE_URL or NEXUS_DATABASE_URL names an
external one. A template database is migrated once; each test gets its own
copy (CREATE DATABASE ... TEMPLATE, tens of milliseconds) and its own server.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest

from devtools.citus_build import CitusSourceMissing, citus_install
from devtools.citus_cluster import CitusCluster, create_cluster_database, drop_cluster_database, freeze_template
from nexus import database, embedded, migrations
from nexus.server import NexusServer

from support.databases import ON_CITUS, backend_database, drop_test_database, with_database
from support.processes import stop_leftover_postmaster
from support.rpc import Clients
from support.servers import server_config


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    external = os.environ.get("NEXUS_TEST_DATABASE_URL") or os.environ.get("NEXUS_DATABASE_URL")
    if external:
        yield external
        return
    data_dir = Path(tempfile.mkdtemp(prefix="nexus-test-pg-"))
    pg = embedded.EmbeddedPostgres.start(data_dir)
    try:
        yield pg.url
    finally:
        pg.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
async def citus_url() -> AsyncIterator[str]:
    """A Citus coordinator database with two workers: NEXUS_TEST_CITUS_URL, or a local
    cluster on loopback from Citus built by devtools.citus_build (cached in .citus-build/)."""
    external = os.environ.get("NEXUS_TEST_CITUS_URL")
    if external:
        yield external
        return
    try:
        pginstall = citus_install()
    except CitusSourceMissing as missing:
        pytest.skip(f"no Citus cluster: set NEXUS_TEST_CITUS_URL to a coordinator, or build and start one ({missing})")
    base_dir = Path(tempfile.mkdtemp(prefix="nexus-test-citus-"))
    # Not durable (fsync off): every test database is a throwaway copy.
    cluster = await CitusCluster.start(pginstall, base_dir, durable=False)
    try:
        yield cluster.url
    finally:
        await cluster.stop()
        cluster.remove()


# NEXUS_TEST_BACKEND=citus runs the tests that use `db_url` (every server test)
# against a Citus cluster instead of one PostgreSQL: each test gets a copy of a
# migrated, distributed cluster database (.ci/run runs the backend suite that
# way; docs/citus.md says what stays single-node). Tests that reach past the service into the one
# server (fault injection, its pg_stat_activity) are marked single_node.
# Shards per distributed table in the tests' cluster database: two per worker, so
# every table still spans both workers and keys still meet on shared shards, while
# a per-test copy is ~500 files per worker instead of ~2400 with Citus's default 32
# (copy + drop about 1 s instead of 4-6 s on 2 cores).
CITUS_TEST_SHARD_COUNT = 4


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On the cluster, the tests that run on the database backend (they use
    ``admin_url``) run; the others ran in the single-node pass and are deselected.
    A test marked ``single_node(reason)`` reaches past the service into the one
    server (signals it, counts its lock waiters, ...): skipped with its reason."""
    if not ON_CITUS:
        return
    on_backend, elsewhere = [], []
    for item in items:
        (on_backend if "admin_url" in getattr(item, "fixturenames", ()) else elsewhere).append(item)
    config.hook.pytest_deselected(items=elsewhere)
    items[:] = on_backend
    for item in on_backend:
        marker = item.get_closest_marker("single_node")
        if marker is not None:
            item.add_marker(pytest.mark.skip(reason=f"single node only: {marker.args[0]}"))


@pytest.fixture(scope="session")
def admin_url(request: pytest.FixtureRequest) -> str:
    """The admin database of the backend the tests run on."""
    return request.getfixturevalue("citus_url" if ON_CITUS else "pg_admin_url")


@pytest.fixture(scope="session")
async def template_db(admin_url: str) -> AsyncIterator[str]:
    name = f"nexus_template_{os.getpid()}"
    if ON_CITUS:
        await drop_cluster_database(admin_url, name)
        await create_cluster_database(admin_url, name)
    else:
        # No connection is held across the session: fault tests crash the server.
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
    conn = await database.connect(with_database(admin_url, name))
    try:
        if ON_CITUS:
            await conn.execute(f"SET citus.shard_count = {CITUS_TEST_SHARD_COUNT}")
        await migrations.migrate(conn)
    finally:
        await conn.close()
    if ON_CITUS:
        await freeze_template(admin_url, name)
    yield name
    await drop_test_database(admin_url, name)


@pytest.fixture
async def db_url(admin_url: str, template_db: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test."""
    async with backend_database(admin_url, template_db, "nexus_test") as url:
        yield url


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the test's database, for checking invariants."""
    conn = await database.connect(db_url)
    yield conn
    conn.terminate()  # also fine when a fault test has broken the connection


@pytest.fixture
async def server(db_url: str) -> AsyncIterator[NexusServer]:
    nexus = NexusServer(server_config(db_url))
    await nexus.start()
    yield nexus
    await nexus.stop(grace=0)


@pytest.fixture
async def clients(server: NexusServer) -> AsyncIterator[Clients]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield Clients(channel)


@pytest.fixture(scope="module")
async def shared(admin_url: str, template_db: str) -> AsyncIterator[tuple[Clients, asyncpg.Connection]]:
    """One server and database for a module's many single-call cases (test_validation,
    test_auth, test_fuzz).

    Sharing is sound: each case names its own fresh entry and compares
    snapshots taken just before and after its own calls. It keeps those files fast.
    """
    async with backend_database(admin_url, template_db, "nexus_shared") as url:
        server = NexusServer(server_config(url))
        await server.start()
        conn = await database.connect(url)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                yield Clients(channel), conn
        finally:
            await conn.close()
            await server.stop(grace=0)


@pytest.fixture
async def pg_dir() -> AsyncIterator[Path]:
    """A data directory for the test's own embedded PostgreSQL, cleaned up (server stopped) afterwards.

    Not tmp_path: a pytest session starting meanwhile chmods pytest-of-<user> to 0700, which locks
    the embedded server's system user out of its own data directory."""
    path = Path(tempfile.mkdtemp(prefix="nexus-lifecycle-"))
    try:
        yield path
    finally:
        await stop_leftover_postmaster(path / "pg")
        shutil.rmtree(path, ignore_errors=True)
